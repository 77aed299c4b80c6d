"""PEFT's ConvNd LoRA on Hugging Face Flax models, against their PyTorch twins (same weights) with PEFT.

A ResNet (convolutions and BatchNorm), a ViT (a patch-embedding convolution beside Linear layers) and a
Wav2Vec2 (a conv stem, and a weight-normed grouped convolution jlora refuses as computed): PEFT's files
import with PEFT's outputs, jlora's load in PEFT with jlora's, and `summary` counts as PEFT (float32, atol
1e-5, 4e-5 where the outputs are ~10). The conversion itself, on small CNNs: `tests/io/peft/test_conv.py`.
Needs torch, peft and transformers < 4.58 (the last with Flax models); skipped otherwise.
"""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
R, ALPHA, ATOL = 2, 4, 1e-5


def _hf_resnet():
  """Hugging Face's Flax ResNet (tiny config, random weights) and its PyTorch twin with the same weights.

  transformers' own Flax -> PyTorch loader misses this model's weights (Flax nests ``layer/layer_0`` where
  PyTorch has ``layer.0``), so they are copied here: conv ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``,
  BatchNorm ``scale``/``mean``/``var`` -> ``weight``/``running_mean``/``running_var``.
  """
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxResNetModel"):
    pytest.skip("transformers >= 4.58 has no Flax models")
  from flax.traverse_util import flatten_dict  # noqa: PLC0415

  rc = transformers.ResNetConfig(
    embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_channels=3
  )
  fm = transformers.FlaxResNetModel(rc, input_shape=(1, 32, 32, 3), seed=0)
  # BatchNorm statistics and scales away from their defaults, so the twins' agreement means something.
  fm.params = jax.tree.map(lambda p: p + 0.01 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), fm.params)
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

  def twin():
    pt = transformers.ResNetModel(rc).eval()
    sd = pt.state_dict()
    for (_, *path, name), value in flatten_dict(fm.params).items():
      v = np.array(value)  # a writable copy for torch
      sd[_resnet_name(".".join(path)) + "." + leaf[name]] = torch.as_tensor(
        np.ascontiguousarray(v.transpose(3, 2, 0, 1)) if name == "kernel" else v
      )
    pt.load_state_dict(sd)
    return pt

  return fm, twin


def _resnet_name(flax_name: str) -> str:
  return re.sub(r"layer\.layer_(\d+)", r"layer.\1", flax_name)


