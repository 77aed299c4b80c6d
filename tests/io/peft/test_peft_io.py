"""Tests for `jlora.export_peft` / `jlora.import_peft` (PEFT adapter directories).

Shapes: Flax kernel ``(in, out)``; jlora ``lora_A`` ``(in, r)``, ``lora_B``
``(r, out)``; PEFT ``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)``.
The PyTorch comparisons run where ``torch``, ``transformers`` and ``peft`` are
installed (CPU, float32, atol 1e-4 on logits).
"""

import json
import os
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

PREFIX = "base_model.model."


def _linen_tree(key=0):
  k = jax.random.split(jax.random.key(key), 6)
  layer = lambda i: {  # noqa: E731
    "self_attn": {
      "q_proj": {"kernel": jax.random.normal(k[i], (8, 6))},
      "v_proj": {"kernel": jax.random.normal(k[i + 2], (8, 4))},
    },
  }
  return {
    "params": {
      "model": {
        "embed_tokens": {"embedding": jax.random.normal(k[4], (11, 8))},
        "layers_0": layer(0),
        "layers_1": layer(1),
      },
      "lm_head": {"kernel": jax.random.normal(k[5], (8, 11))},
    }
  }


def _cfg(**kw):
  base = dict(r=3, lora_alpha=6, target_modules=("q_proj", "v_proj", "embed_tokens"), init_lora_weights=False)
  base.update(kw)
  return jlora.LoraConfig(**base)


def _read(directory):
  with open(os.path.join(directory, "adapter_config.json")) as f:
    cfg = json.load(f)
  return cfg, safetensors.numpy.load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_default_name_map():
  assert jlora.peft_module_name(("params", "model", "layers_0", "self_attn", "q_proj", "kernel")) == (
    "model.layers.0.self_attn.q_proj"
  )
  assert (
    jlora.peft_module_name(("model", "layers", 2, "mlp", "up_proj", "kernel")) == "model.layers.2.mlp.up_proj"
  )
  assert jlora.peft_module_name(("params", "model", "layers", "mlp", "up_proj", "kernel"), 5) == (
    "model.layers.5.mlp.up_proj"
  )
  assert jlora.peft_module_name(("params", "Dense_0", "kernel")) == "Dense_0"
  with pytest.raises(ValueError, match="no layer container"):
    jlora.peft_module_name(("params", "q_proj", "kernel"), 0)


def test_export_keys_shapes_and_values(tmp_path):
  tree = _linen_tree()
  cfg = _cfg(rank_pattern={"v_proj": 2}, alpha_pattern={"embed_tokens": 5.0}, modules_to_save=("lm_head",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  pcfg = jlora.export_peft(tmp_path, lora, cfg)
  disk_cfg, tensors = _read(tmp_path)
  assert disk_cfg == json.loads(json.dumps(pcfg))
  lp = lora["params"]["model"]
  q = f"{PREFIX}model.layers.1.self_attn.q_proj"
  # Independent expectation: PEFT's weights are the transposes of jlora's factors.
  np.testing.assert_array_equal(
    tensors[f"{q}.lora_A.weight"], np.asarray(lp["layers_1"]["self_attn"]["q_proj"]["kernel"]["lora_A"]).T
  )
  np.testing.assert_array_equal(
    tensors[f"{q}.lora_B.weight"], np.asarray(lp["layers_1"]["self_attn"]["q_proj"]["kernel"]["lora_B"]).T
  )
  assert tensors[f"{q}.lora_A.weight"].shape == (3, 8) and tensors[f"{q}.lora_B.weight"].shape == (6, 3)
  v = f"{PREFIX}model.layers.0.self_attn.v_proj"
  assert tensors[f"{v}.lora_A.weight"].shape == (2, 8) and tensors[f"{v}.lora_B.weight"].shape == (4, 2)
  e = f"{PREFIX}model.embed_tokens"
  assert tensors[f"{e}.lora_embedding_A"].shape == (3, 11) and tensors[f"{e}.lora_embedding_B"].shape == (
    8,
    3,
  )
  np.testing.assert_array_equal(
    tensors[f"{PREFIX}lm_head.weight"], np.asarray(lora["params"]["lm_head"]["kernel"]).T
  )
  assert len(tensors) == 2 * 5 + 1
  assert pcfg["r"] == 3 and pcfg["lora_alpha"] == 6 and pcfg["peft_type"] == "LORA"
  assert "model.layers.0.self_attn.q_proj" in pcfg["target_modules"]
  assert pcfg["rank_pattern"] == {
    "model\\.layers\\.0\\.self_attn\\.v_proj": 2,
    "model\\.layers\\.1\\.self_attn\\.v_proj": 2,
  }
  assert pcfg["alpha_pattern"] == {"model\\.embed_tokens": 5.0}
  assert pcfg["modules_to_save"] == ["lm_head"]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jlora.export_peft(tmp_path, lora, cfg)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip(tmp_path, dtype):
  tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), _linen_tree())
  cfg = _cfg(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4.0}, modules_to_save=("lm_head",))
  lora = jlora.init(tree, cfg, key=jax.random.key(2))
  jlora.export_peft(tmp_path, lora, cfg, base=tree)
  lora2, cfg2 = jlora.import_peft(tmp_path, tree)
  chex.assert_trees_all_equal(lora2, lora)
  chex.assert_trees_all_equal_dtypes(lora2, lora)
  # The imported config computes the same model: compare merged trees (exact ops).
  chex.assert_trees_all_close(jlora.merge(tree, lora2, cfg2), jlora.merge(tree, lora, cfg), atol=0, rtol=0)


