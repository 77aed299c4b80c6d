"""Reading adapter_model.safetensors (`jlora._src.io.peft.reader`): truncated, pickled and edited files."""

import os

import jax
import pytest

import jlora
from tests import _peft as P


def test_truncated_and_pickled_files(exported):
  d, tree = exported
  path = os.path.join(d, "adapter_model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 7)
  with pytest.raises(ValueError, match="truncated or corrupted"):
    jlora.import_peft(d, tree)
  os.remove(path)
  with open(os.path.join(d, "adapter_model.bin"), "wb") as f:
    f.write(b"not unpickled")
  with pytest.raises(ValueError, match="never unpickles"):
    jlora.import_peft(d, tree)


@pytest.mark.parametrize("target", ["config", "weights"])
def test_a_flipped_bit_in_an_exported_file_is_an_error(tmp_path, target):
  tree = P.linen_tree()
  cfg = P.config()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.export_peft(tmp_path, lora, cfg, base=tree)
  name = "adapter_config.json" if target == "config" else "adapter_model.safetensors"
  path = os.path.join(tmp_path, name)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  if target == "config":  # lora_alpha 6 -> 7: still valid JSON, a different adapter
    i = data.index(b'"lora_alpha": 6')
    data[i + len(b'"lora_alpha": ')] ^= 0x01
  else:  # one bit of the last tensor's data
    data[-3] ^= 0x10
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match="fail the checksum jlora wrote"):
    jlora.import_peft(tmp_path, tree)
