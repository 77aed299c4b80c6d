"""Tests for `jlora.loraplus`: PEFT's LoRA+ groups and learning rates, alone and inside `freeze_base`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

LR, RATIO, LR_EMB = 0.1, 16.0, 1e-3


@pytest.fixture(scope="module")
def adapted():
  params = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "q_proj": {"kernel": jnp.ones((4, 4))},
    "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
  }
  cfg = jlora.LoraConfig(
    r=2, target_modules=("q_proj", "embed"), modules_to_save=("head",), init_lora_weights=False
  )
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 2.0), lora)
  return params, lora, grads


def test_groups_are_peft_s(adapted):
  _, lora, _ = adapted
  labels = jlora.loraplus_labels(lora)
  assert labels["q_proj"]["kernel"] == {"lora_A": "a", "lora_B": "b"}
  assert labels["embed"]["embedding"] == {"lora_A": "embedding", "lora_B": "embedding"}
  assert labels["head"] == {"kernel": "a", "bias": "b_no_decay"}


def test_sgd_learning_rates_per_group(adapted):
  _, lora, grads = adapted
  opt = jlora.loraplus(optax.sgd, learning_rate=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=LR_EMB)
  updates, _ = opt.update(grads, opt.init(lora), lora)
  want = {"lora_A": -2 * LR, "lora_B": -2 * LR * RATIO}
  for name, value in want.items():
    np.testing.assert_allclose(updates["q_proj"]["kernel"][name], value, rtol=1e-6)
    np.testing.assert_allclose(updates["embed"]["embedding"][name], -2 * LR_EMB, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -2 * LR, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -2 * LR * RATIO, rtol=1e-6)


def test_adamw_weight_decay_spares_biases_and_schedules_scale(adapted):
  _, lora, grads = adapted
  schedule = optax.linear_schedule(LR, 0.0, 10)
  opt = jlora.loraplus(
    optax.adamw, learning_rate=schedule, loraplus_lr_ratio=RATIO, loraplus_weight_decay=0.5
  )
  updates, _ = opt.update(grads, opt.init(lora), lora)

  def adamw(lr, decay, g, p):
    tx = optax.adamw(lr, weight_decay=decay)
    return tx.update(g, tx.init(p), p)[0]

  b = lora["q_proj"]["kernel"]["lora_B"]
  want_b = adamw(lambda c: RATIO * schedule(c), 0.5, grads["q_proj"]["kernel"]["lora_B"], b)
  np.testing.assert_allclose(updates["q_proj"]["kernel"]["lora_B"], want_b, rtol=1e-6)
  bias = lora["head"]["bias"]
  np.testing.assert_allclose(
    updates["head"]["bias"], adamw(RATIO * LR, 0.0, grads["head"]["bias"], bias), rtol=1e-6
  )


def test_inside_freeze_base_the_base_stays_and_the_adapter_moves_as_alone(adapted):
  params, lora, grads = adapted
  opt = jlora.loraplus(optax.sgd, learning_rate=LR, loraplus_lr_ratio=RATIO)
  combined = jlora.combine(params, lora)
  frozen = jlora.freeze_base(opt)
  g = jlora.combine(jax.tree_util.tree_map(jnp.ones_like, params), grads)
  updates, _ = frozen.update(g, frozen.init(combined), combined)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates["base"]))
  alone, _ = opt.update(grads, opt.init(lora), lora)
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates["lora"], alone)


def test_bad_arguments():
  with pytest.raises(ValueError, match="`loraplus_lr_ratio` must be a positive number"):
    jlora.loraplus(optax.sgd, learning_rate=LR, loraplus_lr_ratio=0)
  with pytest.raises(ValueError, match="needs an optimizer with a `weight_decay` argument"):
    jlora.loraplus(optax.adam, learning_rate=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=0.1)