def _dense_general_model(layers):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 3), name="q_proj")(x)  # kernel (d, H, Dh)
      return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o_proj")(h)  # kernel (H, Dh, d)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(layers):
        x = Block(name=f"layers_{i}")(x)
      return x

  return Net()


def test_nd_kernels_flatten_row_major(tmp_path):
  model = _dense_general_model(2)
  x = jax.random.normal(jax.random.key(0), (2, 5))
  variables = model.init(jax.random.key(1), x)
  cfg = _cfg(target_modules=("q_proj", "o_proj"), r=2)
  lora = jlora.init(variables, cfg, key=jax.random.key(2), apply_fn=model.apply, example_args=(x,))
  # o_proj (H, Dh, d) could be a convolution's kernel (*k, in, out): only the model's use tells
  with pytest.raises(ValueError, match="o_proj/kernel.*cannot tell which"):
    jlora.export_peft(tmp_path, lora, cfg)
  jlora.export_peft(tmp_path, lora, cfg, base=variables, apply_fn=model.apply, example_args=(x,))
  _, tensors = _read(tmp_path)
  q = lora["params"]["layers_0"]["q_proj"]["kernel"]
  o = lora["params"]["layers_0"]["o_proj"]["kernel"]
  assert q["lora_B"].shape == (2, 2, 3) and o["lora_A"].shape == (2, 3, 2)
  # PEFT's Linear equivalent of the kernel reshaped (d, H*Dh) / (H*Dh, d).
  np.testing.assert_array_equal(
    tensors[f"{PREFIX}layers.0.q_proj.lora_B.weight"], np.asarray(q["lora_B"]).reshape(2, 6).T
  )
  np.testing.assert_array_equal(
    tensors[f"{PREFIX}layers.0.o_proj.lora_A.weight"], np.asarray(o["lora_A"]).reshape(6, 2).T
  )
  # Independent check of the flattening: a Linear with the reshaped merged kernel gives the model's output.
  kq = np.asarray(jlora.merge(variables, lora, cfg)["params"]["layers_0"]["q_proj"]["kernel"]).reshape(5, 6)
  dq = (
    tensors[f"{PREFIX}layers.0.q_proj.lora_B.weight"] @ tensors[f"{PREFIX}layers.0.q_proj.lora_A.weight"]
  ).T
  w0 = np.asarray(variables["params"]["layers_0"]["q_proj"]["kernel"]).reshape(5, 6)
  np.testing.assert_allclose(w0 + cfg.scale_for("layers_0/q_proj") * dq, kq, atol=1e-5)
  with pytest.raises(ValueError, match="apply_fn"):
    jlora.import_peft(tmp_path, variables)
  lora2, cfg2 = jlora.import_peft(tmp_path, variables, apply_fn=model.apply, example_args=(x,))
  chex.assert_trees_all_equal(lora2, lora)
  y = jlora.wrap(model.apply, cfg2)(variables, lora2, x)
  chex.assert_trees_all_close(y, model.apply(jlora.merge(variables, lora, cfg), x), atol=1e-5)


