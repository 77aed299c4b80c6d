"""PiSSA / OLoRA (`jlora.init_with_residual`) and their conversion to plain LoRA (`jlora.to_plain_lora`).

Shapes: Flax kernel ``(in, out)`` is PyTorch's ``weight`` ``(out, in)`` transposed; A ``(in, r)``, B
``(r, out)``. SVD and QR factors are unique up to the sign of each rank component, so comparisons
with PEFT use the sign-free ``B @ A`` and residual weights. float32 throughout; tolerances 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

INITS = ["pissa", "pissa_niter_4", "olora"]


def _apply(params, x):
  h = jnp.tanh(x @ params["fc1"]["kernel"])
  for layer in range(3):  # a stacked kernel (L, in, out), one layer at a time
    h = h + jnp.tanh(h @ params["stack"]["kernel"][layer])
  return h @ params["fc2"]["kernel"]


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 3)
  return {
    "fc1": {"kernel": jax.random.normal(k[0], (16, 24))},
    "stack": {"kernel": jax.random.normal(k[1], (3, 24, 24)) / 4},
    "fc2": {"kernel": jax.random.normal(k[2], (24, 8))},
  }


_X = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)


def _cfg(init, **kw):
  base = dict(
    r=4,
    lora_alpha=8,
    target_modules=("fc1", "stack", "fc2"),
    init_lora_weights=init,
    rank_pattern={"fc2": 2},
    layout_pattern={"stack": "sio"},
  )
  return jlora.LoraConfig(**{**base, **kw})


@pytest.mark.parametrize("init", INITS)
def test_residual_plus_adapter_is_the_base_model(init):
  params = _params()
  cfg = _cfg(init)
  lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
  assert lora["stack"]["kernel"]["lora_A"].shape == (3, 24, 4)
  assert lora["fc2"]["kernel"]["lora_B"].shape == (2, 8)
  apply = jlora.wrap(_apply, cfg)
  base = _apply(params, _X)
  # Outputs reach 25 after five products, so float32 rounding alone is ~1e-5 where they cancel: the absolute
  # tolerance is a few ulps of the largest output.
  np.testing.assert_allclose(apply(residual, lora, _X), base, atol=1e-6 * np.abs(base).max(), rtol=1e-5)
  chex_err = np.abs(np.asarray(apply(params, lora, _X)) - np.asarray(base)).max()
  assert chex_err > 1e-1  # the original base with the adapter counts the principal part twice
  for name in params:
    assert not np.allclose(residual[name]["kernel"], params[name]["kernel"], atol=1e-3)


def test_pissa_takes_the_top_singular_triplets_per_layer():
  params = _params()
  cfg = _cfg("pissa")
  lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
  for layer in range(3):
    w = np.asarray(params["stack"]["kernel"][layer], np.float64)
    u, s, vh = np.linalg.svd(w)
    ab = np.asarray(lora["stack"]["kernel"]["lora_A"][layer] @ lora["stack"]["kernel"]["lora_B"][layer])
    np.testing.assert_allclose(2.0 * ab, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(residual["stack"]["kernel"][layer])[1][:5], s[4:9], rtol=1e-4)
  a = np.asarray(lora["fc1"]["kernel"]["lora_A"])  # PiSSA: A's columns are orthogonal, |.|^2 = S/scale
  s = np.linalg.svd(np.asarray(params["fc1"]["kernel"]))[1]
  np.testing.assert_allclose(a.T @ a, np.diag(s[:4] / 2.0), atol=1e-4)


def test_layers_to_transform_and_quantized_bases():
  params = _params()
  cfg = _cfg("pissa", layers_to_transform=(0, 2), target_modules=("stack",), rank_pattern={})
  lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
  assert lora["stack"]["kernel"]["lora_A"].shape == (2, 24, 4)
  np.testing.assert_array_equal(residual["stack"]["kernel"][1], params["stack"]["kernel"][1])
  np.testing.assert_allclose(
    jlora.merge(residual, lora, cfg)["stack"]["kernel"], params["stack"]["kernel"], atol=1e-5
  )

  qparams = jlora.quantize(params, qtype="int8", block_size=None, targets=("fc1",))
  cfg = _cfg("pissa", target_modules=("fc1",), rank_pattern={})
  lora, residual = jlora.init_with_residual(qparams, cfg, key=jax.random.key(1))
  res = residual["fc1"]["kernel"]
  assert isinstance(res, jlora.QuantizedArray) and res.format == qparams["fc1"]["kernel"].format
  merged = jlora.merge(residual, lora, cfg)["fc1"]["kernel"]
  deq = qparams["fc1"]["kernel"].dequantize()
  # Quantizing the residual loses less than quantizing W did (its range is smaller).
  assert np.abs(merged - deq).max() < np.abs(deq - params["fc1"]["kernel"]).max()


def test_init_refuses_residual_inits_and_bad_ranks():
  params = _params()
  with pytest.raises(ValueError, match=r"lora, residual = jlora.init_with_residual"):
    jlora.init(params, _cfg("olora"), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"needs rank <= min\(in, out\) = 8"):
    jlora.init_with_residual(params, _cfg("pissa", rank_pattern={"fc2": 9}), key=jax.random.key(0))
  emb = {"embed": {"embedding": jnp.ones((10, 4))}}
  with pytest.raises(ValueError, match="embedding kernel: PEFT computes PiSSA and OLoRA for linear layers"):
    jlora.init_with_residual(
      emb, jlora.LoraConfig(r=2, target_modules=("embed",), init_lora_weights="pissa"), key=jax.random.key(0)
    )
  lora, same = jlora.init_with_residual(params, _cfg(True), key=jax.random.key(0))
  assert same is params


@pytest.mark.parametrize("init", INITS)
def test_to_plain_lora_on_the_original_base(init):
  params = _params()
  cfg = _cfg(init)
  lora0, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
  trained = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), lora0)
  plain, pcfg = jlora.to_plain_lora(trained, lora0, cfg)
  assert pcfg.r == 8 and pcfg.rank_for("fc2") == 4 and pcfg.scale_for("fc2") == cfg.scale_for("fc2")
  assert plain["fc1"]["kernel"]["lora_A"].shape == (16, 8)
  want = jlora.wrap(_apply, cfg)(residual, trained, _X)
  np.testing.assert_allclose(jlora.wrap(_apply, pcfg)(params, plain, _X), want, atol=1e-4, rtol=1e-5)


# -- against PEFT ------------------------------------------------------------------------------


def _torch(params):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2 = torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 8, bias=False)

    def forward(self, x):
      return self.fc2(torch.tanh(self.fc1(x)))

  m = M().eval()
  with torch.no_grad():
    for name in ("fc1", "fc2"):
      getattr(m, name).weight.copy_(torch.tensor(np.array(params[name]["kernel"]).T))
  return torch, m


def _flax(params, x):
  return jnp.tanh(x @ params["fc1"]["kernel"]) @ params["fc2"]["kernel"]


_NAMES = lambda path, index: str(path[0])  # noqa: E731


# PEFT warns that PiSSA/OLoRA change the base when it loads the initial adapter to convert.
@pytest.mark.filterwarnings("ignore:.*changes the base weights:UserWarning")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_against_peft(init, tmp_path):
  key = jax.random.split(jax.random.key(3), 2)
  params = {
    "fc1": {"kernel": jax.random.normal(key[0], (16, 24)) / 4},
    "fc2": {"kernel": jax.random.normal(key[1], (24, 8)) / 4},
  }
  torch, model = _torch(params)
  import copy  # noqa: PLC0415

  import peft  # noqa: PLC0415

  original = copy.deepcopy(model)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=("fc1", "fc2"), init_lora_weights=init)
  pm = peft.get_peft_model(
    model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=init)
  )
  lora0, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(0))
  diffs = []
  for name in ("fc1", "fc2"):
    layer = getattr(pm.base_model.model, name)
    a, b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    ours = np.asarray(lora0[name]["kernel"]["lora_B"].T @ lora0[name]["kernel"]["lora_A"].T)
    diffs += [np.abs(ours - b @ a).max()]
    theirs_res = layer.base_layer.weight.detach().numpy().T
    diffs += [np.abs(np.asarray(residual[name]["kernel"]) - theirs_res).max()]
  print(f"{init}: B@A and residual vs PEFT max abs diff {max(diffs):.2e}")
  assert max(diffs) < 1e-5

  # Train (a fixed perturbation), give PEFT the same trained factors, convert both ways.
  trained = jax.tree.map(lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), lora0)
  init_dir, peft_dir, ours_dir = (str(tmp_path / n) for n in ("init", "peft", "ours"))
  pm.save_pretrained(init_dir)
  with torch.no_grad():
    for name in ("fc1", "fc2"):
      layer = getattr(pm.base_model.model, name)
      layer.lora_A["default"].weight.copy_(torch.tensor(np.array(trained[name]["kernel"]["lora_A"]).T))
      layer.lora_B["default"].weight.copy_(torch.tensor(np.array(trained[name]["kernel"]["lora_B"]).T))
  trained_logits = jlora.wrap(_flax, cfg)(residual, trained, _X)
  # PEFT's model runs on PEFT's residual, which differs from jlora's by its SVD's rounding (checked to
  # 1e-5 above); the wrapped apply is compared on the same residual, so that rounding is not counted twice.
  theirs_residual = {
    name: {"kernel": jnp.asarray(getattr(pm.base_model.model, name).base_layer.weight.detach().numpy().T)}
    for name in ("fc1", "fc2")
  }
  with torch.no_grad():
    np.testing.assert_allclose(
      pm(torch.as_tensor(_X)).numpy(), jlora.wrap(_flax, cfg)(theirs_residual, trained, _X), atol=1e-5
    )
  pm.save_pretrained(peft_dir, path_initial_model_for_weight_conversion=init_dir)
  jlora.export_peft(ours_dir, trained, cfg, initial_lora=lora0, name_map=_NAMES, base=params, task_type=None)
  import json  # noqa: PLC0415

  import safetensors.numpy  # noqa: PLC0415

  theirs_cfg = json.load(open(f"{peft_dir}/adapter_config.json"))
  ours_cfg = json.load(open(f"{ours_dir}/adapter_config.json"))
  for field in ("r", "lora_alpha", "init_lora_weights"):
    assert ours_cfg[field] == theirs_cfg[field], field
  theirs_t = safetensors.numpy.load_file(f"{peft_dir}/adapter_model.safetensors")
  ours_t = safetensors.numpy.load_file(f"{ours_dir}/adapter_model.safetensors")
  assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}
  for name in ("fc1", "fc2"):
    k = f"base_model.model.{name}.lora_"
    dw = lambda t, k=k: t[k + "B.weight"] @ t[k + "A.weight"]  # noqa: E731
    np.testing.assert_allclose(dw(ours_t), dw(theirs_t), atol=1e-5)
  loaded = peft.PeftModel.from_pretrained(original, ours_dir).eval()
  with torch.no_grad():
    got = loaded(torch.as_tensor(_X)).numpy()
  print(
    f"{init}: converted adapter on the original base in PEFT vs jlora max abs diff "
    f"{np.abs(got - np.asarray(trained_logits)).max():.2e}"
  )
  # From here PEFT's own decomposition of the base enters (its converted file; its load of ours): the two
  # libraries' float32 SVDs give principal parts 5e-6 apart (each library's logits are within 3e-7 of float64
  # on its own residual), 1e-5 in the logits.
  np.testing.assert_allclose(got, trained_logits, atol=3e-5)
  lora_back, cfg_back = jlora.import_peft(peft_dir, params, name_map=_NAMES)
  np.testing.assert_allclose(jlora.wrap(_flax, cfg_back)(params, lora_back, _X), trained_logits, atol=3e-5)


@pytest.mark.parametrize("init", INITS)
def test_float64_kernels_are_decomposed_in_float64(init):
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), _params())
    cfg = _cfg(init)
    lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
    node = lora["fc1"]["kernel"]
    assert node["lora_A"].dtype == residual["fc1"]["kernel"].dtype == jnp.float64
    w = np.asarray(params["fc1"]["kernel"])
    ab = 2.0 * np.asarray(node["lora_A"]) @ np.asarray(node["lora_B"])  # scale 8 / 4
    np.testing.assert_allclose(np.asarray(residual["fc1"]["kernel"]) + ab, w, atol=1e-12)  # float32: ~1e-6
    if init == "pissa":
      u, s, vh = np.linalg.svd(w)
      np.testing.assert_allclose(ab, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-11)
