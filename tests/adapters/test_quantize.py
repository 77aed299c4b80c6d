"""Tests for `jlora.quantize` / `jlora.dequantize`: formats, numerics, bytes, pytree behaviour, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import ndtri

import jlora
from jlora._src.adapters import quantize as Q
from jlora._src.core import qarray


def test_nf4_is_the_qlora_code():
  # QLoRA appendix E: 8 positive and 7 negative normal quantiles with offset 0.9677083, plus zero,
  # normalised to [-1, 1]. The table agrees with this derivation to float32 rounding.
  pos = np.asarray(ndtri(np.linspace(0.9677083, 0.5, 9)[:-1]))
  neg = -np.asarray(ndtri(np.linspace(0.9677083, 0.5, 8)[:-1]))
  derived = np.sort(np.concatenate([pos, [0.0], neg]))
  derived /= np.abs(derived).max()
  np.testing.assert_allclose(qarray.NF4, derived, atol=3e-7)
  assert qarray.NF4[7] == 0.0 and qarray.NF4[0] == -1.0 and qarray.NF4[-1] == 1.0


def test_nf4_round_trip_error_is_the_code_s():
  x = jax.random.normal(jax.random.key(0), (256, 1024))
  q = Q.quantize_array(x, qtype="nf4", block_size=64)
  back = q.dequantize()
  # Every value maps to its nearest code point times its block's absmax.
  blocks = np.asarray(x).reshape(256, 16, 64)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  nearest = qarray.NF4[np.abs(blocks[..., None] / absmax[..., None] - qarray.NF4).argmin(-1)] * absmax
  np.testing.assert_allclose(np.asarray(back).reshape(256, 16, 64), nearest, rtol=1e-6, atol=1e-6)
  rel = float(jnp.sqrt(jnp.mean((back - x) ** 2)) / jnp.std(x))
  assert 0.05 < rel < 0.12, rel  # 4-bit normal-float error on Gaussian weights


@pytest.mark.parametrize("qtype, qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block_size", [32, None])
def test_integer_formats_are_symmetric_absmax(qtype, qmax, block_size):
  x = jax.random.normal(jax.random.key(1), (64, 96))
  q = Q.quantize_array(x, qtype=qtype, block_size=block_size)
  xs = np.asarray(x)
  if block_size is None:
    scale = np.abs(xs).max(0) / qmax
    want = np.round(xs / scale) * scale
  else:
    b = xs.reshape(64, 3, 32)
    scale = np.abs(b).max(-1, keepdims=True) / qmax
    want = (np.round(b / scale) * scale).reshape(64, 96)
  np.testing.assert_allclose(q.dequantize(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "qtype, double_quant, bytes_per_param",
  [
    ("nf4", False, 0.5 + 4 / 64),
    ("nf4", True, 0.5 + 1 / 64),
    ("int4", False, 0.5 + 4 / 64),
    ("int8", False, 1 + 4 / 64),
  ],
)
def test_bytes_are_what_the_format_promises(qtype, double_quant, bytes_per_param):
  x = jax.random.normal(jax.random.key(2), (512, 1024), jnp.bfloat16)
  q = Q.quantize_array(x, qtype=qtype, block_size=64, double_quant=double_quant)
  assert q.nbytes / x.size == pytest.approx(bytes_per_param, rel=0.01)
  assert q.dequantize().dtype == jnp.bfloat16


def test_double_quantization_changes_scales_little():
  x = jax.random.normal(jax.random.key(3), (128, 512))
  plain = Q.quantize_array(x, qtype="nf4", block_size=64).dequantize()
  dq = Q.quantize_array(x, qtype="nf4", block_size=64, double_quant=True)
  assert dq.scales.dtype == jnp.int8
  rel = float(jnp.abs(dq.dequantize() - plain).max() / jnp.abs(plain).max())
  assert rel < 0.01, rel


def test_a_quantized_tree_is_a_pytree_jit_and_eval_shape_see():
  params = {"layer": {"kernel": jax.random.normal(jax.random.key(4), (32, 64)), "bias": jnp.zeros(64)}}
  q = jlora.quantize(params, qtype="nf4", block_size=32)
  assert (
    isinstance(q["layer"]["kernel"], qarray.QuantizedArray) and q["layer"]["bias"] is params["layer"]["bias"]
  )
  shapes = jax.eval_shape(lambda t: t, q)
  assert shapes["layer"]["kernel"].codes.shape == (32, 32)
  out = jax.jit(lambda t: jlora.dequantize(t)["layer"]["kernel"])(q)
  np.testing.assert_array_equal(out, jlora.dequantize(q)["layer"]["kernel"])
  leaves = jax.tree_util.tree_leaves(q)
  assert {x.dtype for x in leaves} == {jnp.dtype("uint8"), jnp.dtype("float32")}


def test_default_targets_skip_embeddings_and_the_head():
  params = {
    "embed": {"embedding": jnp.ones((10, 8))},
    "token_embedding": {"embeddings": jnp.ones((10, 8))},  # keras-hub's (Gemma's tied head too)
    "q_proj": {"kernel": jnp.ones((8, 8))},
    "lm_head": {"kernel": jnp.ones((8, 10))},
  }
  q = jlora.quantize(params, qtype="int8", block_size=None)
  assert [k for k in params if qarray.is_quantized(q[k][next(iter(q[k]))])] == ["q_proj"]
  only = jlora.quantize(params, qtype="int8", block_size=None, targets=("lm_head",))
  assert qarray.is_quantized(only["lm_head"]["kernel"]) and not qarray.is_quantized(only["q_proj"]["kernel"])


@pytest.mark.parametrize(
  "kwargs, tree, match",
  [
    (dict(qtype="fp4"), None, r"`qtype` must be one of \('nf4', 'int4', 'int8'\)"),
    (
      dict(qtype="nf4", block_size=48),
      None,
      r"`block_size`=48 does not divide the last axis \(size 64\) of 'w/kernel'",
    ),
    (dict(qtype="nf4", block_size=0), None, "`block_size` must be a positive integer"),
    (dict(qtype="nf4", block_size=3), None, "must be even"),
    (dict(qtype="nf4", block_size=None, double_quant=True), None, "needs a `block_size`"),
    (dict(qtype="int8", targets=("nope",)), None, "`targets` entry 'nope' matches no floating weight"),
    (
      dict(qtype="int8", targets=("w",)),
      {"w": {"kernel": jnp.ones((4, 8), jnp.int8)}},
      "matches no floating weight",
    ),
  ],
)
def test_bad_input_names_the_field_or_path(kwargs, tree, match):
  tree = tree if tree is not None else {"w": {"kernel": jnp.ones((16, 64))}}
  with pytest.raises((ValueError, TypeError), match=match):
    jlora.quantize(tree, **kwargs)


def test_an_integer_tree_is_an_error_naming_a_leaf():
  with pytest.raises(ValueError, match=r"no floating weight .* \(leaf 'w/kernel' is int8"):
    jlora.quantize({"w": {"kernel": jnp.ones((4, 8), jnp.int8)}}, qtype="int8")


def test_quantizing_twice_is_an_error():
  q = jlora.quantize({"w": {"kernel": jnp.ones((16, 64))}}, qtype="nf4")
  with pytest.raises(ValueError, match=r"already quantized \(at 'w/kernel'\)"):
    jlora.quantize(q, qtype="nf4")


@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_an_error_or_non_finite_under_jit(qtype, bad):
  w = jnp.ones((2, 8)).at[1, 3].set(bad)
  tree = {"ok": {"kernel": jnp.ones((2, 8))}, "q_proj": {"kernel": w}}
  with pytest.raises(
    ValueError, match=rf"'q_proj/kernel' \(2, 8\) has 1 non-finite .* index \(1, 3\), is {bad}"
  ):
    jlora.quantize(tree, qtype=qtype, block_size=8)
  # Traced, it cannot raise: the entry's block dequantizes to non-finite values, not a finite code.
  for block_size, double_quant in ((8, False), (None, False), (8, True)):
    opts = dict(qtype=qtype, block_size=block_size, double_quant=double_quant)
    got = jax.jit(lambda t, o=opts: jlora.dequantize(jlora.quantize(t, **o)))(tree)
    assert not bool(jnp.isfinite(got["q_proj"]["kernel"][1, 3]))
