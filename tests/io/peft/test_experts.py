"""PEFT files for expert kernels: PEFT's ``target_parameters`` (``ParamWrapper``) format.

Round trips export -> import are exact (the zoo's scanned MoE decoder, experts
``(L, E, D, FF)``; and single kernels stored ``(E, D, F)`` and ``(E, F, D)``).
Against PEFT itself on a tiny ``transformers`` GptOss: `tests/e2e/test_peft_torch.py`.
"""

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora._src.io.peft import experts as peft_experts
from jlora._src.io.peft.names import Keys
from tests import zoo
from tests._peft import EXPERT_ORDER

PREFIX = "base_model.model."
TORCH_NAMES = {"wi": "gate_up_proj", "wo": "down_proj"}


def _read(directory):
  with open(os.path.join(directory, "adapter_config.json")) as f:
    cfg = json.load(f)
  return cfg, safetensors.numpy.load_file(os.path.join(directory, "adapter_model.safetensors"))


def _zoo_names(path, index):
  """The zoo's scanned MoE decoder under PyTorch-like names: experts as parameters."""
  leaf = str(path[-1])
  if leaf in TORCH_NAMES:
    name = TORCH_NAMES[leaf]
    return jlora.PeftParameter(f"model.layers.{index}.mlp.experts.{name}", order=EXPERT_ORDER[name])
  return f"model.layers.{index}.self_attn.{path[-2]}"


@pytest.fixture(scope="module")
def moe():
  return zoo.BUILDERS["moe_scan"]()


def test_scanned_experts_round_trip_exactly(moe, tmp_path):
  cfg = jlora.LoraConfig(
    r=3,
    lora_alpha=6,
    target_modules=("experts/wi", "experts/wo", "q_proj"),
    layers_to_transform=[1],
    rank_pattern={"experts/wo": 5},
    init_lora_weights=False,
  )
  lora = jlora.init(moe.tree, cfg, key=jax.random.key(3), apply_fn=moe.apply_fn, example_args=(moe.inputs,))
  pcfg = jlora.export_peft(tmp_path, lora, cfg, name_map=_zoo_names, base=moe.tree)
  _, tensors = _read(tmp_path)
  e, d, ff = zoo.EXPERTS, zoo.D, zoo.FF
  experts = f"{PREFIX}model.layers.1.mlp.experts"
  assert {k: v.shape for k, v in tensors.items() if "experts" in k} == {
    # gate_up_proj (E, D, FF), registered first: nested inside down_proj's wrapper
    f"{experts}.base_layer.lora_A.weight": (e * 3, ff),
    f"{experts}.base_layer.lora_B.weight": (d, 3 * e),
    f"{experts}.lora_A.weight": (e * 5, d),  # down_proj (E, FF, D), rank 5
    f"{experts}.lora_B.weight": (ff, 5 * e),
  }
  # layer 1 only: PEFT's short names would select layer 0's experts too
  assert pcfg["target_parameters"] == [
    f"model.layers.1.mlp.experts.{n}" for n in ("down_proj", "gate_up_proj")
  ]
  assert pcfg["rank_pattern"] == {r"model\.layers\.1\.mlp\.experts\.down_proj": 5}
  # expert e's rows of lora_A and its columns (rank-major) of lora_B: B_e and A_e (PEFT's in is F)
  wi = lora["params"]["layers"]["experts"]["wi"]
  np.testing.assert_array_equal(tensors[f"{experts}.base_layer.lora_A.weight"][3:6], wi["lora_B"][0, 1])
  np.testing.assert_array_equal(tensors[f"{experts}.base_layer.lora_B.weight"][:, 1::e], wi["lora_A"][0, 1])
  lora2, cfg2 = jlora.import_peft(
    tmp_path, moe.tree, name_map=_zoo_names, apply_fn=moe.apply_fn, example_args=(moe.inputs,)
  )
  chex.assert_trees_all_equal(lora2, lora)
  assert cfg2.layers_to_transform == (1,)
  want = moe.apply_fn(jlora.merge(moe.tree, lora, cfg), moe.inputs)
  np.testing.assert_array_equal(moe.apply_fn(jlora.merge(moe.tree, lora2, cfg2), moe.inputs), want)


def _single(shape, layout, key=0):
  tree = {"moe": {"experts": {"w": jax.random.normal(jax.random.key(key), shape)}}}
  cfg = jlora.LoraConfig(
    r=2, lora_alpha=3, target_modules=("w",), layout_pattern={"w": layout}, init_lora_weights=False
  )
  return tree, cfg, jlora.init(tree, cfg, key=jax.random.key(key + 1))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout,shape", [("sio", (4, 6, 5)), ("soi", (4, 5, 6)), ("ios", (6, 5, 4))])
