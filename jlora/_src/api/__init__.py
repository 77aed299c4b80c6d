"""Stage 4, api: `jlora.wrap` and `jlora.init`, the two calls a training script is built on, and the model
traces they share (`trace`, `layout_inference`)."""