def test_stacked_kernels_export_per_layer(tmp_path):
  tree = {
    "params": {
      "model": {"layers": {"mlp": {"up_proj": {"kernel": jax.random.normal(jax.random.key(0), (4, 6, 5))}}}}
    }
  }
  cfg = _cfg(target_modules=("up_proj",), layout_pattern={"up_proj": (1, 1)}, layers_to_transform=(1, 3))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  a = lora["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]["lora_A"]
  assert a.shape == (2, 6, 3)
  jlora.export_peft(tmp_path, lora, cfg)
  _, tensors = _read(tmp_path)
  assert sorted(tensors) == sorted(
    f"{PREFIX}model.layers.{i}.mlp.up_proj.lora_{x}.weight" for i in (1, 3) for x in "AB"
  )
  np.testing.assert_array_equal(
    tensors[f"{PREFIX}model.layers.3.mlp.up_proj.lora_A.weight"], np.asarray(a[1]).T
  )
  lora2, cfg2 = jlora.import_peft(tmp_path, tree, layout_pattern={"up_proj": (1, 1)})
  assert cfg2.layers_to_transform == (1, 3)
  chex.assert_trees_all_equal(lora2, lora)


def test_custom_name_map(tmp_path):
  tree = _linen_tree()
  cfg = _cfg(target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  name_map = lambda path, layer: "transformer." + ".".join(str(p) for p in path[1:-1])  # noqa: E731
  jlora.export_peft(tmp_path, lora, cfg, name_map=name_map)
  _, tensors = _read(tmp_path)
  assert f"{PREFIX}transformer.model.layers_0.self_attn.q_proj.lora_A.weight" in tensors
  with pytest.raises(ValueError, match=r"select no module of the base model.*`name_map`\? Some module names"):
    jlora.import_peft(tmp_path, tree)
  lora2, _ = jlora.import_peft(tmp_path, tree, name_map=name_map)
  chex.assert_trees_all_equal(lora2, lora)


def test_a_name_map_that_answers_no_module_name_is_an_error_naming_the_path(tmp_path):
  tree = _linen_tree()
  cfg = _cfg(target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  first = ("params", "model", "layers_0", "self_attn", "q_proj", "kernel")
  names = {first: "model.layers.0.self_attn.q_proj"}  # the other layer is missing: `.get` answers None
  for answer, layer, shown in ((names.get, 1, "None"), (lambda path, index: path, 0, r"\('params'")):
    where = f"'params/model/layers_{layer}/self_attn/q_proj/kernel'"
    with pytest.raises(
      ValueError,
      match=rf"`name_map` returned {shown}.* for the weight at {where}: it must return the PyTorch module "
      rf"name .* as a tuple of keys \(\('params', 'model', 'layers_{layer}'.* messages print it as {where}",
    ):
      jlora.export_peft(tmp_path, lora, cfg, name_map=answer)
  assert not os.listdir(tmp_path)  # nothing written


# -- bad files: each a clear error -------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
  tree = _linen_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.export_peft(tmp_path, lora, cfg)
  return tmp_path, tree


def _rewrite(directory, tensors=None, config=None):
  """Edits the files by hand, as a PEFT user would: the re-saved tensors carry no jlora checksum."""
  if tensors is None:
    _, tensors = _read(directory)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
  if config is not None:
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
      json.dump(config, f)


def test_bad_shape_names_key(exported):
  d, tree = exported
  cfg, tensors = _read(d)
  key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
  tensors[key] = np.zeros((5, 3), np.float32)
  _rewrite(d, tensors)
  with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight.*shape \(5, 3\).*needs \(4, 3\)"):
    jlora.import_peft(d, tree)


def test_bad_dtype_and_unknown_and_missing_keys(exported):
  d, tree = exported
  cfg, tensors = _read(d)
  good = dict(tensors)
  key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
  tensors[key] = tensors[key].astype(np.int32)
  _rewrite(d, tensors)
  with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*dtype I32"):
    jlora.import_peft(d, tree)
  k_proj = f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"
  _rewrite(d, {**good, k_proj: np.zeros((3, 8), np.float32)})
  # The config does not select k_proj: PEFT ignores its tensor, and jlora says so.
  with pytest.warns(
    UserWarning, match=r"module\(s\) \['model.layers.0.self_attn.k_proj'\] that adapter_config"
  ):
    jlora.import_peft(d, tree)
  # Selected, but the tree has no such module: a wrong base model or name map.
  _rewrite(d, config={**cfg, "target_modules": cfg["target_modules"] + ["model.layers.0.self_attn.k_proj"]})
  with pytest.raises(ValueError, match=r"no leaf of the given tree maps to tensor .*k_proj"):
    jlora.import_peft(d, tree)
  _rewrite(d, good, cfg)
  missing = dict(good)
  del missing[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"]
  _rewrite(d, missing)
  with pytest.raises(ValueError, match=r"not '.*q_proj\.lora_B\.weight'"):
    jlora.import_peft(d, tree)


def test_bad_config_fields(exported):
  d, tree = exported
  cfg, _ = _read(d)
  _rewrite(d, config={**cfg, "frobnicate": 1})
  with pytest.raises(ValueError, match=r"field\(s\) \['frobnicate'\]"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "lora_bias": True})
  with pytest.raises(ValueError, match="`lora_bias` must be False"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "use_dora": True})  # DoRA without its magnitude vectors
  with pytest.raises(ValueError, match=r"lacks DoRA's '.*\.lora_magnitude_vector'"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "init_lora_weights": "pissa"})
  with pytest.raises(ValueError, match="PiSSA"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "lora_dropout": 2.0})
  with pytest.raises(ValueError, match="lora_dropout"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "r": 5})
  with pytest.raises(ValueError, match="has rank 3, but adapter_config.json gives rank 5"):
    jlora.import_peft(d, tree)
  _rewrite(d, config={**cfg, "r": 3, "rank_pattern": {"(?i)q_proj": 3}})  # compiles alone, not inside PEFT's
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


