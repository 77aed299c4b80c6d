"""Adapter init: shapes, keys, dtypes, init distributions, layouts, stacked layers; bind errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import zoo


def _tree(dtype=jnp.float32):
  return {
    "layers_0": {
      "q_proj": {"kernel": jnp.ones((64, 32), dtype)},
      "v_proj": {"kernel": jnp.ones((64, 48), dtype)},
    },
    "layers_1": {
      "q_proj": {"kernel": jnp.ones((64, 32), dtype)},
      "v_proj": {"kernel": jnp.ones((64, 48), dtype)},
    },
  }


def test_default_init_kaiming_uniform_a_and_zero_b():
  cfg = jlora.LoraConfig(r=16, target_modules=("q_proj", "v_proj"))
  lora = jlora.init(_tree(), cfg, key=jax.random.key(0))
  a = lora["layers_0"]["v_proj"]["kernel"]["lora_A"]
  b = lora["layers_0"]["v_proj"]["kernel"]["lora_B"]
  assert a.shape == (64, 16) and b.shape == (16, 48)
  bound = 1 / math.sqrt(64)  # PyTorch Linear's kaiming_uniform(a=sqrt(5)) on fan_in=64
  assert float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(a))) > 0.9 * bound
  assert float(jnp.std(a)) == pytest.approx(bound / math.sqrt(3), rel=0.1)
  assert not b.any()


def test_each_adapter_has_its_own_key():
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(_tree(), cfg, key=jax.random.key(0))
  a0 = lora["layers_0"]["q_proj"]["kernel"]["lora_A"]
  a1 = lora["layers_1"]["q_proj"]["kernel"]["lora_A"]
  assert not np.allclose(a0, a1)
  again = jlora.init(_tree(), cfg, key=jax.random.key(0))
  np.testing.assert_array_equal(a0, again["layers_0"]["q_proj"]["kernel"]["lora_A"])


def test_gaussian_and_false_init():
  g = jlora.init(
    _tree(),
    jlora.LoraConfig(r=8, target_modules=("q_proj",), init_lora_weights="gaussian"),
    key=jax.random.key(0),
  )
  a = g["layers_0"]["q_proj"]["kernel"]["lora_A"]
  assert float(jnp.std(a)) == pytest.approx(1 / 8, rel=0.15)
  assert not g["layers_0"]["q_proj"]["kernel"]["lora_B"].any()
  f = jlora.init(
    _tree(), jlora.LoraConfig(r=8, target_modules=("q_proj",), init_lora_weights=False), key=jax.random.key(0)
  )
  assert f["layers_0"]["q_proj"]["kernel"]["lora_B"].any()


def test_dtype_follows_kernel_unless_configured():
  lora = jlora.init(_tree(jnp.bfloat16), jlora.LoraConfig(target_modules=("q_proj",)), key=jax.random.key(0))
  assert lora["layers_0"]["q_proj"]["kernel"]["lora_A"].dtype == jnp.bfloat16
  lora = jlora.init(
    _tree(jnp.bfloat16), jlora.LoraConfig(target_modules=("q_proj",), dtype="float32"), key=jax.random.key(0)
  )
  assert lora["layers_0"]["q_proj"]["kernel"]["lora_B"].dtype == jnp.float32


def test_base_tree_untouched_and_not_in_adapter():
  tree = _tree()
  before = jax.tree_util.tree_map(np.asarray, tree)
  lora = jlora.init(tree, jlora.LoraConfig(target_modules=("q_proj",)), key=jax.random.key(0))
  assert set(lora["layers_0"]["q_proj"]["kernel"]) == {"lora_A", "lora_B"}
  assert "v_proj" not in lora["layers_0"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree, before)


def test_rank_pattern_shapes():
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj", "v_proj"), rank_pattern={"layers_1/v_proj": 2})
  lora = jlora.init(_tree(), cfg, key=jax.random.key(0))
  assert lora["layers_1"]["v_proj"]["kernel"]["lora_A"].shape == (64, 2)
  assert lora["layers_0"]["v_proj"]["kernel"]["lora_A"].shape == (64, 8)


class DenseGeneralModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((4, 8), name="q")(x)  # (d, H, Dh): fan-in 1 axis
    return nn.DenseGeneral(16, axis=(-2, -1), name="o")(q)  # (H, Dh, d): fan-in 2 axes


def test_nd_layout_needs_model_or_override():
  model = DenseGeneralModel()
  x = jnp.ones((2, 16))
  params = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=2, target_modules=("q", "o"))
  with pytest.raises(
    ValueError, match=r"Kernel 'params/o/kernel' has shape \(4, 8, 16\).*apply_fn=model.apply"
  ):
    jlora.init(params, cfg, key=jax.random.key(0))
  lora = jlora.init(
    params,
    cfg,
    key=jax.random.key(0),
    apply_fn=model.apply,
    example_args=(jax.ShapeDtypeStruct(x.shape, x.dtype),),
  )
  assert lora["params"]["q"]["kernel"]["lora_A"].shape == (16, 2)
  assert lora["params"]["q"]["kernel"]["lora_B"].shape == (2, 4, 8)
  assert lora["params"]["o"]["kernel"]["lora_A"].shape == (4, 8, 2)
  assert lora["params"]["o"]["kernel"]["lora_B"].shape == (2, 16)
  # A user override wins over what the model says.
  over = jlora.LoraConfig(r=2, target_modules=("q", "o"), layout_pattern={"q": (0, 2), "o": (0, 1)})
  lora = jlora.init(params, over, key=jax.random.key(0))
  assert lora["params"]["q"]["kernel"]["lora_A"].shape == (16, 4, 2)
  assert lora["params"]["o"]["kernel"]["lora_B"].shape == (2, 8, 16)
  bad = jlora.LoraConfig(r=2, target_modules=("q",), layout_pattern={"q": (1, 2)})
  with pytest.raises(ValueError, match="leaves no fan-out axis"):
    jlora.init(params, bad, key=jax.random.key(0))


def test_infer_layouts_reports_contradicting_uses():
  def apply_fn(p, x):
    w = p["w"]["kernel"]  # (4, 4, 4), contracted once over axis 0 and once over axis 2
    return jnp.einsum("bi,ijk->bjk", x, w).sum() + jnp.einsum("bk,ijk->bij", x, w).sum()

  params = {"w": {"kernel": jnp.ones((4, 4, 4))}}
  with pytest.raises(ValueError, match="conflicting axis roles"):
    jlora.infer_layouts(apply_fn, params, jnp.ones((2, 4)))


def test_stacked_layers_and_layers_to_transform():
  case = zoo.BUILDERS["llama_scan"]()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",), layers_to_transform=[1], init_lora_weights=False)
  lora = jlora.init(
    case.tree, cfg, key=jax.random.key(0), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  node = lora["params"]["layers"]["q_proj"]["kernel"]
  assert node["lora_A"].shape == (1, zoo.D, 4) and node["lora_B"].shape == (1, 4, zoo.D)
  merged = jlora.merge(case.tree, lora, cfg)
  k0 = case.tree["params"]["layers"]["q_proj"]["kernel"]
  k1 = merged["params"]["layers"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(k1[0], k0[0])  # layer 0 untouched
  want = k0[1] + cfg.scale_for("layers/q_proj") * node["lora_A"][0] @ node["lora_B"][0]
  np.testing.assert_allclose(k1[1], want, rtol=1e-6, atol=1e-6)
  apply = jlora.wrap(case.apply_fn, cfg)
  np.testing.assert_allclose(
    apply(case.tree, lora, case.inputs), case.apply_fn(merged, case.inputs), rtol=1e-5, atol=1e-5
  )


def test_bind_errors_name_the_path():
  tree = _tree()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(0))
  wrong = jax.tree_util.tree_map(lambda x: x, lora)
  wrong["layers_0"]["q_proj"]["kernel"]["lora_B"] = jnp.zeros((4, 31))
  with pytest.raises(
    ValueError, match=r"Adapter at 'layers_0/q_proj/kernel' has lora_A \(64, 4\) and lora_B \(4, 31\)"
  ):
    jlora.merge(tree, wrong, cfg)
  missing = {"layers_9": lora["layers_0"]}
  with pytest.raises(ValueError, match="'layers_9/q_proj/kernel' but the base tree has no leaf there"):
    jlora.merge(tree, missing, cfg)
  with pytest.raises(ValueError, match="has rank 4 but the config gives rank 8"):
    jlora.merge(tree, lora, jlora.LoraConfig(r=8, target_modules=("q_proj",)))


class ConvThenDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    return nn.Dense(2, name="fc")(x.mean((1, 2)))


def test_all_linear_skips_convolutions_when_the_model_is_known():
  model = ConvThenDense()
  x = jnp.ones((1, 6, 6, 3))
  params = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear")
  lora = jlora.init(params, cfg, key=jax.random.key(0), apply_fn=model.apply, example_args=(x,))
  assert list(lora["params"]) == ["fc"]  # PEFT's all-linear: Linear layers only, not Conv
  layouts = jlora.infer_layouts(model.apply, params, x)
  assert layouts[("params", "conv", "kernel")] == jlora.Layout("iiio")
  assert "conv_general_dilated" in layouts[("params", "conv", "kernel")].ops
  case = zoo.BUILDERS["convnet"]()  # its only Dense is the output head
  with pytest.raises(ValueError, match="found no weight the model uses as a linear layer"):
    jlora.init(case.tree, cfg, key=jax.random.key(0), apply_fn=case.apply_fn, example_args=(case.inputs,))


def test_a_rank_equal_to_the_width_is_read_from_the_model_or_refused():
  params = {"c_proj": {"kernel": jax.random.normal(jax.random.key(0), (4, 4))}}  # stored (out, in)
  fn = lambda p, x: x @ p["c_proj"]["kernel"].T  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (3, 4))
  cfg = jlora.LoraConfig(r=4, target_modules=("c_proj",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(2), apply_fn=fn, example_args=(x,))
  a, b = lora["c_proj"]["kernel"]["lora_A"], lora["c_proj"]["kernel"]["lora_B"]
  assert (a.shape, b.shape) == ((4, 4), (4, 4))
  # "oi": A (r, in), B (out, r), so the kernel becomes W + scale * B @ A, as in PEFT.
  want = x @ (params["c_proj"]["kernel"] + 2.0 * b @ a).T
  np.testing.assert_allclose(jlora.wrap(fn, cfg)(params, lora, x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"more than one layout \('io', 'oi'\).*layout_pattern"):
    jlora.merge(params, lora, cfg)
  pinned = jlora.LoraConfig(**{**cfg.to_dict(), "layout_pattern": {"c_proj": "oi"}})
  np.testing.assert_allclose(fn(jlora.merge(params, lora, pinned), x), want, rtol=1e-5, atol=1e-5)


K0 = jax.random.key(0)


def test_bind_agrees_with_layer_selection_on_stacked_and_indexed_kernels():
  tree = {
    "scan": {"up": {"kernel": jnp.ones((3, 4, 5))}},  # stacked over 3 layers, no index in the path
    "layers_0": {"up": {"kernel": jnp.ones((4, 5))}},
    "layers_2": {"up": {"kernel": jnp.ones((4, 5))}},
    "head": {"up": {"kernel": jnp.ones((4, 5))}},  # 2-D, no layer index: never selected
  }
  cfg = jlora.LoraConfig(
    r=2, target_modules=("up",), layers_to_transform=(0, 2), layout_pattern={"scan/up": "sio"}
  )
  lora = jlora.init(tree, cfg, key=jax.random.key(0))
  assert set(lora) == {"scan", "layers_0", "layers_2"}
  assert lora["scan"]["up"]["kernel"]["lora_A"].shape == (2, 4, 2)
  jlora.merge(tree, lora, cfg)
  missing = {k: v for k, v in lora.items() if k != "layers_2"}
  with pytest.raises(ValueError, match=r"no adapter for \['layers_2/up/kernel'\]"):
    jlora.merge(tree, missing, cfg)
  full = jlora.init(
    tree, jlora.LoraConfig(r=2, target_modules=("up",), layout_pattern={"scan/up": "sio"}), key=K0
  )
  with pytest.raises(
    ValueError, match=r"adapter at 'head/up/kernel', but `layers_to_transform`.*no layer index"
  ):
    jlora.merge(tree, {**lora, "head": full["head"]}, cfg)
  with pytest.raises(ValueError, match=r"'scan/up/kernel' covers 3 of the kernel's 3 stacked layers"):
    jlora.merge(tree, {**lora, "scan": full["scan"]}, cfg)


def test_all_linear_merge_accepts_adapters_found_by_use_and_requires_none():
  params = {"enc": {"kernel": jnp.ones((8, 4)), "w": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
  fn = lambda p, x: ((x @ p["enc"]["kernel"]) @ p["enc"]["w"]) @ p["head"]["kernel"]  # noqa: E731
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K0, apply_fn=fn, example_args=(jnp.ones((1, 8)),))
  assert set(lora["enc"]) == {"kernel", "w"} and "head" not in lora
  merged = jlora.merge(params, lora, cfg)  # the model is unknown to merge: `w` is accepted
  assert not np.allclose(merged["enc"]["w"], params["enc"]["w"])
  jlora.merge(params, {"enc": {"w": lora["enc"]["w"]}}, cfg)  # and none is required
