"""Creating adapter trees (`jlora._src.adapters.create`): init distributions, keys, dtypes, ranks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import zoo


def test_default_init_kaiming_uniform_a_and_zero_b():
  cfg = jlora.LoraConfig(r=16, target_modules=("q_proj", "v_proj"))
  lora = jlora.init(zoo.two_layer_tree(), cfg, key=jax.random.key(0))
  a = lora["layers_0"]["v_proj"]["kernel"]["lora_A"]
  b = lora["layers_0"]["v_proj"]["kernel"]["lora_B"]
  assert a.shape == (64, 16) and b.shape == (16, 48)
  bound = 1 / math.sqrt(64)  # PyTorch Linear's kaiming_uniform(a=sqrt(5)) on fan_in=64
  assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(a))) > 0.9 * bound
  assert float(jnp.std(a)) == pytest.approx(bound / math.sqrt(3), rel=0.1)
  assert not b.any()


def test_each_adapter_has_its_own_key():
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(zoo.two_layer_tree(), cfg, key=jax.random.key(0))
  a0 = lora["layers_0"]["q_proj"]["kernel"]["lora_A"]
  a1 = lora["layers_1"]["q_proj"]["kernel"]["lora_A"]
  assert not np.allclose(a0, a1)
  again = jlora.init(zoo.two_layer_tree(), cfg, key=jax.random.key(0))
  np.testing.assert_array_equal(a0, again["layers_0"]["q_proj"]["kernel"]["lora_A"])


def test_gaussian_and_false_init():
  g = jlora.init(
    zoo.two_layer_tree(),
    jlora.LoraConfig(r=8, target_modules=("q_proj",), init_lora_weights="gaussian"),
    key=jax.random.key(0),
  )
  a = g["layers_0"]["q_proj"]["kernel"]["lora_A"]
  assert float(jnp.std(a)) == pytest.approx(1 / 8, rel=0.15)
  assert not g["layers_0"]["q_proj"]["kernel"]["lora_B"].any()
  f = jlora.init(
    zoo.two_layer_tree(),
    jlora.LoraConfig(r=8, target_modules=("q_proj",), init_lora_weights=False),
    key=jax.random.key(0),
  )
  assert f["layers_0"]["q_proj"]["kernel"]["lora_B"].any()


def test_dtype_follows_kernel_unless_configured():
  lora = jlora.init(
    zoo.two_layer_tree(jnp.bfloat16), jlora.LoraConfig(target_modules=("q_proj",)), key=jax.random.key(0)
  )
  assert lora["layers_0"]["q_proj"]["kernel"]["lora_A"].dtype == jnp.bfloat16
  lora = jlora.init(
    zoo.two_layer_tree(jnp.bfloat16),
    jlora.LoraConfig(target_modules=("q_proj",), dtype="float32"),
    key=jax.random.key(0),
  )
  assert lora["layers_0"]["q_proj"]["kernel"]["lora_B"].dtype == jnp.float32


def test_base_tree_untouched_and_not_in_adapter():
  tree = zoo.two_layer_tree()
  before = jax.tree_util.tree_map(np.asarray, tree)
  lora = jlora.init(tree, jlora.LoraConfig(target_modules=("q_proj",)), key=jax.random.key(0))
  assert set(lora["layers_0"]["q_proj"]["kernel"]) == {"lora_A", "lora_B"}
  assert "v_proj" not in lora["layers_0"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree, before)


def test_rank_pattern_shapes():
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj", "v_proj"), rank_pattern={"layers_1/v_proj": 2})
  lora = jlora.init(zoo.two_layer_tree(), cfg, key=jax.random.key(0))
  assert lora["layers_1"]["v_proj"]["kernel"]["lora_A"].shape == (64, 2)
  assert lora["layers_0"]["v_proj"]["kernel"]["lora_A"].shape == (64, 8)