# -- against PEFT on PyTorch ----------------------------------------------------------------


def _torch_llama(seed=0):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("peft")
  torch.manual_seed(seed)
  hf = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
  )
  model = transformers.LlamaForCausalLM(hf).float().eval()
  from tests import _llama  # noqa: PLC0415

  flax_model, variables = _llama.from_torch(model)
  ids = np.random.default_rng(seed).integers(0, 64, size=(2, 7))
  return torch, model, flax_model, variables, ids


def _torch_logits(torch, model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias; harmless to these tests.
_PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.slow
@_PEFT_WARNINGS
def test_exported_adapter_loads_in_peft(tmp_path):
  torch, model, flax_model, variables, ids = _torch_llama()
  import peft  # noqa: PLC0415

  # The Flax copy computes the PyTorch model (base check, before any LoRA).
  np.testing.assert_allclose(flax_model.apply(variables, ids), _torch_logits(torch, model, ids), atol=1e-4)
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
  theirs = _torch_logits(torch, peft_model, ids)
  base = flax_model.apply(variables, ids)
  assert np.abs(ours - base).max() > 1e-2  # the adapter changes the logits
  print(f"jlora -> PEFT logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
@_PEFT_WARNINGS
def test_peft_saved_adapter_imports(tmp_path):
  torch, model, flax_model, variables, ids = _torch_llama(seed=1)
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
  theirs = _torch_logits(torch, peft_model, ids)
  peft_model.save_pretrained(str(tmp_path))
  lora, cfg = jlora.import_peft(tmp_path, variables)
  assert cfg.rank_for("model/layers_1/self_attn/o_proj") == 2
  assert cfg.scale_for("model/layers_0/self_attn/k_proj") == 5 / 4
  ours = np.asarray(jlora.wrap(flax_model.apply, cfg)(variables, lora, ids))
  assert np.abs(ours - flax_model.apply(variables, ids)).max() > 1e-2
  print(f"PEFT -> jlora logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


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
  _, tensors = _read(tmp_path)
  names = {k.rsplit(".lora_", 1)[0][len(PREFIX) :] for k in tensors}
  if case.name == "gemma_style":  # the Hugging Face Gemma module names, fused weights split
    assert "model.layers.1.self_attn.k_proj" in names and "model.layers.1.self_attn.v_proj" in names
    assert "model.layers.0.mlp.gate_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert pcfg["target_modules"] == sorted({n.rsplit(".", 1)[-1] for n in names})
    assert tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (16, 2)  # (N*H, r)
  if case.name == "gpt2_style":
    assert pcfg["fan_in_fan_out"] is False  # h_0.c_attn is not under `transformer.h.N.attn`
    assert tensors[f"{PREFIX}h.0.c_attn.lora_A.weight"].shape == (2, 16)  # (r, in)
    assert pcfg["target_modules"] == list(case.config.target_modules)
  if case.name == "maxtext_scan":  # the layer axis (stored second) becomes one module per layer
    assert {f"layers.{i}.q_proj" for i in range(2)} <= names
  lora2, cfg2 = jlora.import_peft(tmp_path, case.tree, **kw)
  got = jlora.wrap(case.apply_fn, cfg2)(case.tree, lora2, case.inputs)
  want = jlora.wrap(case.apply_fn, case.config)(case.tree, lora, case.inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["config", "weights"])
def test_a_flipped_bit_in_an_exported_file_is_an_error(tmp_path, target):
  tree = _linen_tree()
  cfg = _cfg()
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


def test_gpt2_conv1d_kernels_need_the_model_or_a_layout(tmp_path):
  # transformers' Flax GPT-2 stores Conv1D kernels (out, in); other code stores (in, out).
  tree = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.ones((12, 4))}}}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("c_attn",))
  with pytest.raises(
    ValueError, match=r"GPT-2 `Conv1D` weight.*apply_fn=.*'c_attn': 'oi'}` for transformers' FlaxGPT2"
  ):
    jlora.init(tree, cfg, key=jax.random.key(0))
  pinned = jlora.LoraConfig(
    r=2, target_modules=("c_attn",), layout_pattern={"c_attn": "oi"}, init_lora_weights=False
  )
  lora = jlora.init(tree, pinned, key=jax.random.key(0))
  assert lora["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["lora_A"].shape == (2, 4)  # (r, in)
  pcfg = jlora.export_peft(tmp_path, lora, pinned, base=tree)
  assert pcfg["fan_in_fan_out"] is True and pcfg["target_modules"] == ["c_attn"]
  with pytest.raises(
    ValueError, match=r"PEFT module 'transformer.h.0.attn.c_attn' adapts a kernel whose layout"
  ):
    jlora.import_peft(tmp_path, tree)
  lora2, cfg2 = jlora.import_peft(tmp_path, tree, layout_pattern={"c_attn": "oi"})
  chex.assert_trees_all_close(jlora.merge(tree, lora2, cfg2), jlora.merge(tree, lora, pinned))


def test_a_weight_no_name_map_knows_is_an_error_naming_it(tmp_path):
  tree = {"blocks": {"attn": {"wq": {"w": jnp.ones((8, 4))}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("wq",))
  lora = jlora.init(tree, cfg, key=jax.random.key(0))
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'blocks/attn/wq/w'.*name_map="
  ):
    jlora.export_peft(tmp_path, lora, cfg, base=tree)
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=tree, name_map=lambda path, index: "model.wq")
  assert pcfg["target_modules"] == ["wq"]


def test_keras_hub_gemma_names_and_unknown_kernels():
  from jlora._src.io.peft.names import default_name_map  # noqa: PLC0415

  # keras-hub Gemma variables nested by their `path`.
  assert (
    default_name_map(("decoder_block_1", "attention", "query", "kernel")) == "model.layers.1.self_attn.q_proj"
  )
  assert default_name_map(("decoder_block_0", "ffw_gating_2", "kernel")) == "model.layers.0.mlp.up_proj"
  # A `kernel` outside any layer container or known top-level module is not taken for an HF name.
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'encoder/proj/kernel'"
  ):
    default_name_map(("encoder", "proj", "kernel"))
  assert default_name_map(("params", "lm_head", "kernel")) == "lm_head"