def _resnet_name_map(path, index):
  """The PEFT names of the Flax ResNet's weights: the HF Flax map, without Flax's extra ``layer`` level."""
  return jlora.peft_module_name(path, index).replace("layer.layer.", "layer.")


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_hugging_face_resnet_against_peft_both_ways(tmp_path, dora):
  """A real model's convolutions (HF Flax ResNet vs PyTorch ResNet with PEFT): PEFT's file imports with PEFT's
  outputs, jlora's trained adapter loads in PEFT with jlora's, and `summary` counts as PEFT (BatchNorm
  statistics are buffers, not parameters)."""
  fm, twin = _hf_resnet()
  x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  fn = lambda p, x: fm(x, params=p).last_hidden_state  # noqa: E731
  with torch.no_grad():
    np.testing.assert_allclose(
      twin()(torch.as_tensor(x)).last_hidden_state.numpy(), fn(fm.params, x), atol=1e-5
    )
  pcfg = peft.LoraConfig(
    r=R, lora_alpha=ALPHA, target_modules=["convolution"], init_lora_weights=False, use_dora=dora
  )
  pm = peft.get_peft_model(twin(), pcfg).eval()
  pm.save_pretrained(tmp_path / "peft")
  with torch.no_grad():
    theirs = pm(torch.as_tensor(x)).last_hidden_state.numpy()
  lora, cfg = jlora.import_peft(
    tmp_path / "peft", fm.params, name_map=_resnet_name_map, apply_fn=fn, example_args=(x,)
  )
  assert len(jax.tree.leaves(lora)) == 6 * (3 if dora else 2)  # every conv of the model, none missed
  np.testing.assert_allclose(jlora.wrap(fn, cfg)(fm.params, lora, x), theirs, atol=ATOL * 4)  # |y| ~ 10
  assert jlora.summary(fm.params, lora, cfg).startswith(
    "trainable params: {:,d} || all params: {:,d} ".format(*pm.get_nb_trainable_parameters())
  )
  trained = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), lora)
  jlora.export_peft(
    tmp_path / "ours", trained, cfg, base=fm.params, name_map=_resnet_name_map, task_type=None,
    apply_fn=fn, example_args=(x,),
  )  # fmt: skip
  loaded = peft.PeftModel.from_pretrained(twin(), tmp_path / "ours").eval()
  with torch.no_grad():
    got = loaded(torch.as_tensor(x)).last_hidden_state.numpy()
  np.testing.assert_allclose(got, jlora.wrap(fn, cfg)(fm.params, trained, x), atol=ATOL * 4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings(
  "ignore:The given NumPy array is not writable:UserWarning"
)  # transformers' loader
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_hugging_face_vit_convolution_and_linears_against_peft(tmp_path, dora):
  """HF's Flax ViT against its PyTorch twin (transformers' own Flax -> PyTorch loader): one PEFT file with a
  ConvNd adapter (the patch embedding) beside Linear ones (query, value, the MLP and output ``dense``) both
  ways, and `summary` counts as PEFT."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxViTModel"):
    pytest.skip("transformers >= 4.58 has no Flax models")
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model  # noqa: PLC0415

  vc = transformers.ViTConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
    patch_size=4, num_channels=3,
  )  # fmt: skip
  fm = transformers.FlaxViTModel(vc, seed=0)
  twin = lambda: load_flax_weights_in_pytorch_model(transformers.ViTModel(vc), fm.params).eval()  # noqa: E731
  x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
  fn = lambda p, x: fm(x, params=p).last_hidden_state  # noqa: E731
  names = jlora.peft_module_name  # the Flax ViT mirrors PyTorch's module tree
  targets = ["projection", "query", "value", "dense"]
  pm = peft.get_peft_model(
    twin(),
    peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False, use_dora=dora),
  ).eval()
  pm.save_pretrained(tmp_path / "peft")
  assert len(safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")[
    PREFIX + "embeddings.patch_embeddings.projection.lora_A.weight"
  ].shape) == 4  # fmt: skip
  with torch.no_grad():
    theirs = pm(torch.as_tensor(x)).last_hidden_state.numpy()
  lora, cfg = jlora.import_peft(tmp_path / "peft", fm.params, name_map=names, apply_fn=fn, example_args=(x,))
  assert len(jax.tree.leaves(lora)) == 12 * (3 if dora else 2)  # the patch conv and 11 Linears
  np.testing.assert_allclose(jlora.wrap(fn, cfg)(fm.params, lora, x), theirs, atol=ATOL, rtol=ATOL)
  assert jlora.summary(fm.params, lora, cfg).startswith(
    "trainable params: {:,d} || all params: {:,d} ".format(*pm.get_nb_trainable_parameters())
  )
  trained = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), lora)
  export = dict(base=fm.params, name_map=names, task_type=None)
  with pytest.raises(
    ValueError, match=r"'embeddings/patch_embeddings/projection/kernel'.*may be a convolution"
  ):
    jlora.export_peft(tmp_path / "no_model", trained, cfg, **export)
  jlora.export_peft(tmp_path / "ours", trained, cfg, apply_fn=fn, example_args=(x,), **export)
  loaded = peft.PeftModel.from_pretrained(twin(), tmp_path / "ours").eval()
  with torch.no_grad():
    got = loaded(torch.as_tensor(x)).last_hidden_state.numpy()
  np.testing.assert_allclose(got, jlora.wrap(fn, cfg)(fm.params, trained, x), atol=ATOL, rtol=ATOL)


def _hf_wav2vec2():
  """transformers' Flax Wav2Vec2 (tiny config): a conv stem (`feature_extractor/conv_layers/<i>/conv`), and a
  positional convolution whose kernel the model computes from `weight_v` and `weight_g` (weight norm,
  grouped); its PyTorch twin with the same weights, and a waveform."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxWav2Vec2Model"):
    pytest.skip("transformers >= 4.58 has no Flax models")
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model  # noqa: PLC0415

  config = transformers.Wav2Vec2Config(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, conv_dim=(8, 8),
    conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    do_stable_layer_norm=True, feat_extract_norm="layer",
  )  # fmt: skip
  flax_model = transformers.FlaxWav2Vec2Model(config, seed=0, dtype=jnp.float32)
  params = flax_model.params
  wav = jnp.asarray(np.random.default_rng(0).normal(size=(2, 400)), jnp.float32)

  def apply_fn(p, w):
    return flax_model(w, params=p).last_hidden_state

  def twin():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # transformers' chatter about the weights it copies
      m = transformers.Wav2Vec2Model(config)
      load_flax_weights_in_pytorch_model(m, jax.tree_util.tree_map(np.asarray, params))
    return m.eval()

  return params, apply_fn, twin, wav


