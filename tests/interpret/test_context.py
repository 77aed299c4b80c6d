"""The interpretation's per-call state (`jlora._src.interpret.context.Context`)."""

import jax
import numpy as np
import pytest

from jlora._src.interpret.context import Context
from jlora._src.interpret.values import Probe
from tests.interpret._kernels import normal


def _ctx(**kw):
  base = dict(strategy="auto", differentiated=False, dropout_rate=0.0, key=None, warned=set())
  return Context(**{**base, **kw})


def test_may_merge_only_under_auto_without_gradients_dropout_or_batching():
  assert _ctx().may_merge()
  assert not _ctx(strategy="factorized").may_merge()
  assert not _ctx(differentiated=True).may_merge()
  assert not _ctx(batched=True).may_merge()
  assert not _ctx(key=jax.random.key(0)).may_merge()


def test_next_key_folds_a_fresh_counter_and_a_child_scope_starts_its_own():
  key = jax.random.key(3)
  ctx = _ctx(key=key)
  first, second = ctx.next_key(), ctx.next_key()
  np.testing.assert_array_equal(jax.random.key_data(first), jax.random.key_data(jax.random.fold_in(key, 1)))
  np.testing.assert_array_equal(jax.random.key_data(second), jax.random.key_data(jax.random.fold_in(key, 2)))
  child = ctx.child(jax.random.key(9))
  assert child.counter == 0 and ctx.counter == 2
  assert child.warned is ctx.warned and child.first_products is ctx.first_products  # shared per call
  assert _ctx().next_key() is None


def test_record_maps_view_axes_to_kernel_axes():
  ctx = _ctx(roles={})
  probe = Probe(normal(6, 4), ((0, 1), (2,)), "w")  # view axis 0 merges kernel axes 0 and 1
  ctx.record(probe, {0: "i", 1: "o"}, "dot_general")
  assert ctx.roles == {"w": [("dot_general", {0: "i", 1: "i", 2: "o"})]}
  with pytest.raises(ValueError, match="without `roles`"):
    _ctx().record(probe, {0: "i"}, "dot_general")
