"""Stage 2, interpret: the jaxpr evaluator that computes with adapted kernels factorized."""
