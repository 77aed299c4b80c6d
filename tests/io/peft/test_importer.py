"""`jlora.import_peft` (`jlora._src.io.peft.importer`): round trips, the config it reconstructs, PEFT's own
files."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import _peft as P


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip(tmp_path, dtype):
  tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), P.linen_tree())
  cfg = P.config(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4.0}, modules_to_save=("lm_head",))
  lora = jlora.init(tree, cfg, key=jax.random.key(2))
  jlora.export_peft(tmp_path, lora, cfg, base=tree)
  lora2, cfg2 = jlora.import_peft(tmp_path, tree)
  chex.assert_trees_all_equal(lora2, lora)
  chex.assert_trees_all_equal_dtypes(lora2, lora)
  # The imported config computes the same model: compare merged trees (exact ops).
  chex.assert_trees_all_close(jlora.merge(tree, lora2, cfg2), jlora.merge(tree, lora, cfg), atol=0, rtol=0)


@pytest.fixture(scope="module", params=["gemma_style", "gpt2_style", "maxtext_scan"])
def family(request):
  from tests import zoo  # noqa: PLC0415

  case = zoo.BUILDERS[request.param]()
  kw = dict(apply_fn=case.apply_fn, example_args=(case.inputs,))
  lora = jlora.init(case.tree, case.config, key=jax.random.key(3), **kw)
  return case, lora, kw


def test_model_families_export_and_import_exactly(family, tmp_path):
  case, lora, kw = family
  pcfg = jlora.export_peft(tmp_path, lora, case.config, base=case.tree)
  _, tensors = P.read(tmp_path)
  names = {k.rsplit(".lora_", 1)[0][len(P.PREFIX) :] for k in tensors}
  if case.name == "gemma_style":  # the Hugging Face Gemma module names, fused weights split
    assert "model.layers.1.self_attn.k_proj" in names and "model.layers.1.self_attn.v_proj" in names
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert pcfg["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in names})
    assert tensors[f"{P.PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (16, 2)  # (N*H, r)
  if case.name == "gpt2_style":
    assert pcfg["fan_in_fan_out"] is False  # h_0.c_attn is not under `transformer.h.N.attn`
    assert tensors[f"{P.PREFIX}h.0.c_attn.lora_A.weight"].shape == (2, 16)  # (r, in)
    assert pcfg["target_modules"] == list(case.config.target_modules)
  if case.name == "maxtext_scan":  # the layer axis (stored second) becomes one module per layer
    assert {f"layers.{i}.q_proj" for i in range(2)} <= names
  lora2, cfg2 = jlora.import_peft(tmp_path, case.tree, **kw)
  got = jlora.wrap(case.apply_fn, cfg2)(case.tree, lora2, case.inputs)
  want = jlora.wrap(case.apply_fn, case.config)(case.tree, lora, case.inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "fields",
  [
    {"target_modules": ["v_proj", "q_proj"]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
  ],
  ids=["list", "layers_to_transform"],
)
@P.PEFT_WARNINGS
def test_peft_round_trip_keeps_target_modules_as_written(tmp_path, fields):
  tree = P.attn_tree()
  torch, net = P.attn_torch(tree)
  import peft  # noqa: PLC0415

  torch.manual_seed(1)
  pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **fields))
  pm.save_pretrained(str(tmp_path / "peft"))
  written, _ = P.read(tmp_path / "peft")
  lora, cfg = jlora.import_peft(tmp_path / "peft", tree)
  assert cfg.target_modules == tuple(written["target_modules"])  # as PEFT wrote them (PEFT's order)
  assert cfg.layers_to_transform == (None if "layers_to_transform" not in fields else (1,))
  modules = 2 * (P.LAYERS if "layers_to_transform" not in fields else 1)
  assert len(jax.tree_util.tree_leaves(lora)) == 2 * modules  # lora_A and lora_B of each adapted module
  back = jlora.export_peft(tmp_path / "back", lora, cfg, base=tree, task_type=None)
  again, _ = P.read(tmp_path / "back")
  for field in ("target_modules", "layers_to_transform", "exclude_modules"):
    assert again[field] == written[field], field
  assert back["rank_pattern"] == {} and back["alpha_pattern"] == {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = P.peft_outputs(tmp_path / "back", tree)
  with torch.no_grad():
    want = pm.eval()(torch.tensor(P.XS)).numpy()
  np.testing.assert_allclose(theirs, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(jlora.wrap(P.attn_apply, cfg)(tree, lora, P.XS), want, atol=1e-5, rtol=0)
