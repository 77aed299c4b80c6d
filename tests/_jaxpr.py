"""Reading jaxprs in tests: the shapes of every value a program computes, sub-jaxprs included."""

import jax


def out_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every equation of ``jaxpr`` and of the jaxprs in its equations' params."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += out_shapes(sub)
  return out
