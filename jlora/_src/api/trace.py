"""Tracing a model once to a jaxpr over its array leaves, with a small cache keyed by the call's shapes.

`wrap`'s apply and layout inference (`jlora._src.api.layout_inference`) share these traces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jlora._src.core import paths
from jlora._src.core.qarray import QuantizedArray, is_quantized

CACHE_SIZE = 32


def remember(cache: dict, key: Any, value: Any) -> None:
  """Puts ``value`` in ``cache`` under ``key``, dropping the oldest entry past `CACHE_SIZE` entries."""
  if len(cache) >= CACHE_SIZE:
    cache.pop(next(iter(cache)))
  cache[key] = value


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, QuantizedArray))


def _traceable(x: Any) -> Any:
  """What the model is traced with: a quantized weight stands for its dequantized array."""
  return jax.ShapeDtypeStruct(x.shape, jax.numpy.dtype(x.dtype)) if is_quantized(x) else x


def _aval(x: Any) -> Any:
  return _traceable(x) if is_quantized(x) else jax.typeof(x)


class Traced(NamedTuple):
  closed: Any  # ClosedJaxpr of the model over its array inputs
  out_tree: Any
  tree_slots: dict[paths.Path, int]  # base leaf path -> position among the jaxpr's inputs
  dynamic: list[Any]  # the array inputs, in order
  key: Any = None  # the trace cache's key (None: not cacheable)


def trace(
  fn: Callable, tree: Any, args: Sequence[Any], kwargs: Mapping[str, Any], cache: dict | None
) -> Traced:
  """Traces ``fn(tree, *args, **kwargs)`` to a jaxpr over its array leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    (tree, tuple(args), dict(kwargs)), is_leaf=is_quantized
  )
  leaves = [leaf for _, leaf in flat]
  dyn_idx = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
  dynamic = [leaves[i] for i in dyn_idx]
  tree_slots = {}
  for slot, i in enumerate(dyn_idx):
    key_path = flat[i][0]
    if isinstance(key_path[0], jax.tree_util.SequenceKey) and key_path[0].idx == 0:
      tree_slots[paths.normalize(key_path[1:])] = slot

  cache_key = None
  if cache is not None and not any(isinstance(x, jax.core.Tracer) for x in dynamic):
    dynamic_set = set(dyn_idx)
    static = tuple((i, leaf) for i, leaf in enumerate(leaves) if i not in dynamic_set)
    try:
      cache_key = (treedef, static, tuple(_aval(x) for x in dynamic))
      hash(cache_key)
    except TypeError:
      cache_key = None
    if cache_key is not None and cache_key in cache:
      closed, out_tree = cache[cache_key]
      return Traced(closed, out_tree, tree_slots, dynamic, cache_key)

  def flat_fn(*dyn):
    full = list(leaves)
    for i, v in zip(dyn_idx, dyn):
      full[i] = v
    t, a, k = jax.tree_util.tree_unflatten(treedef, full)
    return fn(t, *a, **k)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*map(_traceable, dynamic))
  out_tree = jax.tree_util.tree_structure(out_shape)
  if cache_key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
    remember(cache, cache_key, (closed, out_tree))
  return Traced(closed, out_tree, tree_slots, dynamic, cache_key)
