"""jlora's PEFT files against PEFT on PyTorch models built by ``transformers``, with the same base weights.

A tiny Llama (`tests._peft.torch_llama`: ``LlamaForCausalLM`` and its Flax copy): PEFT's saved adapter
imports with PEFT's logits, and jlora's export loads in PEFT with jlora's (atol 1e-4). A tiny GptOss, whose
experts are 3-D parameters ``gate_up_proj`` ``(E, hidden, 2 * expert_dim)`` and ``down_proj``: it loads
jlora's ``target_parameters`` file and PEFT's delta of every expert parameter equals jlora's (1e-6), its
logits equal those of the model with jlora's merged weights; and jlora imports PEFT's own file with the same
deltas. Needs torch, peft and transformers; skipped otherwise.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import _peft as P

# -- a Llama: PEFT -> jlora and jlora -> PEFT ---------------------------------------------------


@P.PEFT_WARNINGS
def test_peft_saved_adapter_imports(tmp_path):
  torch, model, flax_model, variables, ids = P.torch_llama(seed=1)
  import peft  # noqa: PLC0415

  pcfg = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
    rank_pattern={"o_proj": 2},
    alpha_pattern={"k_proj": 5},
    init_lora_weights=False,
    task_type="CAUSAL_LM",
  )
  peft_model = peft.get_peft_model(model, pcfg).eval()
  theirs = P.torch_logits(torch, peft_model, ids)
  peft_model.save_pretrained(str(tmp_path))
  lora, cfg = jlora.import_peft(tmp_path, variables)
  assert cfg.rank_for("model/layers_1/self_attn/o_proj") == 2
  assert cfg.scale_for("model/layers_0/self_attn/k_proj") == 5 / 4
  ours = np.asarray(jlora.wrap(flax_model.apply, cfg)(variables, lora, ids))
  assert np.abs(ours - flax_model.apply(variables, ids)).max() > 1e-2
  print(f"PEFT -> jlora logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@P.PEFT_WARNINGS
def test_exported_adapter_loads_in_peft(tmp_path):
  torch, model, flax_model, variables, ids = P.torch_llama()
  import peft  # noqa: PLC0415

  # The Flax copy computes the PyTorch model (base check, before any LoRA).
  np.testing.assert_allclose(flax_model.apply(variables, ids), P.torch_logits(torch, model, ids), atol=1e-4)
  cfg = jlora.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=("q_proj", "v_proj", "down_proj", "embed_tokens"),
    rank_pattern={"down_proj": 2},
    alpha_pattern={"v_proj": 3.0},
    modules_to_save=("lm_head",),
    init_lora_weights=False,
  )
  lora = jlora.init(variables, cfg, key=jax.random.key(3))
  lora["params"]["lm_head"]["kernel"] = lora["params"]["lm_head"]["kernel"] * 1.5
  jlora.export_peft(tmp_path, lora, cfg, base=variables)
  ours = np.asarray(jlora.wrap(flax_model.apply, cfg)(variables, lora, ids))
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path)).eval()
  theirs = P.torch_logits(torch, peft_model, ids)
  base = flax_model.apply(variables, ids)
  assert np.abs(ours - base).max() > 1e-2  # the adapter changes the logits
  print(f"jlora -> PEFT logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


# -- against PEFT on a transformers GptOss ------------------------------------------------------


def _gpt_oss():
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  config = transformers.GptOssConfig(
    vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
    layer_types=["full_attention"] * 2,
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.GptOssForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "experts" in name:
        p.normal_(0.0, 0.3)  # experts are allocated empty
  return torch, model


def _experts_tree(model):
  return {
    "model": {
      f"layers_{i}": {
        "mlp": {
          "experts": {n: jnp.asarray(getattr(layer.mlp.experts, n).detach().numpy()) for n in P.EXPERT_ORDER},
        }
      }
      for i, layer in enumerate(model.model.layers)
    }
  }


def _expert(tree, layer, name):
  return tree["model"][f"layers_{layer}"]["mlp"]["experts"][name]


def _hf_names(path, index):
  name = f"{jlora.peft_module_name(path)}.{path[-1]}"  # model.layers.0.mlp.experts.gate_up_proj
  return jlora.PeftParameter(name, order=P.EXPERT_ORDER[str(path[-1])])


LAYOUTS = {"gate_up_proj": "sio", "down_proj": "sio"}  # transformers 4.57 stores experts (E, in, out)


def _wrappers(peft_model):
  from peft.tuners.lora import ParamWrapper  # noqa: PLC0415

  return {
    f"{n.replace('base_model.model.', '').replace('.base_layer', '')}.{m.parameter_name}": m
    for n, m in peft_model.named_modules()
    if isinstance(m, ParamWrapper)
  }


# PEFT 0.21 matches `rank_pattern` against target_parameters' names when it builds the adapters,
# but its "did not match any targeted module" check looks at module names only, and warns.
_PATTERN_WARNING = "ignore:The following rank_pattern keys did not match:RuntimeWarning"


@pytest.mark.filterwarnings(_PATTERN_WARNING)
@pytest.mark.parametrize("transposed", [False, True])
def test_peft_loads_jlora_experts_with_the_same_deltas_and_logits(tmp_path, transposed):
  torch, model = _gpt_oss()
  from peft import PeftModel  # noqa: PLC0415

  for layer in model.model.layers:  # PEFT then reads the parameters as (E, in, out)
    layer.mlp.experts.is_transposed = transposed

  tree = _experts_tree(model)
  cfg = jlora.LoraConfig(
    r=2,
    lora_alpha=5,
    target_modules=tuple(P.EXPERT_ORDER),
    rank_pattern={"down_proj": 3},
    layout_pattern=LAYOUTS,
    init_lora_weights=False,
  )
  lora = jlora.init(tree, cfg, key=jax.random.key(4))
  name_map = lambda path, index: dataclasses.replace(_hf_names(path, index), transposed=transposed)  # noqa: E731
  pcfg = jlora.export_peft(tmp_path, lora, cfg, name_map=name_map, base=tree, task_type=None)
  assert pcfg["target_parameters"] == ["down_proj", "gate_up_proj"] and pcfg["target_modules"] == []
  tokens = torch.tensor([[5, 9, 1, 33, 12, 63, 7, 2]])
  with torch.no_grad():
    base_logits = model(tokens).logits.clone()
  merged = jlora.merge(tree, lora, cfg)
  peft_model = PeftModel.from_pretrained(model, tmp_path).eval()
  wrappers = _wrappers(peft_model)
  assert len(wrappers) == 4
  for i in range(2):
    for n in P.EXPERT_ORDER:
      want = np.asarray(_expert(merged, i, n) - _expert(tree, i, n))
      got = wrappers[f"model.layers.{i}.mlp.experts.{n}"].get_delta_weight("default").detach().numpy()
      np.testing.assert_allclose(got, want, atol=1e-6)
  with torch.no_grad():
    peft_logits = peft_model(tokens).logits
    merged_model = peft_model.merge_and_unload()  # the base weights plus PEFT's delta
    for i, layer in enumerate(merged_model.model.layers):
      for n in P.EXPERT_ORDER:
        getattr(layer.mlp.experts, n).copy_(torch.tensor(np.array(_expert(merged, i, n))))
    jlora_logits = merged_model(tokens).logits
  assert float((peft_logits - base_logits).abs().max()) > 1e-3
  np.testing.assert_allclose(peft_logits.numpy(), jlora_logits.numpy(), atol=1e-5)


@pytest.mark.filterwarnings(_PATTERN_WARNING)
def test_jlora_imports_peft_experts_with_the_same_deltas(tmp_path):
  torch, model = _gpt_oss()
  import peft  # noqa: PLC0415

  tree = _experts_tree(model)
  peft_cfg = peft.LoraConfig(
    r=3, lora_alpha=4, target_modules=[], rank_pattern={"down_proj": 2}, init_lora_weights=False,
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
  )  # fmt: skip
  peft_model = peft.get_peft_model(model, peft_cfg)
  peft_model.save_pretrained(tmp_path)
  lora, cfg = jlora.import_peft(tmp_path, tree, name_map=_hf_names, layout_pattern=LAYOUTS)
  merged = jlora.merge(tree, lora, cfg)
  for name, wrapper in _wrappers(peft_model).items():
    _, layer, _, _, n = name.split(".")[1:]
    want = wrapper.get_delta_weight("default").detach().numpy()
    got = np.asarray(_expert(merged, layer, n) - _expert(tree, layer, n))
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert lora["model"]["layers_0"]["mlp"]["experts"]["down_proj"]["lora_A"].shape == (4, 8, 2)
