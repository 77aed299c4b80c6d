"""Layout inference (`jlora._src.api.layout_inference`): layouts read from the model's use."""

import jax.numpy as jnp
import pytest

import jlora


def test_infer_layouts_reports_contradicting_uses():
  def apply_fn(p, x):
    w = p["w"]["kernel"]  # (4, 4, 4), contracted once over axis 0 and once over axis 2
    return jnp.einsum("bi,ijk->bjk", x, w).sum() + jnp.einsum("bk,ijk->bij", x, w).sum()

  params = {"w": {"kernel": jnp.ones((4, 4, 4))}}
  with pytest.raises(ValueError, match="conflicting axis roles"):
    jlora.infer_layouts(apply_fn, params, jnp.ones((2, 4)))