def test_hf_tree_map_names_the_modules_outside_the_layer_stack():
  from jlora._src.io.peft.names import default_name_map, hf_tree_map  # noqa: PLC0415

  # A numbered module list reads as Hugging Face's (ALBERT's layer groups, Wav2Vec2's conv layers).
  albert = ("encoder", "albert_layer_groups", "0", "albert_layers", "0", "ffn", "kernel")
  assert default_name_map(albert) == "encoder.albert_layer_groups.0.albert_layers.0.ffn"
  pooler, query = (
    ("pooler", "dense", "kernel"),
    ("encoder", "layer", "0", "attention", "self", "query", "kernel"),
  )
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'pooler/dense/kernel'"
  ):
    default_name_map(pooler)
  # On a tree that is Hugging Face's (BERT), the leaves outside the layer stack mirror PyTorch's too.
  bert = hf_tree_map(default_name_map, [pooler, query])
  assert bert(pooler) == "pooler.dense" and bert(query) == "encoder.layer.0.attention.self.query"
  assert bert(("embeddings_project", "kernel")) == "embeddings_project"  # ELECTRA
  # Not on a tree none of whose paths reads as Hugging Face's, nor for a map the user gave.
  proj = ("encoder", "proj", "kernel")
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'encoder/proj/kernel'"
  ):
    hf_tree_map(default_name_map, [proj, pooler])(proj)
  mine = lambda path, index: "x"  # noqa: E731
  assert hf_tree_map(mine, [pooler, query]) is mine