def test_single_expert_kernel_round_trip_and_delta(tmp_path, layout, shape, transposed):
  tree, cfg, lora = _single(shape, layout)
  param = jlora.PeftParameter("model.moe.experts.w", transposed=transposed)
  name_map = lambda path, index: param  # noqa: E731
  jlora.export_peft(tmp_path, lora, cfg, name_map=name_map)
  _, tensors = _read(tmp_path)
  la, lb = (tensors[f"{PREFIX}model.moe.experts.lora_{x}.weight"] for x in "AB")
  # PEFT's get_delta_weight, written out: lora_A (E*r, in) expert-major, lora_B (out, r*E) rank-major
  e, r = 4, 2
  a3, b3 = la.reshape(e, r, -1), lb.reshape(lb.shape[0], r, e)
  peft_delta = np.einsum("ore,eri->e" + ("io" if transposed else "oi"), b3, a3) * 3 / 2
  kernel = np.moveaxis(np.asarray(tree["moe"]["experts"]["w"]), layout.index("s"), 0)  # PyTorch's (E, P, Q)
  merged = np.moveaxis(np.asarray(jlora.merge(tree, lora, cfg)["moe"]["experts"]["w"]), layout.index("s"), 0)
  np.testing.assert_allclose(peft_delta, merged - kernel, atol=1e-6)
  lora2, _ = jlora.import_peft(tmp_path, tree, name_map=name_map, layout_pattern={"w": layout})
  chex.assert_trees_all_equal(lora2, lora)


def test_peft_format_errors(moe, tmp_path):
  cfg = jlora.LoraConfig(r=3, target_modules=("experts/wi", "experts/wo"), init_lora_weights=False)
  lora = jlora.init(moe.tree, cfg, key=jax.random.key(3), apply_fn=moe.apply_fn, example_args=(moe.inputs,))
  same_order = lambda path, i: jlora.PeftParameter(  # noqa: E731
    f"model.layers.{i}.mlp.experts.{TORCH_NAMES[path[-1]]}"
  )
  with pytest.raises(ValueError, match=r"share an `order`.*order="):
    jlora.export_peft(tmp_path, lora, cfg, name_map=same_order)
  fused = lambda path, i: jlora.PeftParameter(f"model.layers.{i}.mlp.experts.gate_up_proj")  # noqa: E731
  with pytest.raises(ValueError, match=r"experts/wi.*experts/wo.*both map to PEFT key.*gate_up_proj"):
    jlora.export_peft(tmp_path, lora, cfg, name_map=fused)
  with pytest.raises(ValueError, match=r"experts/wi.*two stacked axes.*PeftParameter"):
    jlora.export_peft(tmp_path, lora, cfg, name_map=lambda path, i: f"model.layers.{i}.mlp.experts")
  with pytest.raises(ValueError, match=r"No PEFT name map.*experts/wi.*PeftParameter"):
    jlora.export_peft(tmp_path, lora, cfg)
  dropout = dataclasses.replace(cfg, lora_dropout=0.1)
  with pytest.raises(ValueError, match=r"experts/wi.*lora_dropout.*dataclasses.replace"):
    jlora.export_peft(tmp_path, lora, dropout, name_map=_zoo_names)
  tree, cfg4, lora4 = _single((4, 3, 6, 5), "siio")
  with pytest.raises(ValueError, match=r"moe/experts/w.*layout siio.*3-D parameters"):
    jlora.export_peft(tmp_path, lora4, cfg4, name_map=lambda path, i: jlora.PeftParameter("m.experts.w"))
  assert not os.path.exists(os.path.join(tmp_path, "adapter_config.json"))


def test_import_refuses_a_file_missing_parameters_its_config_targets(moe, tmp_path):
  cfg = jlora.LoraConfig(r=3, target_modules=("experts/wi", "experts/wo"), init_lora_weights=False)
  lora = jlora.init(moe.tree, cfg, key=jax.random.key(3), apply_fn=moe.apply_fn, example_args=(moe.inputs,))
  pcfg = jlora.export_peft(tmp_path, lora, cfg, name_map=_zoo_names, base=moe.tree)
  assert pcfg["target_parameters"] == ["down_proj", "gate_up_proj"]
  _, tensors = _read(tmp_path)
  kept = {k: v for k, v in tensors.items() if ".layers.0." not in k}
  safetensors.numpy.save_file(
    kept, os.path.join(tmp_path, "adapter_model.safetensors")
  )  # as PEFT writes: no checksum
  with pytest.raises(
    ValueError, match=r"`target_parameters`.*model\.layers\.0\.mlp\.experts\.down_proj.*no tensors"
  ):
    jlora.import_peft(
      tmp_path, moe.tree, name_map=_zoo_names, apply_fn=moe.apply_fn, example_args=(moe.inputs,)
    )


def test_peft_parameter_keys_nest_by_registration_order():
  up, down = (jlora.PeftParameter(f"m.layers.0.experts.{n}", order=o) for n, o in EXPERT_ORDER.items())
  keys = Keys([down, up])
  assert keys(up) == tuple(f"{PREFIX}m.layers.0.experts.base_layer.lora_{x}.weight" for x in "AB")
  assert keys(down) == tuple(f"{PREFIX}m.layers.0.experts.lora_{x}.weight" for x in "AB")
  assert Keys([down])(down) == keys(down)


def test_mapping_inverts(tmp_path):
  a = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
  b = -np.arange(4 * 2 * 5, dtype=np.float32).reshape(4, 2, 5)
  for roles in ("sio", "soi"):
    for t in (False, True):
      p = jlora.PeftParameter("m.e.w", transposed=t)
      la, lb = peft_experts.to_peft(a, b, jlora.Layout(roles), p, "w")
      got = peft_experts.from_peft(la, lb, jlora.Layout(roles), p, experts=4, where="w")
      np.testing.assert_array_equal(got[0], a)
      np.testing.assert_array_equal(got[1], b)
