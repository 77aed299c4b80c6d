"""The primitives JAX binds but does not export (`jlora._src.interpret.primitives`)."""

import jax
import jax.numpy as jnp
from jax import lax

from jlora._src.interpret import primitives


def test_each_traced_primitive_is_the_one_jax_binds():
  assert primitives.RAGGED_DOT_P.name == "ragged_dot_general"
  assert primitives.SHARD_MAP_P.name == "shard_map"
  assert primitives.PVARY_P.name == "pvary"
  assert primitives.ALL_GATHER_P.name == "all_gather"
  x, w = jnp.ones((4, 2)), jnp.ones((2, 2, 3))
  jaxpr = jax.make_jaxpr(lax.ragged_dot)(x, w, jnp.array([1, 3], jnp.int32)).jaxpr
  assert any(e.primitive is primitives.RAGGED_DOT_P for e in jaxpr.eqns)
  if hasattr(lax, "unstack"):
    (eqn,) = jax.make_jaxpr(lax.unstack)(jnp.ones((2, 3))).jaxpr.eqns
    assert eqn.primitive is primitives.UNSTACK_P
  else:
    assert primitives.UNSTACK_P is None


def test_a_name_jax_never_binds_is_none_in_the_search():
  jaxpr = jax.make_jaxpr(jnp.sin)(1.0).jaxpr
  assert primitives._find_primitive(jaxpr, "no_such_primitive") is None
