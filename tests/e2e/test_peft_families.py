"""PEFT files for real model families, checked against PEFT on PyTorch with the same base weights.

Hugging Face Flax GPT-2 (``Conv1D`` kernels stored ``(out, in)``, used as
``x @ W.T``; PEFT's ``fan_in_fan_out=True``) and Llama against their
``transformers`` PyTorch twins: jlora -> PEFT and PEFT -> jlora logits agree to
1e-5 (fp32), and jlora's trainable count equals PEFT's. gemma-style einsum
weights (`tests.zoo.GemmaStyle`: ``q_einsum`` ``(N, D, H)``, fused ``kv_einsum``,
``gating_einsum``) against PEFT on ``nn.Linear`` modules under the Hugging Face
Gemma names: the merged weights PEFT builds from jlora's file equal jlora's
merged kernels. "all-linear" on BERT, ELECTRA, ALBERT and CLIP, and PEFT's ``bias`` modes on OPT, BERT
and GPT-2, both ways, modules and norms outside the layer stack included. Needs torch, peft and
transformers < 4.58 (the last with Flax models); skipped otherwise.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import zoo

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
  pytest.skip("transformers >= 4.58 has no Flax models", allow_module_level=True)
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model  # noqa: E402

TOKENS = np.array([[5, 9, 1, 33, 12, 63, 7, 2], [3, 3, 40, 22, 17, 8, 51, 6]], np.int32)
R, ALPHA = 4, 8


def _family(kind):
  if kind == "gpt2":
    config = transformers.GPT2Config(
      vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    flax_cls, torch_cls, extra = (
      transformers.FlaxGPT2LMHeadModel,
      transformers.GPT2LMHeadModel,
      {"fan_in_fan_out": True},
    )
    names = ["c_attn", "c_proj", "c_fc"]
  else:
    config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    flax_cls, torch_cls, extra = transformers.FlaxLlamaForCausalLM, transformers.LlamaForCausalLM, {}
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  config.attn_implementation = "eager"
  model = flax_cls(config, seed=0, dtype=jnp.float32)
  keys = iter(jax.random.split(jax.random.key(9), 1000))
  params = jax.tree_util.tree_map(  # non-trivial biases and norms
    lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape) if x.ndim == 1 else x, model.params
  )

  def apply_fn(p, ids):
    return model(ids, params=p).logits

  def torch_model():
    m = torch_cls(config)
    load_flax_weights_in_pytorch_model(m, jax.tree_util.tree_map(np.asarray, params))
    return m.eval()

  return params, apply_fn, torch_model, names, extra


def _logits(m):
  with torch.no_grad():
    return m(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
  return request.param, *_family(request.param)


def _dora_trained(lora, key):
  """A DoRA adapter as training leaves it: the magnitude moved off the kernel norms it starts at."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, x: (
      x * jax.random.uniform(jax.random.fold_in(key, x.size), x.shape, minval=0.5, maxval=1.5)
      if str(kp[-1].key) == "lora_magnitude"
      else x
    ),
    lora,
  )


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_export_loads_in_peft_with_the_same_logits(family, tmp_path, dora):
  kind, params, apply_fn, torch_model, names, extra = family
  x = (jnp.asarray(TOKENS),)
  cfg = jlora.LoraConfig(
    r=R, lora_alpha=ALPHA, target_modules=tuple(names), init_lora_weights=False, use_dora=dora
  )
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=x)
  if dora:
    lora = _dora_trained(lora, jax.random.key(3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.get_peft_model(
      torch_model(), peft.LoraConfig(r=R, target_modules=names, use_dora=dora, **extra)
    )
    count, total = pm.get_nb_trainable_parameters()
  assert jlora.count_params(lora) == count
  # PEFT's print_trainable_parameters line, magnitude vectors included.
  assert jlora.summary(params, lora) == (
    f"trainable params: {count:,d} || all params: {total:,d} || trainable%: {100 * count / total:.4f}"
  )
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=params)
  assert pcfg["target_modules"] == names and pcfg["fan_in_fan_out"] is (kind == "gpt2")
  assert pcfg["use_dora"] is dora
  pm = peft.PeftModel.from_pretrained(torch_model(), tmp_path).eval()
  want = np.asarray(jlora.wrap(apply_fn, cfg)(params, lora, *x))
  assert np.max(np.abs(want - _logits(torch_model()))) > 1e-2, "the adapter must change the logits"
  np.testing.assert_allclose(_logits(pm), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_imports_with_the_same_logits(family, tmp_path, dora):
  kind, params, apply_fn, torch_model, names, extra = family
  torch.manual_seed(5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pcfg = peft.LoraConfig(
      r=R, lora_alpha=ALPHA, target_modules=names[:2], init_lora_weights=False, use_dora=dora, **extra
    )
    pm = peft.get_peft_model(torch_model(), pcfg).eval()
  if dora:  # magnitudes off the kernel norms they start at, as after training
    with torch.no_grad():
      for name, p in pm.named_parameters():
        if "lora_magnitude_vector" in name:
          p.mul_(torch.rand(p.shape) + 0.5)
  pm.save_pretrained(tmp_path)
  x = (jnp.asarray(TOKENS),)
  lora, cfg = jlora.import_peft(tmp_path, params, apply_fn=apply_fn, example_args=x)
  assert cfg.use_dora is dora
  np.testing.assert_allclose(
    np.asarray(jlora.wrap(apply_fn, cfg)(params, lora, *x)), _logits(pm), atol=1e-5, rtol=0
  )


def test_gemma_style_einsums_merge_as_peft_merges_them(tmp_path):
  case = zoo.BUILDERS["gemma_style"]()
  lora = jlora.init(
    case.tree, case.config, key=jax.random.key(2), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  pcfg = jlora.export_peft(tmp_path, lora, case.config, base=case.tree, task_type=None)
  merged = jlora.merge(case.tree, lora, case.config)["params"]
  base = case.tree["params"]
  dh, kv = zoo.D // zoo.HEADS, zoo.KV_HEADS

  def linear(w):  # torch nn.Linear weight (out, in)
    return torch.tensor(np.asarray(w, np.float32).T.copy())

  # The Hugging Face Gemma modules as nn.Linear, from each einsum weight (in, out) -> (out, in).
  as_linear = {
    "self_attn.q_proj": lambda p: p["attn"]["q_einsum"]["w"].transpose(1, 0, 2).reshape(zoo.D, -1),
    "self_attn.k_proj": lambda p: p["attn"]["kv_einsum"]["w"][0].transpose(1, 0, 2).reshape(zoo.D, kv * dh),
    "self_attn.v_proj": lambda p: p["attn"]["kv_einsum"]["w"][1].transpose(1, 0, 2).reshape(zoo.D, kv * dh),
    "self_attn.o_proj": lambda p: p["attn"]["attn_vec_einsum"]["w"].reshape(-1, zoo.D),
    "mlp.gate_proj": lambda p: p["mlp"]["gating_einsum"][0].T,
    "mlp.up_proj": lambda p: p["mlp"]["gating_einsum"][1].T,
    "mlp.down_proj": lambda p: p["mlp"]["linear"],
  }
  model = torch.nn.Module()
  model.model = torch.nn.Module()
  model.model.layers = torch.nn.ModuleList()
  for i in range(zoo.LAYERS):
    layer = torch.nn.Module()
    for name, fn in as_linear.items():
      group, proj = name.split(".")
      if not hasattr(layer, group):
        setattr(layer, group, torch.nn.Module())
      w = fn(base[f"layer_{i}"])
      lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
      lin.weight.data = linear(w)
      setattr(getattr(layer, group), proj, lin)
    model.model.layers.append(layer)
  pm = peft.PeftModel.from_pretrained(model, tmp_path).merge_and_unload()
  assert sorted(pcfg["target_modules"]) == sorted(n.split(".")[1] for n in as_linear)
  for i in range(zoo.LAYERS):
    for name, fn in as_linear.items():
      group, proj = name.split(".")
      got = getattr(getattr(pm.model.layers[i], group), proj).weight.detach().numpy()
      want = linear(fn(merged[f"layer_{i}"])).numpy()
      assert np.max(np.abs(want - linear(fn(base[f"layer_{i}"])).numpy())) > 1e-3, name
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"layer {i} {name}")


# -- "all-linear" on Hugging Face Flax models whose modules outside the layer stack mirror PyTorch's -----

_IDS = np.array([[5, 9, 1, 33, 12, 63, 7], [3, 3, 40, 22, 17, 8, 51]], np.int32)
_PIXELS = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
# A module outside the layer stack (or in ALBERT's numbered layer groups) the default name map names.
_OUTSIDE = {
  "bert": "pooler.dense",
  "electra": "embeddings_project",
  "albert": "encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
  "clip": "visual_projection",
}


def _hf_config(kind):
  tiny = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)
  if kind == "bert":  # pooler.dense
    config = transformers.BertConfig(hidden_size=16, intermediate_size=32, **tiny)
    return config, transformers.FlaxBertModel, transformers.BertModel
  if kind == "electra":  # embeddings_project (embedding_size != hidden_size)
    config = transformers.ElectraConfig(hidden_size=16, intermediate_size=32, embedding_size=8, **tiny)
    return config, transformers.FlaxElectraModel, transformers.ElectraModel
  if (
    kind == "albert"
  ):  # encoder.albert_layer_groups.0.albert_layers.0..., embedding_hidden_mapping_in, pooler
    config = transformers.AlbertConfig(hidden_size=16, intermediate_size=32, embedding_size=8, **tiny)
    return config, transformers.FlaxAlbertModel, transformers.AlbertModel
  # clip: text_projection, visual_projection (and a conv stem "all-linear" leaves alone)
  text = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, projection_dim=8, **tiny)
  vision = transformers.CLIPVisionConfig(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
    patch_size=4, projection_dim=8,
  )  # fmt: skip
  config = transformers.CLIPConfig(
    text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8
  )
  return config, transformers.FlaxCLIPModel, transformers.CLIPModel


def _twin(torch_cls, config, params):
  """The PyTorch model of ``config`` holding the Flax ``params``, in eval mode."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers' chatter about the weights it copies
    m = torch_cls(config)
    load_flax_weights_in_pytorch_model(m, jax.tree_util.tree_map(np.asarray, params))
  return m.eval()


def _hf_model(kind):
  """The Flax model's params, its apply function and inputs, its PyTorch twin and the twin's outputs."""
  config, flax_cls, torch_cls = _hf_config(kind)
  flax_model = flax_cls(config, seed=0, dtype=jnp.float32)
  params = flax_model.params
  if kind == "clip":
    args = (jnp.asarray(_IDS), jnp.asarray(_PIXELS))
    fields = ("text_embeds", "image_embeds")

    def apply_fn(p, ids, pixels):
      out = flax_model(ids, pixels, params=p)
      return out.text_embeds, out.image_embeds

    inputs = {"input_ids": torch.tensor(_IDS, dtype=torch.long), "pixel_values": torch.tensor(_PIXELS)}
  else:
    args = (jnp.asarray(_IDS),)
    fields = ("last_hidden_state", "pooler_output" if kind != "electra" else "last_hidden_state")

    def apply_fn(p, ids):  # Flax ELECTRA's default token types differ from PyTorch's: pass them
      out = flax_model(ids, attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids), params=p)
      return tuple(getattr(out, f) for f in fields)

    inputs = {"input_ids": torch.tensor(_IDS, dtype=torch.long)}

  def torch_model():
    return _twin(torch_cls, config, params)

  def outputs(m):
    with torch.no_grad():
      out = m(**inputs)
    return tuple(getattr(out, f).numpy() for f in fields)

  return params, apply_fn, args, torch_model, outputs


def _assert_close(got, want):
  for g, w in zip(got, want, strict=True):  # each output of the model
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "electra", "albert", "clip"])
def test_all_linear_on_hf_models_exports_and_imports_without_a_name_map(kind, tmp_path):
  params, apply_fn, args, torch_model, outputs = _hf_model(kind)
  _assert_close(apply_fn(params, *args), outputs(torch_model()))  # the twin
  cfg = jlora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=args)
  # jlora -> PEFT: every Linear PEFT's "all-linear" adapts, those outside the layer stack included
  jlora.export_peft(
    tmp_path / "out", lora, cfg, base=params, apply_fn=apply_fn, example_args=args, task_type=None
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = peft.get_peft_model(torch_model(), peft.LoraConfig(r=R, target_modules="all-linear"))
    pm = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "out").eval()
  adapted = sorted(n for n, _ in pm.named_parameters() if "lora_A" in n)
  assert adapted == sorted(n for n, _ in ref.named_parameters() if "lora_A" in n)
  assert any(f".{_OUTSIDE[kind]}.lora_A" in n for n in adapted)
  ours = jlora.wrap(apply_fn, cfg)(params, lora, *args)
  assert np.abs(ours[-1] - apply_fn(params, *args)[-1]).max() > 1e-2, "the adapter must change the outputs"
  _assert_close(outputs(pm), ours)
  # PEFT -> jlora
  torch.manual_seed(5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(torch_model(), pcfg).eval()
  pm.save_pretrained(tmp_path / "peft")
  lora2, cfg2 = jlora.import_peft(tmp_path / "peft", params, apply_fn=apply_fn, example_args=args)
  _assert_close(jlora.wrap(apply_fn, cfg2)(params, lora2, *args), outputs(pm))


# -- PEFT's ``bias`` on Hugging Face Flax models (norms and biases outside the layer stack) --------


def _bias_family(kind):
  tiny = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)
  if kind == "opt":  # decoder.final_layer_norm outside the layers
    config = transformers.OPTConfig(hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **tiny)
    classes, names = (transformers.FlaxOPTForCausalLM, transformers.OPTForCausalLM), ["q_proj", "v_proj"]
  elif kind == "bert":  # embeddings.LayerNorm, pooler.dense
    config = transformers.BertConfig(hidden_size=16, intermediate_size=32, **tiny)
    classes, names = (transformers.FlaxBertModel, transformers.BertModel), ["query", "value"]
  else:  # transformer.ln_f; Conv1D modules (PEFT's fan_in_fan_out)
    config = transformers.GPT2Config(
      vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32
    )
    classes, names = (transformers.FlaxGPT2LMHeadModel, transformers.GPT2LMHeadModel), ["c_attn"]
  flax_model = classes[0](config, seed=0, dtype=jnp.float32)
  params = flax_model.params

  def apply_fn(p, ids):
    out = flax_model(ids, params=p)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state

  def torch_model():
    return _twin(classes[1], config, params)

  return params, apply_fn, torch_model, names, {"fan_in_fan_out": True} if kind == "gpt2" else {}


def _hf_outputs(model):
  with torch.no_grad():
    out = model(torch.tensor(_IDS, dtype=torch.long))
  return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("kind", ["opt", "bert", "gpt2"])
def test_hf_models_count_export_and_import_trained_biases_as_peft(kind, bias, tmp_path):
  params, apply_fn, torch_model, names, extra = _bias_family(kind)
  ids = (jnp.asarray(_IDS),)
  np.testing.assert_allclose(apply_fn(params, *ids), _hf_outputs(torch_model()), atol=1e-4)  # the twin
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=tuple(names), bias=bias, init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=ids)
  lora = jax.tree_util.tree_map(lambda x: x + 0.05, lora)  # trained biases moved off the base ones
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers' and PEFT's chatter about the twin
    pm = peft.get_peft_model(torch_model(), peft.LoraConfig(r=2, target_modules=names, bias=bias, **extra))
    n_train, n_all = pm.get_nb_trainable_parameters()
  assert jlora.summary(params, lora, cfg).startswith(
    f"trainable params: {n_train:,d} || all params: {n_all:,d} ||"
  )
  # jlora -> PEFT
  jlora.export_peft(
    tmp_path / "out", lora, cfg, base=params, apply_fn=apply_fn, example_args=ids, task_type=None
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = _hf_outputs(peft.PeftModel.from_pretrained(torch_model(), tmp_path / "out").eval())
  ours = np.asarray(jlora.wrap(apply_fn, cfg)(params, lora, *ids))
  assert np.abs(ours - apply_fn(params, *ids)).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # PEFT -> jlora, its trained biases moved too
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pm = peft.get_peft_model(
      torch_model(),
      peft.LoraConfig(r=2, target_modules=names, bias=bias, init_lora_weights=False, **extra),
    )
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if name.endswith("bias") and p.requires_grad:
        p.add_(0.1)
  pm.save_pretrained(str(tmp_path / "peft"))
  lora2, cfg2 = jlora.import_peft(tmp_path / "peft", params, apply_fn=apply_fn, example_args=ids)
  assert cfg2.bias == bias
  np.testing.assert_allclose(
    jlora.wrap(apply_fn, cfg2)(params, lora2, *ids), _hf_outputs(pm.eval()), atol=1e-5, rtol=0
  )