# -- what PEFT's config selects (a plain JAX model and its PyTorch twin) -------------------------

_D, _LAYERS = 6, 2
_PROJ = ("q_proj", "k_proj", "v_proj")


def _attn_tree(key=0):
  k = iter(jax.random.split(jax.random.key(key), 3 * _LAYERS))
  layer = lambda: {"self_attn": {p: {"kernel": 0.4 * jax.random.normal(next(k), (_D, _D))} for p in _PROJ}}  # noqa: E731
  return {"model": {f"layers_{i}": layer() for i in range(_LAYERS)}}


def _attn_apply(tree, x):
  for i in range(_LAYERS):
    attn = tree["model"][f"layers_{i}"]["self_attn"]
    x = jnp.tanh(x + sum(x @ attn[p]["kernel"] for p in _PROJ))
  return x


def _attn_torch(tree):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")

  class Layer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn = torch.nn.Module()
      for p in _PROJ:
        setattr(self.self_attn, p, torch.nn.Linear(_D, _D, bias=False))

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = torch.nn.Module()
      self.model.layers = torch.nn.ModuleList(Layer() for _ in range(_LAYERS))

    def forward(self, x):
      for layer in self.model.layers:
        x = torch.tanh(x + sum(getattr(layer.self_attn, p)(x) for p in _PROJ))
      return x

  net = Net().eval()
  with torch.no_grad():
    for i, layer in enumerate(net.model.layers):
      for p in _PROJ:
        w = np.asarray(tree["model"][f"layers_{i}"]["self_attn"][p]["kernel"]).T
        getattr(layer.self_attn, p).weight.copy_(torch.tensor(w))
  return torch, net


_XS = np.random.default_rng(3).normal(size=(4, _D)).astype(np.float32)


def _peft_file_of_every_module(directory, tree):
  """A PEFT file with tensors for q, k and v of every layer (PEFT's own save, trained-looking)."""
  torch, net = _attn_torch(tree)
  import peft  # noqa: PLC0415

  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(_PROJ), init_lora_weights=False)
  peft.get_peft_model(net, cfg).save_pretrained(str(directory))


def _peft_outputs(directory, tree):
  torch, net = _attn_torch(tree)
  import peft  # noqa: PLC0415

  with torch.no_grad():
    return peft.PeftModel.from_pretrained(net, str(directory)).eval()(torch.tensor(_XS)).numpy()


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

  from jlora._src.io.peft.common import PeftTargets  # noqa: PLC0415

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


