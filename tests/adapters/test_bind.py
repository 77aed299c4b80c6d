"""Reading an adapter tree against a base tree (`jlora._src.adapters.bind`): errors name the path, layouts
the shapes leave open, layer selection, all-linear; a bound adapter as a `LoraValue`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.adapters import dora
from jlora._src.adapters.bind import lora_value
from jlora._src.adapters.spec import Bound, delta
from tests import zoo


def test_bind_errors_name_the_path():
  tree = zoo.two_layer_tree()
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


def test_lora_value_is_the_kernel_plus_its_update_with_dora_scaled_and_refuses_dora_in_a_bank():
  spec = zoo.stacked_adapter_spec()
  kernel = jax.random.normal(jax.random.key(0), spec.kernel_shape)
  a = jax.random.normal(jax.random.key(1), spec.a_shape)
  b = jax.random.normal(jax.random.key(2), spec.b_shape)
  updated = np.asarray(kernel + delta(spec, a, b))
  np.testing.assert_allclose(lora_value(Bound(spec, kernel, a, b)).dense(), updated, rtol=1e-5, atol=1e-5)
  m = jnp.ones(dora.magnitude_shape(spec))  # (stacked 2, out 5): m / ||V|| scales each output feature
  dense = np.asarray(lora_value(Bound(spec, kernel, a, b, m)).dense())
  np.testing.assert_allclose(dense[:, 1], np.asarray(kernel[:, 1]), rtol=1e-6)  # layer 1 not adapted
  for layer in spec.layers:
    v = updated[:, layer]
    np.testing.assert_allclose(dense[:, layer], v / np.linalg.norm(v, axis=0), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"at 'w' is a DoRA adapter .* routes plain LoRA adapters only"):
    lora_value(Bound(spec, kernel, a[None], b[None], m), routed=(0.5,))


def test_a_grouped_conv_adapter_joins_no_bank():
  def fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
      x, p["g"]["kernel"], (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
    )

  x = jnp.ones((2, 5, 5, 4))
  read = dict(apply_fn=fn, example_args=(x,))
  for out, r, match in (
    (4, 4, r"'g/kernel' adapts a grouped convolution.*a bank"),
    (8, 2, r"grouped conv.*bank"),
  ):
    params = {"g": {"kernel": jnp.ones((3, 3, 2, out))}}
    cfg = jlora.LoraConfig(r=r, target_modules=("g",), init_lora_weights=False)
    pairs = [(jlora.init(params, cfg, key=jax.random.key(i), **read), cfg) for i in range(2)]
    with pytest.raises(ValueError, match=match):
      bank = jlora.stack(pairs)  # lora_B (r / 2, out) has no rank axis unless out == r
      jlora.wrap(fn, bank.config)(params, bank.lora, x, adapter_ids=jnp.array([0, 1]))