def test_a_weight_normed_conv_is_refused_as_computed_and_the_conv_stem_matches_peft(tmp_path):
  params, apply_fn, twin, wav = _hf_wav2vec2()
  run = lambda m: m(torch.tensor(np.asarray(wav))).last_hidden_state.detach().numpy()  # noqa: E731
  assert np.abs(run(twin()) - np.asarray(apply_fn(params, wav))).max() < 1e-5  # the twin
  cfg = jlora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=("conv",), init_lora_weights=False)
  computed = (
    r"'encoder/pos_conv_embed/conv/weight_g'.*computed, not a leaf.*exclude_modules=\('encoder/pos_conv"
  )
  with pytest.raises(ValueError, match=computed):
    jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=(wav,))
  # the fix the error gives: the conv stem alone, which PEFT computes as jlora does
  cfg = jlora.LoraConfig(
    r=R, lora_alpha=ALPHA, target_modules=("conv",), exclude_modules=("pos_conv_embed/conv",),
    init_lora_weights=False,
  )  # fmt: skip
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=(wav,))
  assert sorted(lora["feature_extractor"]["conv_layers"]) == ["0", "1"] and "encoder" not in lora
  jlora.export_peft(
    tmp_path / "out", lora, cfg, base=params, apply_fn=apply_fn, example_args=(wav,), task_type=None
  )
  got = np.asarray(jlora.wrap(apply_fn, cfg)(params, lora, wav))
  assert np.abs(got - np.asarray(apply_fn(params, wav))).max() > 1e-3
  np.testing.assert_allclose(run(peft.PeftModel.from_pretrained(twin(), tmp_path / "out")), got, atol=1e-5)
  # a PEFT file that adapts the weight-normed conv too (PEFT wraps PyTorch's parametrized Conv1d)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT's warning about the grouped conv's merging
    pm = peft.get_peft_model(twin(), peft.LoraConfig(r=R, target_modules=["conv"], init_lora_weights=False))
  pm.save_pretrained(tmp_path / "peft")
  with pytest.raises(ValueError, match=r"PEFT module 'encoder.pos_conv_embed.conv' adapts.*" + computed):
    jlora.import_peft(tmp_path / "peft", params, apply_fn=apply_fn, example_args=(wav,))


def test_wav2vec2_all_linear_exports_its_feature_projection_without_a_name_map(tmp_path):
  params, apply_fn, twin, wav = _hf_wav2vec2()
  cfg = jlora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=apply_fn, example_args=(wav,))
  assert "projection" in lora["feature_projection"]  # outside the layer stack
  jlora.export_peft(tmp_path, lora, cfg, base=params, apply_fn=apply_fn, example_args=(wav,), task_type=None)
  tensors = safetensors.numpy.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  assert tensors[f"{PREFIX}feature_projection.projection.lora_A.weight"].shape == (R, 8)
  pm = peft.PeftModel.from_pretrained(twin(), tmp_path).eval()
  got = np.asarray(jlora.wrap(apply_fn, cfg)(params, lora, wav))
  assert np.abs(got - np.asarray(apply_fn(params, wav))).max() > 1e-3
  # 2e-5: float32 rounding over the layer-normed conv stem (the twins alone differ by ~2e-6)
  np.testing.assert_allclose(
    pm(torch.tensor(np.asarray(wav))).last_hidden_state.detach().numpy(), got, atol=2e-5
  )