@pytest.mark.parametrize(
  ("fields", "ignored"),
  [
    (
      {"target_modules": ["q_proj", "v_proj"]},
      r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.k_proj",
    ),
    ({"target_modules": ["q_proj"]}, r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.v_proj'\]"),
    ({"target_modules": list(_PROJ), "layers_to_transform": [1]}, r"\['model.layers.0.self_attn.k_proj'"),
    (
      {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"},
      r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.k_proj'\]",
    ),
    (
      {"target_modules": list(_PROJ), "exclude_modules": ["layers.0.self_attn.v_proj"]},
      r"\['model.layers.0.self_attn.v_proj'\]",
    ),
  ],
  ids=["extra_k", "extra_k_and_v", "layers_to_transform", "regex", "exclude_modules"],
)
@_PEFT_WARNINGS
def test_import_applies_what_peft_selects(tmp_path, fields, ignored):
  tree = _attn_tree()
  _peft_file_of_every_module(tmp_path, tree)
  cfg, tensors = _read(tmp_path)
  _rewrite(tmp_path, tensors, {**cfg, **fields})
  with pytest.warns(UserWarning, match=rf"module\(s\) {ignored}.*does not select.*PEFT ignores them"):
    lora, jcfg = jlora.import_peft(tmp_path, tree)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT says nothing of the tensors it drops; other chatter is not ours
    theirs = _peft_outputs(tmp_path, tree)
  ours = np.asarray(jlora.wrap(_attn_apply, jcfg)(tree, lora, _XS))
  assert np.abs(ours - _attn_apply(tree, _XS)).max() > 1e-2  # the adapter changes the outputs
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@_PEFT_WARNINGS
def test_an_all_linear_file_adapts_the_linear_modules_as_peft_expands_it(tmp_path):
  tree = {**_attn_tree(), "lm_head": {"kernel": jax.random.normal(jax.random.key(8), (_D, 3))}}
  _peft_file_of_every_module(tmp_path, tree)  # q, k and v of every layer
  cfg, tensors = _read(tmp_path)
  _rewrite(tmp_path, tensors, {**cfg, "target_modules": "all-linear"})
  lora, jcfg = jlora.import_peft(tmp_path, tree)  # no warning: every tensor is a linear module's
  assert "lm_head" not in lora and len(jax.tree_util.tree_leaves(lora)) == 2 * len(_PROJ) * _LAYERS
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = _peft_outputs(tmp_path, tree)
  np.testing.assert_allclose(jlora.wrap(_attn_apply, jcfg)(tree, lora, _XS), theirs, atol=1e-5, rtol=0)
  # The output head is never a linear module of "all-linear" (PEFT excludes a model's output embeddings).
  head = {f"{PREFIX}lm_head.lora_A.weight": np.ones((2, _D), np.float32)}
  head[f"{PREFIX}lm_head.lora_B.weight"] = np.ones((3, 2), np.float32)
  _rewrite(tmp_path, {**tensors, **head}, {**cfg, "target_modules": "all-linear"})
  with pytest.warns(UserWarning, match=r"module\(s\) \['lm_head'\] that adapter_config.json does not select"):
    lora, _ = jlora.import_peft(tmp_path, tree)
  assert "lm_head" not in lora


@_PEFT_WARNINGS
def test_a_regex_target_that_selects_nothing_is_an_error_as_in_peft(tmp_path):
  tree = _attn_tree()
  _peft_file_of_every_module(tmp_path, tree)
  cfg, tensors = _read(tmp_path)
  _rewrite(tmp_path, tensors, {**cfg, "target_modules": r".*\.o_proj"})
  with pytest.raises(ValueError, match=r"Target modules .*o_proj not found in the base model"):
    _peft_outputs(tmp_path, tree)
  with pytest.raises(
    ValueError, match=r"`target_modules`='\.\*\\\\\.o_proj' select no module of the base model.*PEFT refuses"
  ):
    jlora.import_peft(tmp_path, tree)
  _rewrite(tmp_path, tensors, {**cfg, "target_modules": r".*\.q_proj", "layers_to_transform": [1]})
  with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
    _peft_outputs(tmp_path, tree)
  with pytest.raises(
    ValueError, match=r"`layers_to_transform`=\[1\] with a regex `target_modules`.*PEFT refuses"
  ):
    jlora.import_peft(tmp_path, tree)


@pytest.mark.parametrize(
  "fields",
  [
    {"target_modules": ["v_proj", "q_proj"]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
  ],
  ids=["list", "layers_to_transform"],
)
@_PEFT_WARNINGS
def test_peft_round_trip_keeps_target_modules_as_written(tmp_path, fields):
  tree = _attn_tree()
  torch, net = _attn_torch(tree)
  import peft  # noqa: PLC0415

  torch.manual_seed(1)
  pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **fields))
  pm.save_pretrained(str(tmp_path / "peft"))
  written, _ = _read(tmp_path / "peft")
  lora, cfg = jlora.import_peft(tmp_path / "peft", tree)
  assert cfg.target_modules == tuple(written["target_modules"])  # as PEFT wrote them (PEFT's order)
  assert cfg.layers_to_transform == (None if "layers_to_transform" not in fields else (1,))
  modules = 2 * (_LAYERS if "layers_to_transform" not in fields else 1)
  assert len(jax.tree_util.tree_leaves(lora)) == 2 * modules  # lora_A and lora_B of each adapted module
  back = jlora.export_peft(tmp_path / "back", lora, cfg, base=tree, task_type=None)
  again, _ = _read(tmp_path / "back")
  for field in ("target_modules", "layers_to_transform", "exclude_modules"):
    assert again[field] == written[field], field
  assert back["rank_pattern"] == {} and back["alpha_pattern"] == {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = _peft_outputs(tmp_path / "back", tree)
  with torch.no_grad():
    want = pm.eval()(torch.tensor(_XS)).numpy()
  np.testing.assert_allclose(theirs, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(jlora.wrap(_attn_apply, cfg)(tree, lora, _XS), want, atol=1e-5, rtol=0)


@_PEFT_WARNINGS
def test_short_target_modules_only_where_they_select_exactly_the_exported_modules(tmp_path):
  """Short names ['0', '2'] for attention/0 and attention/2 would also select the module
  encoder.stages.0 in PEFT (which refuses to adapt it): the export writes full names."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  keys = iter(jax.random.split(jax.random.key(4), 3))
  attn = {str(i): {"kernel": 0.5 * jax.random.normal(next(keys), (_D, _D))} for i in range(3)}
  tree = {"encoder": {"stages": {"0": {"attention": attn}}}}

  def apply(t, x):
    for i in range(3):
      x = jnp.tanh(x @ t["encoder"]["stages"]["0"]["attention"][str(i)]["kernel"])
    return x

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder = torch.nn.Module()
      self.encoder.stages = torch.nn.ModuleList([torch.nn.Module()])
      self.encoder.stages[0].attention = torch.nn.ModuleList(
        torch.nn.Linear(_D, _D, bias=False) for _ in range(3)
      )
      with torch.no_grad():
        for i, lin in enumerate(self.encoder.stages[0].attention):
          lin.weight.copy_(torch.tensor(np.asarray(attn[str(i)]["kernel"]).T))

    def forward(self, x):
      for lin in self.encoder.stages[0].attention:
        x = torch.tanh(lin(x))
      return x

  cfg = jlora.LoraConfig(r=2, target_modules=("attention/0", "attention/2"), init_lora_weights=False)
  lora = jlora.init(tree, cfg, key=jax.random.key(5))
  name_map = lambda path, index: ".".join(map(str, path[:-1]))  # noqa: E731
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=tree, name_map=name_map, task_type=None)
  assert pcfg["target_modules"] == ["encoder.stages.0.attention.0", "encoder.stages.0.attention.2"]
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(Net(), str(tmp_path)).eval()(torch.tensor(_XS)).numpy()
  ours = np.asarray(jlora.wrap(apply, cfg)(tree, lora, _XS))
  assert np.abs(ours - apply(tree, _XS)).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # The short names, by hand: PEFT selects encoder.stages.0 too, and refuses it.
  written, tensors = _read(tmp_path)
  _rewrite(tmp_path, tensors, {**written, "target_modules": ["0", "2"]})
  with pytest.raises(ValueError, match=r"(?s)Target module Module\(.*\(attention\).* is not supported"):
    peft.PeftModel.from_pretrained(Net(), str(tmp_path))
