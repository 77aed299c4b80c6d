"""Bank files (`jlora.save_bank` / `jlora.load_bank`), and `jlora.stack` of loaded and imported adapters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.io.checkpoint.metadata import CorruptCheckpointError, metadata_checksum

PARAMS = {
  "params": {
    "layers_0": {"q_proj": {"kernel": jnp.ones((8, 6))}, "v_proj": {"kernel": jnp.ones((8, 6))}},
    "stacked": {"up": {"kernel": jnp.ones((3, 8, 5))}},
  }
}
LAYOUT = {"up": "sio"}


def _adapter(seed, **kw):
  cfg = jlora.LoraConfig(init_lora_weights=False, layout_pattern=LAYOUT, **kw)
  return jlora.init(PARAMS, cfg, key=jax.random.key(seed)), cfg


def _bank():
  return jlora.stack(
    [
      _adapter(0, r=2, lora_alpha=4.0, target_modules=("q_proj", "up")),
      _adapter(1, r=4, lora_alpha=2.0, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 3}),
      _adapter(2, r=1, target_modules=("v_proj",), use_rslora=True),
    ],
    names=["math", "code", "chat"],
  )


def _assert_same_bank(got, want):
  assert got.config == want.config  # names, configs and entries (ranks, scales, rank axes)
  jax.tree.map(np.testing.assert_array_equal, got.lora, want.lora)
  assert jax.tree.structure(got.lora) == jax.tree.structure(want.lora)


def test_round_trip_is_exact(tmp_path):
  bank = _bank()
  jlora.save_bank(tmp_path, bank, base=PARAMS)
  got = jlora.load_bank(tmp_path, base=PARAMS)
  _assert_same_bank(got, bank)
  assert got.names == ("math", "code", "chat")
  assert got.config.entry(("params", "layers_0", "v_proj", "kernel")).ranks == (0, 3, 1)
  # Saving again replaces it (one step on disk).
  other = jlora.stack([_adapter(5, r=2, target_modules=("q_proj",))], names=["solo"])
  jlora.save_bank(tmp_path, other)
  _assert_same_bank(jlora.load_bank(tmp_path), other)
  assert [d for d in os.listdir(tmp_path) if d.isdigit()] == ["1"]


def test_base_mismatch_is_an_error(tmp_path):
  jlora.save_bank(tmp_path, _bank(), base=PARAMS)
  other = jax.tree.map(lambda x: x, PARAMS)
  other["params"]["layers_0"]["q_proj"]["kernel"] = jnp.ones((8, 7))
  with pytest.raises(ValueError, match=r"adapter 'math' .*layers_0/q_proj/kernel"):
    jlora.load_bank(tmp_path, base=other)


def _meta_file(directory):
  step = max(d for d in os.listdir(directory) if d.isdigit())
  for root, _, files in os.walk(os.path.join(directory, step, "jlora_meta")):
    for f in files:
      if f.endswith(".json") or f == "metadata":
        return os.path.join(root, f)
  raise AssertionError("no metadata file")


def test_corrupted_metadata_is_an_error(tmp_path):
  jlora.save_bank(tmp_path, _bank())
  path = _meta_file(tmp_path)
  with open(path) as f:
    meta = json.load(f)
  meta["names"][0] = "evil"
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
    jlora.load_bank(tmp_path)


def test_adapter_directory_is_not_a_bank(tmp_path):
  lora, cfg = _adapter(0, r=2, target_modules=("q_proj",))
  jlora.save_adapter(tmp_path, lora, cfg)
  with pytest.raises(CorruptCheckpointError, match="jlora.load_adapter"):
    jlora.load_bank(tmp_path)
  with pytest.raises(TypeError, match="jlora.Bank"):
    jlora.save_bank(tmp_path, (lora, cfg))


def test_stack_of_loaded_and_imported_adapters(tmp_path):
  params = {"params": {k: v for k, v in PARAMS["params"].items() if k == "layers_0"}}
  a_cfg = jlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=("q_proj",), init_lora_weights=False)
  b_cfg = jlora.LoraConfig(r=3, lora_alpha=6.0, target_modules=("q_proj", "v_proj"), init_lora_weights=False)
  a = jlora.init(params, a_cfg, key=jax.random.key(0))
  b = jlora.init(params, b_cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path / "a", a, a_cfg, base=params)
  jlora.export_peft(tmp_path / "b", b, b_cfg, base=params)
  loaded = jlora.load_adapter(tmp_path / "a", base=params)
  imported = jlora.import_peft(tmp_path / "b", params)
  bank = jlora.stack([loaded, imported], names=["a", "b"])
  want = jlora.stack([(a, a_cfg), (b, b_cfg)], names=["a", "b"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=0), bank.lora, want.lora)
  q = ("params", "layers_0", "q_proj", "kernel")
  assert bank.config.entry(q).scales == want.config.entry(q).scales == (2.0, 2.0)
  # And the bank of them saves and loads.
  jlora.save_bank(tmp_path / "bank", bank, base=params)
  _assert_same_bank(jlora.load_bank(tmp_path / "bank", base=params), bank)


def test_corrupted_arrays_are_an_error(tmp_path):
  jlora.save_bank(tmp_path, _bank())
  # orbax's merged array store: its own checks catch a flipped byte.
  data_dir = tmp_path / "0" / "adapter" / "d"
  big = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
  original = big.read_bytes()
  blob = bytearray(original)
  blob[len(blob) // 2] ^= 0xFF
  big.write_bytes(bytes(blob))
  with pytest.raises(CorruptCheckpointError, match="truncated or corrupted"):
    jlora.load_bank(tmp_path)
  big.write_bytes(original)
  # Arrays that differ from their saved CRC32 (metadata rewritten with valid checksums around it).
  path = _meta_file(tmp_path)
  with open(path) as f:
    meta = json.load(f)
  meta["adapters"][1]["leaves"][0]["crc32"] ^= 1
  meta["adapters"][1]["meta_crc32"] = metadata_checksum(meta["adapters"][1])
  meta["meta_crc32"] = metadata_checksum(meta)
  with open(path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(CorruptCheckpointError, match=r"data of '[^']*lora_A' fails its checksum"):
    jlora.load_bank(tmp_path)
