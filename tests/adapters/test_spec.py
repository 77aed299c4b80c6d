"""Adapter specs (`jlora._src.adapters.spec`): which kernels a config adapts, in which layout and layers,
and the factors' canonical forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.adapters.spec import canonical, delta, from_canonical
from tests import zoo


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


def test_canonical_forms_round_trip_and_delta_fills_only_the_selected_layers():
  spec = zoo.stacked_adapter_spec()
  assert (spec.a_shape, spec.b_shape, spec.stacked_shape) == ((4, 2, 2), (2, 2, 5), (2,))
  a = jax.random.normal(jax.random.key(1), spec.a_shape)
  b = jax.random.normal(jax.random.key(2), spec.b_shape)
  ca, cb = canonical(spec, a, b)
  assert (ca.shape, cb.shape) == ((2, 4, 2), (2, 2, 5))  # A (*stacked, *fan_in, r), B (*stacked, r, *fan_out)
  back = from_canonical(spec, ca, cb)
  np.testing.assert_array_equal(back[0], a)
  np.testing.assert_array_equal(back[1], b)
  want = np.zeros((4, 3, 5), np.float32)
  for j, layer in enumerate(spec.layers):
    want[:, layer, :] = 0.5 * np.asarray(a[:, j, :]) @ np.asarray(b[:, j, :])
  np.testing.assert_allclose(delta(spec, a, b), want, rtol=1e-5, atol=1e-6)
