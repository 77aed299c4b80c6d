"""Stage 6, frameworks: Flax NNX models, optax masks and optimizers, summaries."""
