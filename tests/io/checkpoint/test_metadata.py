"""Tests for checkpoint metadata (`jlora._src.io.checkpoint.metadata`): no disk."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.io.checkpoint import metadata as fmt

CFG = jlora.LoraConfig(r=2, lora_alpha=16, target_modules=("q_proj",))


def _tree():
  return {"layers": {i: {"q_proj": {"kernel": jnp.ones((4, 6))}} for i in range(2)}}


def _meta(**kw):
  tree = _tree()
  lora = jlora.init(tree, CFG, key=jax.random.key(0))
  return fmt.build_metadata(lora, CFG, **kw), lora, tree


def test_build_records_paths_shapes_crcs_and_a_checksum():
  meta, lora, tree = _meta(base=_tree())
  assert meta["format_version"] == 2 and set(meta) == fmt._FIELDS[2]
  a = lora["layers"][1]["q_proj"]["kernel"]["lora_A"]
  rec = meta["leaves"][2]
  assert rec == {
    "path": ["layers", 1, "q_proj", "kernel", "lora_A"],  # int key kept
    "shape": [4, 2],
    "dtype": "float32",
    "crc32": zlib.crc32(np.asarray(a).tobytes()),
  }
  assert meta["base"][0] == {
    "path": ["layers", 0, "q_proj", "kernel"],
    "kind": "lora",
    "shape": [4, 6],
    "dtype": "float32",
  }
  # The checksum covers the canonical JSON of the other fields, independent of key order and spacing.
  rest = {k: meta[k] for k in sorted(meta, reverse=True) if k != "meta_crc32"}
  canon = json.dumps(rest, sort_keys=True, separators=(",", ":"))
  assert meta["meta_crc32"] == zlib.crc32(canon.encode())
  parsed = fmt.parse_metadata(json.loads(json.dumps(meta, indent=3)), "here")
  assert parsed.config == CFG and parsed.format_version == 2 and parsed.leaves[2] == rec


def test_every_single_bit_flip_of_the_metadata_is_detected():
  meta, _, _ = _meta(base=_tree())
  blob = json.dumps(meta).encode()
  missed = []
  for i in range(len(blob)):
    flipped = bytearray(blob)
    flipped[i] ^= 1 << (i % 8)
    try:
      fmt.parse_metadata(json.loads(bytes(flipped)), "here")
    except (ValueError, UnicodeDecodeError):  # json's or jlora's; all name the problem
      continue
    missed.append((i, bytes(flipped[max(0, i - 10) : i + 10])))
  assert not missed, missed[:5]


def test_checksum_error_names_where_and_both_values():
  meta, _, _ = _meta()
  meta["config"]["lora_alpha"] = 96.0
  with pytest.raises(
    fmt.CorruptCheckpointError, match=r"metadata of step 3 of '/x' fails its checksum \(crc32 0x"
  ):
    fmt.parse_metadata(meta, "step 3 of '/x'")
  meta["meta_crc32"] = "abc"
  with pytest.raises(ValueError, match=r"fails its checksum \(crc32 0x[0-9a-f]{8}, saved 'abc'\)"):
    fmt.parse_metadata(meta, "here")


def test_version_1_has_no_checksum_and_version_2_requires_it():
  meta, _, _ = _meta()
  v1 = {k: v for k, v in meta.items() if k != "meta_crc32"} | {"format_version": 1}
  v1["config"] = dict(v1["config"], lora_alpha=96.0)
  assert fmt.parse_metadata(v1, "here").config.lora_alpha == 96.0
  del meta["meta_crc32"]
  with pytest.raises(ValueError, match=r"missing field\(s\) \['meta_crc32'\]"):
    fmt.parse_metadata(meta, "here")
  with pytest.raises(ValueError, match=r"`format_version` is 3; this jlora .* reads versions 1..2"):
    fmt.parse_metadata(dict(meta, format_version=3), "here")
  with pytest.raises(ValueError, match=r"`format` is 'other', expected 'jlora.adapter'"):
    fmt.parse_metadata(dict(meta, format="other"), "here")
  with pytest.raises(ValueError, match="expected a JSON object, got list"):
    fmt.parse_metadata([], "here")


def _resigned(meta, **changes):
  out = dict(meta, **changes)
  out["meta_crc32"] = fmt.metadata_checksum(out)
  return out


@pytest.mark.parametrize(
  ("change", "message"),
  [
    ({"leaves": []}, r"`leaves` must be a non-empty list"),
    ({"leaves": [{"path": ["a"], "shape": [2]}]}, r"`leaves\[0\]` must have exactly the fields"),
    ({"leaves": [{"path": [], "shape": [2], "dtype": "float32", "crc32": 1}]}, r"`leaves\[0\]` is malformed"),
    (
      {"leaves": [{"path": ["a"], "shape": [-1], "dtype": "float32", "crc32": 1}]},
      r"`leaves\[0\]` is malformed",
    ),
    ({"leaves": [{"path": ["a"], "shape": [2], "dtype": "f32", "crc32": 1}]}, r"`leaves\[0\]` is malformed"),
    (
      {"leaves": [{"path": ["a"], "shape": [2], "dtype": "float32", "crc32": True}]},
      r"`leaves\[0\]` is malformed",
    ),
    ({"base": {"a": 1}}, r"`base` must be null or a list"),
    (
      {"base": [{"path": ["a"], "kind": "other", "shape": [2], "dtype": "float32"}]},
      r"`base\[0\]` is malformed",
    ),
    (
      {"base": [{"path": ["a"], "kind": "lora", "shape": [2], "dtype": "float32", "norm": -1.0}]},
      r"`base\[0\]` is malformed",
    ),
    (
      {"base": [{"path": ["a"], "kind": "lora", "shape": [2], "dtype": "float32", "norm": "1"}]},
      r"`base\[0\]` is malformed",
    ),
    (
      {"opt_state": [{"path": ["a"], "shape": [2], "dtype": "float32", "crc32": 1}]},
      r"`opt_state\[0\]` is malformed",
    ),
    ({"config": {"r": 0}}, r"its `config` is not a valid LoraConfig: .*`r` must be a positive integer"),
  ],
)
def test_malformed_fields_are_named(change, message):
  meta, _, _ = _meta()
  with pytest.raises(fmt.CorruptCheckpointError, match=message):
    fmt.parse_metadata(_resigned(meta, **change), "here")


def test_check_base_names_the_first_mismatching_path():
  meta, _, tree = _meta(base=_tree())
  parsed = fmt.parse_metadata(meta, "here")
  fmt.check_base(parsed, tree, "here")
  tree["layers"][1]["q_proj"]["kernel"] = jnp.ones((4, 7))
  with pytest.raises(ValueError, match=r"at 'layers/1/q_proj/kernel': .*shape \(4, 6\).*\(4, 7\)"):
    fmt.check_base(parsed, tree, "here")
  with pytest.raises(ValueError, match=r"leaf at 'layers/0/q_proj/kernel'.*no leaf there"):
    fmt.check_base(parsed, {"params": tree}, "here")


def _pissa(init="pissa"):
  k1, k2 = jax.random.split(jax.random.key(5))
  params = {
    "q_proj": {"kernel": jax.random.normal(k1, (24, 16))},
    "o_proj": {"kernel": jax.random.normal(k2, (16, 24))},
  }
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj", "o_proj"), init_lora_weights=init)
  lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(6))
  return params, cfg, lora, residual


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_residual_adapters_record_the_residual_norm_and_refuse_the_original_base(init):
  params, cfg, lora, residual = _pissa(init)
  meta = fmt.build_metadata(lora, cfg, base=residual)
  norms = {rec["path"][0]: rec["norm"] for rec in meta["base"]}
  for name, rec_norm in norms.items():  # an independent float64 norm of the residual kernel
    want = np.linalg.norm(np.asarray(residual[name]["kernel"], np.float64))
    assert abs(rec_norm - want) <= 1e-6 * want, name
  parsed = fmt.parse_metadata(meta, "here")
  fmt.check_base(parsed, residual, "here")
  with pytest.raises(ValueError, match=r"'o_proj/kernel' has Frobenius norm .*count that part twice"):
    fmt.check_base(parsed, params, "here")
  nearly = jax.tree.map(lambda w: w * (1 + 1e-4), residual)  # any other kernel, however close, is refused
  with pytest.raises(ValueError, match=r"trained on the residual base.*to_plain_lora"):
    fmt.check_base(parsed, nearly, "here")


def test_plain_adapters_record_no_norm():
  meta, _, _ = _meta(base=_tree())
  assert all("norm" not in rec for rec in meta["base"])


def test_a_residual_on_a_quantized_base_is_checked_dequantized(tmp_path):
  params, cfg, _, _ = _pissa()
  q = jlora.quantize(params, qtype="nf4", block_size=8)
  lora, residual = jlora.init_with_residual(q, cfg, key=jax.random.key(6))
  jlora.save_adapter(tmp_path / "a", lora, cfg, base=residual)
  jlora.load_adapter(tmp_path / "a", base=residual)
  with pytest.raises(ValueError, match=r"not that residual"):
    jlora.load_adapter(tmp_path / "a", base=q)


def test_build_rejects_what_cannot_be_saved():
  lora = {"a.b": {"c": jnp.ones(2)}, "a": {"b.c": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"stored under the same orbax name 'a.b.c'"):
    fmt.build_metadata(lora, CFG)
  with pytest.raises(TypeError, match=r"leaf 'a/b' is a list, not an array"):
    fmt.build_metadata({"a": {"b": [1]}}, CFG)
  with pytest.raises(ValueError, match="no arrays"):
    fmt.build_metadata({}, CFG)
  with pytest.raises(TypeError, match=r"`config` must be a jlora.LoraConfig; got dict"):
    fmt.build_metadata({"a": jnp.ones(2)}, {"r": 2})
