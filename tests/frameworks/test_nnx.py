"""NNX: the split the README used to recommend aliases the model; `nnx_split` / `nnx_merge` cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora

D = 8
RTOL, ATOL = 1e-5, 1e-6  # fp32


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(D, D, rngs=rngs)
    self.v_proj = nnx.Linear(D, D, rngs=rngs)
    self.norm = nnx.BatchNorm(D, use_running_average=False, rngs=rngs)

  def __call__(self, x):
    return self.norm(jax.nn.tanh(self.q_proj(x)) * self.v_proj(x))


CFG = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), init_lora_weights=False)
X = jax.random.normal(jax.random.key(2), (6, D))


def _snapshot(state):
  return jax.tree_util.tree_map(np.array, state)


def _assert_unchanged(state, snapshot):
  jax.tree_util.tree_map(np.testing.assert_array_equal, _snapshot(state), snapshot)


def _merged_reference(graphdef, state, lora):
  """The model on merged kernels, computed from numpy copies: shares nothing with `state`."""
  merged = jlora.merge(jax.tree_util.tree_map(jnp.array, _snapshot(state)), lora, CFG)
  return nnx.merge(graphdef, merged)(X)


def test_old_recipe_applies_the_adapter_twice():
  model = Block(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  assert state["q_proj"]["kernel"] is model.q_proj.kernel  # the aliasing itself (flax >= 0.12)
  lora = jlora.init(state, CFG, key=jax.random.key(1))
  apply = jlora.wrap(lambda s, x: nnx.merge(graphdef, s)(x), CFG)
  before = apply(state, lora, X)
  nnx.update(model, jlora.merge(state, lora, CFG))  # the README's old serving line
  after = apply(state, lora, X)
  assert not np.allclose(after, before, rtol=0.1)  # the frozen base now holds merged kernels


def test_nnx_split_state_is_detached_and_exact():
  model = Block(nnx.Rngs(0))
  graphdef, state, apply_fn = jlora.nnx_split(model)
  assert state["q_proj"]["kernel"] is not model.q_proj.kernel
  snapshot = _snapshot(state)
  lora = jlora.init(state, CFG, key=jax.random.key(1))
  apply = jlora.wrap(apply_fn, CFG)
  y = apply(state, lora, X)
  want = _merged_reference(graphdef, state, lora)
  np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
  assert not np.allclose(y, apply_fn(state, X), rtol=0.1)  # the adapter does change the output

  # The old serving line, and training the model itself, no longer reach the state.
  nnx.update(model, jlora.merge(state, lora, CFG))
  model(X)  # BatchNorm in training mode updates the model's batch statistics
  _assert_unchanged(state, snapshot)
  np.testing.assert_allclose(apply(state, lora, X), y, rtol=RTOL, atol=ATOL)


def test_apply_fn_is_pure():
  graphdef, state, apply_fn = jlora.nnx_split(Block(nnx.Rngs(0)))
  snapshot = _snapshot(state)
  y1 = apply_fn(state, X + 3.0)  # eager: BatchNorm would update running stats of a shared state
  y2 = apply_fn(state, X + 3.0)
  np.testing.assert_array_equal(y1, y2)
  _assert_unchanged(state, snapshot)
  # Under jit XLA fuses the normalisation differently: equal to fp32 rounding, not bitwise.
  np.testing.assert_allclose(jax.jit(apply_fn)(state, X + 3.0), y1, rtol=RTOL, atol=1e-4)
  _assert_unchanged(state, snapshot)


def test_nnx_merge_serves_exactly_and_leaves_training_state_alone():
  graphdef, state, apply_fn = jlora.nnx_split(Block(nnx.Rngs(0)))
  snapshot = _snapshot(state)
  lora = jlora.init(state, CFG, key=jax.random.key(1))
  apply = jlora.wrap(apply_fn, CFG)

  # Train a few steps, serve, train on: serving must not disturb training.
  opt = optax.adam(1e-2)
  opt_state = opt.init(lora)

  @jax.jit
  def step(lora, opt_state):
    grads = jax.grad(lambda lo: jnp.mean(apply(state, lo, X) ** 2))(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state

  for _ in range(3):
    lora, opt_state = step(lora, opt_state)
  y = apply(state, lora, X)
  np.testing.assert_allclose(y, _merged_reference(graphdef, state, lora), rtol=RTOL, atol=ATOL)

  lora_snapshot = _snapshot(lora)
  serving = jlora.nnx_merge(graphdef, state, lora, CFG)
  np.testing.assert_allclose(serving(X), y, rtol=RTOL, atol=ATOL)
  nnx.update(serving, jax.tree_util.tree_map(jnp.zeros_like, nnx.state(serving)))  # anything at all
  _assert_unchanged(state, snapshot)
  _assert_unchanged(lora, lora_snapshot)
  np.testing.assert_allclose(apply(state, lora, X), y, rtol=RTOL, atol=ATOL)

  lora, opt_state = step(lora, opt_state)
  _assert_unchanged(state, snapshot)


def test_nnx_merge_checks_the_adapter():
  graphdef, state, _ = jlora.nnx_split(Block(nnx.Rngs(0)))
  lora = jlora.init(state, CFG, key=jax.random.key(1))
  bad = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), lora)
  with pytest.raises(ValueError, match="NaN or Inf"):
    jlora.nnx_merge(graphdef, state, bad, CFG, safe_merge=True)


def test_nnx_split_rejects_non_modules():
  with pytest.raises(TypeError, match=r"`model` must be a `flax.nnx.Module`; got dict"):
    jlora.nnx_split({"kernel": jnp.ones((2, 2))})
