"""merge / unmerge against an independent numpy computation; NaN refusal; no mutation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def _setup(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  tree = {
    "attn": {"q_proj": {"kernel": jax.random.normal(k[0], (12, 10)).astype(dtype), "bias": jnp.zeros(10)}},
    "mlp": {"up": {"kernel": jax.random.normal(k[1], (12, 20)).astype(dtype)}},
  }
  cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("q_proj",), init_lora_weights=False)
  lora = jlora.init(tree, cfg, key=k[2])
  return tree, lora, cfg


def test_merge_matches_numpy():
  tree, lora, cfg = _setup()
  merged = jlora.merge(tree, lora, cfg)
  node = lora["attn"]["q_proj"]["kernel"]
  a, b = np.asarray(node["lora_A"], np.float64), np.asarray(node["lora_B"], np.float64)
  want = np.asarray(tree["attn"]["q_proj"]["kernel"], np.float64) + 2.0 * a @ b
  np.testing.assert_allclose(merged["attn"]["q_proj"]["kernel"], want, rtol=1e-6, atol=1e-6)
  # Everything else is the caller's array, untouched.
  assert merged["mlp"]["up"]["kernel"] is tree["mlp"]["up"]["kernel"]
  assert merged["attn"]["q_proj"]["bias"] is tree["attn"]["q_proj"]["bias"]


def test_merge_bf16_accumulates_in_fp32():
  tree, lora, cfg = _setup(jnp.bfloat16)
  merged = jlora.merge(tree, lora, cfg)
  k = merged["attn"]["q_proj"]["kernel"]
  assert k.dtype == jnp.bfloat16
  node = lora["attn"]["q_proj"]["kernel"]
  a, b = np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32)
  want = (np.asarray(tree["attn"]["q_proj"]["kernel"], np.float32) + 2.0 * a @ b).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(k), want)


def test_round_trip_and_no_mutation():
  tree, lora, cfg = _setup()
  before = jax.tree_util.tree_map(np.array, tree)
  back = jlora.unmerge(jlora.merge(tree, lora, cfg), lora, cfg)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), back, before)
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree, before)


def test_merge_under_jit_equals_eager():
  tree, lora, cfg = _setup()
  eager = jlora.merge(tree, lora, cfg)
  jitted = jax.jit(lambda t, l_: jlora.merge(t, l_, cfg))(tree, lora)
  jax.tree_util.tree_map(np.testing.assert_array_equal, eager, jitted)


def test_safe_merge_refuses_non_finite():
  tree, lora, cfg = _setup()
  bad = jax.tree_util.tree_map(lambda x: x, lora)
  bad["attn"]["q_proj"]["kernel"]["lora_B"] = lora["attn"]["q_proj"]["kernel"]["lora_B"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="lora_B of the adapter at 'attn/q_proj/kernel' contains NaN or Inf"):
    jlora.merge(tree, bad, cfg, safe_merge=True)
  bad["attn"]["q_proj"]["kernel"]["lora_B"] = lora["attn"]["q_proj"]["kernel"]["lora_B"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match="contains NaN or Inf"):
    jlora.merge(tree, bad, cfg, safe_merge=True)
  # Without the check the NaN goes through (PEFT's default), and a finite adapter passes the check.
  assert jnp.isinf(jlora.merge(tree, bad, cfg)["attn"]["q_proj"]["kernel"]).any()
  jlora.merge(tree, lora, cfg, safe_merge=True)
  with pytest.raises(TypeError, match="cannot run under `jax.jit`"):
    jax.jit(lambda l_: jlora.merge(tree, l_, cfg, safe_merge=True))(lora)


def test_modules_to_save_replaced_on_merge():
  tree, _, _ = _setup()
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("up",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  lora["mlp"]["up"]["kernel"] = lora["mlp"]["up"]["kernel"] + 1.0
  merged = jlora.merge(tree, lora, cfg)
  np.testing.assert_array_equal(merged["mlp"]["up"]["kernel"], tree["mlp"]["up"]["kernel"] + 1.0)


def test_safe_merge_passes_a_finite_fp16_merge_and_names_an_overflow():
  tree = {"q_proj": {"kernel": jnp.full((4, 3), 1000.0, jnp.float16)}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), dtype="float32")
  lora = {"q_proj": {"kernel": {"lora_A": jnp.full((4, 2), 10.0), "lora_B": jnp.full((2, 3), 10.0)}}}
  # scale 4 (alpha 8 / r 2): 1000 + 4 * 2 * 100 = 1800, finite in fp16.
  np.testing.assert_array_equal(jlora.merge(tree, lora, cfg, safe_merge=True)["q_proj"]["kernel"], 1800.0)
  big = jax.tree_util.tree_map(lambda a: a * 10.0, lora)  # 1000 + 80000: past fp16's 65504
  assert np.isinf(np.asarray(jlora.merge(tree, big, cfg)["q_proj"]["kernel"])).all()
  with pytest.raises(ValueError, match=r"merged kernel at 'q_proj/kernel' \(float16\).*exceeds the range"):
    jlora.merge(tree, big, cfg, safe_merge=True)


def test_integer_kernel_is_refused_not_saturated():
  tree = {"q_proj": {"kernel": jnp.full((4, 3), 100, jnp.int8)}, "v_proj": {"kernel": jnp.ones((4, 3))}}
  lora = {"q_proj": {"kernel": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.full((2, 3), 7.5)}}}
  with pytest.raises(ValueError, match=r"'q_proj/kernel', an integer \(int8\) kernel"):
    jlora.merge(tree, lora, jlora.LoraConfig(r=2, target_modules=("v_proj",)))
  with pytest.raises(ValueError, match=r"integer \(int8\) kernel"):
    jlora.merge(tree, lora, jlora.LoraConfig(r=2, target_modules=("q_proj",)))
