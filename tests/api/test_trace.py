"""Tracing a model to a jaxpr (`jlora._src.api.trace`): the slots of the tree's leaves and the trace cache."""

import jax.numpy as jnp

from jlora._src.api.trace import CACHE_SIZE, remember, trace


def test_a_trace_is_cached_by_shapes_and_finds_the_trees_leaves():
  fn = lambda tree, x: tree["w"] @ x + tree["b"]  # noqa: E731
  cache = {}
  first = trace(fn, {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}, (jnp.ones(3),), {}, cache)
  assert first.tree_slots == {("b",): 0, ("w",): 1} and len(first.dynamic) == 3
  again = trace(fn, {"w": jnp.zeros((2, 3)), "b": jnp.ones(2)}, (jnp.ones(3),), {}, cache)
  assert again.closed is first.closed and len(cache) == 1  # other values, same shapes: no new trace
  other = trace(fn, {"w": jnp.ones((2, 4)), "b": jnp.zeros(2)}, (jnp.ones(4),), {}, cache)
  assert other.closed is not first.closed and len(cache) == 2
  assert trace(fn, {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}, (jnp.ones(3),), {}, None).key is None


def test_the_cache_drops_its_oldest_entry_when_full():
  cache = {}
  for i in range(CACHE_SIZE + 1):
    remember(cache, i, str(i))
  assert len(cache) == CACHE_SIZE and 0 not in cache and cache[CACHE_SIZE] == str(CACHE_SIZE)
