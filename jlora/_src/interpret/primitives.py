"""The primitives the interpreter's rules are keyed by that JAX does not export, found by tracing.

JAX exports most primitive objects (`jax.extend.core.primitives`); a few it binds
but does not export: ``ragged_dot_general``, ``unstack``, ``shard_map``, ``pvary``
and ``all_gather``. Each is read here once, from a tiny trace through public API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex
from jax.sharding import AbstractMesh, PartitionSpec

from jlora._src.core import jax_compat

__all__ = ["ALL_GATHER_P", "PVARY_P", "RAGGED_DOT_P", "SHARD_MAP_P", "UNSTACK_P", "traced_primitive"]


def _find_primitive(jaxpr: Any, name: str) -> jex.Primitive | None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return eqn.primitive
    for sub in jex.jaxprs_in_params(eqn.params):
      found = _find_primitive(sub, name)
      if found is not None:
        return found
  return None


def traced_primitive(name: str, fn: Any, *avals: Any) -> jex.Primitive:
  """The primitive called ``name`` that tracing ``fn(*avals)`` binds (public API only: JAX does not
  export every primitive object, and the interpreter's rules are keyed by them).

  Raises:
    ImportError: where this JAX binds no primitive of that name (a JAX that renamed it).
  """
  found = _find_primitive(jax.make_jaxpr(fn)(*avals).jaxpr, name)
  if found is None:  # pragma: no cover - a JAX that renamed it
    raise ImportError(
      f"jlora: this JAX ({jax.__version__}) binds no `{name}` primitive where jlora expects one; "
      f"jlora supports {jax_compat.SUPPORTED_JAX}."
    )
  return found


_F32 = jax.ShapeDtypeStruct((2,), jnp.float32)
_MATRIX = jax.ShapeDtypeStruct((2, 2), jnp.float32)
_MESH = AbstractMesh((1,), ("i",))


def _in_shard_map(fn: Callable[[Any], Any], in_spec: PartitionSpec, out_spec: PartitionSpec) -> Callable:
  return jax.shard_map(fn, mesh=_MESH, in_specs=in_spec, out_specs=out_spec)


RAGGED_DOT_P = traced_primitive(
  "ragged_dot_general",
  lax.ragged_dot,
  _MATRIX,
  jax.ShapeDtypeStruct((1, 2, 2), jnp.float32),
  jax.ShapeDtypeStruct((1,), jnp.int32),
)

# `lax.unstack` is newer than jax 0.10.0 (the declared floor), which iterates by slice and squeeze.
UNSTACK_P = traced_primitive("unstack", lax.unstack, _MATRIX) if hasattr(lax, "unstack") else None

SHARD_MAP_P = traced_primitive(
  "shard_map", _in_shard_map(lambda x: x, PartitionSpec(), PartitionSpec()), _F32
)
PVARY_P = traced_primitive(
  "pvary",
  _in_shard_map(lambda x: lax.pcast(x, ("i",), to="varying"), PartitionSpec(), PartitionSpec("i")),
  _F32,
)
ALL_GATHER_P = traced_primitive(
  "all_gather",
  _in_shard_map(
    lambda x: lax.all_gather(lax.pcast(x, ("i",), to="varying"), "i", tiled=True),
    PartitionSpec(),
    PartitionSpec("i"),
  ),
  _F32,
)
