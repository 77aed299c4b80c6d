"""optax freezing: the adapter trains, the base stays bit-identical."""

import jax
import numpy as np
import optax
import pytest

import jlora
from tests import zoo


@pytest.fixture(scope="module")
def case():
  c = zoo.BUILDERS["llama"]()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
  lora = jlora.init(c.tree, cfg, key=jax.random.key(0))
  return c, cfg, lora


def test_separate_adapter_tree_trains_with_any_optimizer(case):
  c, cfg, lora = case
  apply = jlora.wrap(c.apply_fn, cfg)
  for opt in (optax.sgd(0.1), optax.adamw(1e-2), optax.lion(1e-3)):
    grads = jax.grad(lambda lo: zoo.loss_fn(c, apply(c.tree, lo, c.inputs)))(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    updates, _ = opt.update(grads, opt.init(lora), lora)
    new = optax.apply_updates(lora, updates)
    assert not np.array_equal(new["params"]["layers_0"]["q_proj"]["kernel"]["lora_B"], 0)


def test_trainable_mask(case):
  c, _, lora = case
  mask = jlora.trainable_mask(jlora.combine(c.tree, lora))
  assert not any(jax.tree_util.tree_leaves(mask["base"]))
  assert all(jax.tree_util.tree_leaves(mask["lora"]))
  assert jax.tree_util.tree_structure(mask["lora"]) == jax.tree_util.tree_structure(lora)
  with pytest.raises(TypeError, match=r"Expected a combined tree \{'base': tree, 'lora': lora\}"):
    jlora.trainable_mask(lora)


@pytest.mark.parametrize("make", ["freeze_base", "masked"])
def test_base_bit_identical_after_updates(case, make):
  c, cfg, lora = case
  apply = jlora.wrap(c.apply_fn, cfg)
  combined = jlora.combine(c.tree, lora)
  if make == "freeze_base":
    opt = jlora.freeze_base(optax.adamw(1e-2, weight_decay=0.1))
  else:
    opt = optax.chain(
      optax.masked(optax.adamw(1e-2, weight_decay=0.1), jlora.trainable_mask(combined)),
      optax.masked(
        optax.set_to_zero(), jax.tree_util.tree_map(lambda m: not m, jlora.trainable_mask(combined))
      ),
    )
  state = opt.init(combined)

  @jax.jit
  def step(params, state):
    def loss(p):
      base, lo = jlora.split(p)
      return zoo.loss_fn(c, apply(base, lo, c.inputs))

    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = combined
  for _ in range(5):
    params, state = step(params, state)
  base, new_lora = jlora.split(params)
  jax.tree_util.tree_map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)),
    base,
    c.tree,
  )
  assert not np.array_equal(new_lora["params"]["lm_head"]["kernel"], lora["params"]["lm_head"]["kernel"])
  assert np.any(new_lora["params"]["layers_1"]["v_proj"]["kernel"]["lora_B"] != 0)


def test_freeze_base_keeps_no_state_for_base(case):
  c, _, lora = case
  opt = jlora.freeze_base(optax.adam(1e-3))
  state = opt.init(jlora.combine(c.tree, lora))
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size"))
  n_lora = jlora.count_params(lora)
  assert n_state <= 2 * n_lora + 16  # adam's mu and nu for the adapter only
