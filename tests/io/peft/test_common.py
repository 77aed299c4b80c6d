"""Shared PEFT rules (`jlora._src.io.peft.common`): which modules a PEFT config selects, checked against
PEFT's own `check_target_module_exists`."""

import pytest

from jlora._src.io.peft.common import PeftTargets


@pytest.mark.parametrize(
  "fields",
  [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "self_attn.v_proj"], "layers_to_transform": [1, 3]},
    {
      "target_modules": ["q_proj", "model.layers.0.mlp.up"],
      "layers_to_transform": 0,
      "layers_pattern": "layers",
    },
    {"target_modules": ["up"], "layers_to_transform": [2], "layers_pattern": ["blocks", "h"]},
    {"target_modules": r".*\.(q|v)_proj", "exclude_modules": r".*layers\.2\..*"},
    {"target_modules": ["q_proj", "up"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "up"], "modules_to_save": ["mlp"]},
  ],
)
def test_peft_targets_select_as_peft_checks_them(fields):
  peft = pytest.importorskip("peft")
  from peft.tuners.tuners_utils import check_target_module_exists  # noqa: PLC0415

  names = [
    f"{root}.{i}.{m}"
    for root in ("model.layers", "blocks", "transformer.h")
    for i in range(4)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn", "mlp.up", "mlp")
  ] + ["model.layers", "lm_head", "q_proj", "model.layers.0.mlp.up.experts.1.up"]
  cfg = peft.LoraConfig(**fields)
  got = {n for n in names if PeftTargets.of(fields).selects(n)}
  want = {n for n in names if check_target_module_exists(cfg, n)}  # falsy for an excluded module
  assert got == want and got
