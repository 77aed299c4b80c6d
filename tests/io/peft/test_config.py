"""adapter_config.json (`jlora._src.io.peft.config`): fields jlora refuses, each a clear error."""

import os

import pytest

import jlora
from tests import _peft as P


def test_bad_config_fields(exported):
  d, tree = exported
  cfg, _ = P.read(d)
  P.rewrite(d, config={**cfg, "frobnicate": 1})
  with pytest.raises(ValueError, match=r"field\(s\) \['frobnicate'\]"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "lora_bias": True})
  with pytest.raises(ValueError, match="`lora_bias` must be False"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "use_dora": True})  # DoRA without its magnitude vectors
  with pytest.raises(ValueError, match=r"lacks DoRA's '.*\.lora_magnitude_vector'"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "init_lora_weights": "pissa"})
  with pytest.raises(ValueError, match="PiSSA"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "lora_dropout": 2.0})
  with pytest.raises(ValueError, match="lora_dropout"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "r": 5})
  with pytest.raises(ValueError, match="has rank 3, but adapter_config.json gives rank 5"):
    jlora.import_peft(d, tree)
  P.rewrite(d, config={**cfg, "r": 3, "rank_pattern": {"(?i)q_proj": 3}})  # compiles alone, not inside PEFT's
  with pytest.raises(
    ValueError, match=r"`rank_pattern`/`alpha_pattern` key '\(\?i\)q_proj' is not a valid regex"
  ):
    jlora.import_peft(d, tree)
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    jlora.import_peft(d, tree)
  with open(os.path.join(d, "adapter_config.json"), "w") as f:  # nested past Python's recursion limit
    f.write('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
  with pytest.raises(ValueError, match="not valid JSON .*recursion.*the adapter config is corrupted"):
    jlora.import_peft(d, tree)
