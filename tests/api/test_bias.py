"""PEFT's ``bias`` ("none", "all", "lora_only"): trained biases as saved copies in the adapter tree.

The model: ``fc2(layer_norm(fc1(x)))`` with biases everywhere, as a plain JAX
function over ``{"fc1": {"kernel" (in, out), "bias"}, "ln": {"scale", "bias"},
"fc2": ...}`` and as the same PyTorch module (``weight`` ``(out, in)``).
Comparisons against PEFT: float32, logits within 1e-5. The same on Hugging Face models (OPT, BERT, GPT-2):
`tests/e2e/test_peft_families.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def _apply(params, x):
  p = params
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["scale"] + p["ln"]["bias"]
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 6)
  return {
    "fc1": {"kernel": jax.random.normal(k[0], (4, 8)), "bias": jax.random.normal(k[1], (8,))},
    "ln": {"scale": 1 + 0.1 * jax.random.normal(k[2], (8,)), "bias": jax.random.normal(k[3], (8,))},
    "fc2": {"kernel": jax.random.normal(k[4], (8, 3)), "bias": jax.random.normal(k[5], (3,))},
  }


_NAMES = lambda path, index: str(path[0])  # noqa: E731  (module names: fc1, ln, fc2)
_X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


@pytest.mark.parametrize(
  ("bias", "copied"), [("none", set()), ("all", {"fc1", "ln", "fc2"}), ("lora_only", {"fc1"})]
)
def test_init_copies_the_biases_the_mode_trains(bias, copied):
  params = _params()
  cfg = jlora.LoraConfig(r=2, target_modules=("fc1",), bias=bias)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  assert {m for m in lora if "bias" in lora[m]} == copied
  for m in copied:
    assert lora[m]["bias"] is not params[m]["bias"]
    np.testing.assert_array_equal(lora[m]["bias"], params[m]["bias"])


def test_trained_biases_replace_the_base_ones_in_wrap_and_merge():
  params = _params()
  cfg = jlora.LoraConfig(r=2, target_modules=("fc1",), bias="all", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  lora["ln"]["bias"] = lora["ln"]["bias"] + 1.0
  lora["fc2"]["bias"] = lora["fc2"]["bias"] - 2.0
  want = _apply(jlora.merge(params, lora, cfg), _X)
  hand = jax.tree.map(lambda x: x, params)
  hand["fc1"]["kernel"] = params["fc1"]["kernel"] + lora["fc1"]["kernel"]["lora_A"] @ lora["fc1"]["kernel"][
    "lora_B"
  ] * (cfg.lora_alpha / cfg.r)
  hand["ln"]["bias"], hand["fc2"]["bias"] = lora["ln"]["bias"], lora["fc2"]["bias"]
  np.testing.assert_allclose(want, _apply(hand, _X), atol=1e-5)
  np.testing.assert_allclose(jlora.wrap(_apply, cfg)(params, lora, _X), want, atol=1e-5)
  grads = jax.grad(lambda lo: jnp.sum(jlora.wrap(_apply, cfg)(params, lo, _X) ** 2))(lora)
  assert float(jnp.abs(grads["ln"]["bias"]).max()) > 0  # the copy is what trains


def test_adapter_trees_that_disagree_with_bias_are_errors():
  params = _params()
  cfg = jlora.LoraConfig(r=2, target_modules=("fc1",), bias="lora_only")
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  del lora["fc1"]["bias"]
  with pytest.raises(ValueError, match=r"no trained copy of \['fc1/bias'\].*`bias`='lora_only'"):
    jlora.merge(params, lora, cfg)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  lora["fc2"] = {"bias": params["fc2"]["bias"]}
  with pytest.raises(ValueError, match="full copy of 'fc2/bias'.*`bias`='lora_only' does not train it"):
    jlora.merge(params, lora, cfg)
  with pytest.raises(ValueError, match="`bias` must be one of"):
    jlora.LoraConfig(r=2, target_modules=("fc1",), bias="some")


# -- against PEFT ------------------------------------------------------------------------------


def _torch_model(params):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")

  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.ln, self.fc2 = torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)

    def forward(self, x):
      return self.fc2(self.ln(self.fc1(x)))

  m = M().eval()
  with torch.no_grad():
    for name in ("fc1", "fc2"):
      getattr(m, name).weight.copy_(torch.tensor(np.array(params[name]["kernel"]).T))
      getattr(m, name).bias.copy_(torch.tensor(np.array(params[name]["bias"])))
    m.ln.weight.copy_(torch.tensor(np.array(params["ln"]["scale"])))
    m.ln.bias.copy_(torch.tensor(np.array(params["ln"]["bias"])))
  return torch, m


def _logits(torch, model):
  with torch.no_grad():
    return model(torch.as_tensor(_X)).numpy()


@pytest.mark.parametrize(("bias", "trainable"), [("all", 43), ("lora_only", 32)])
def test_summary_counts_as_peft(bias, trainable):
  params = _params()
  torch, model = _torch_model(params)
  import peft  # noqa: PLC0415

  pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["fc1"], bias=bias))
  n_train, n_all = pm.get_nb_trainable_parameters()
  cfg = jlora.LoraConfig(r=2, target_modules=("fc1",), bias=bias)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  assert (n_train, n_all) == (trainable, 107)
  assert jlora.summary(params, lora, cfg).startswith(f"trainable params: {n_train} || all params: {n_all} ||")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_exported_biases_load_in_peft(bias, tmp_path):
  params = _params()
  torch, model = _torch_model(params)
  import peft  # noqa: PLC0415

  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("fc1", "fc2"), bias=bias, init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  lora["fc1"]["bias"] = lora["fc1"]["bias"] + 0.5
  if bias == "all":
    lora["ln"]["bias"] = lora["ln"]["bias"] - 0.25
  written = jlora.export_peft(tmp_path, lora, cfg, name_map=_NAMES, base=params, task_type=None)
  assert written["bias"] == bias
  ours = np.asarray(jlora.wrap(_apply, cfg)(params, lora, _X))
  theirs = _logits(torch, peft.PeftModel.from_pretrained(model, str(tmp_path)).eval())
  assert np.abs(ours - _apply(params, _X)).max() > 1e-2
  print(f"bias={bias}: jlora -> PEFT logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_saved_biases_import(bias, tmp_path):
  params = _params()
  torch, model = _torch_model(params)
  import peft  # noqa: PLC0415

  pm = peft.get_peft_model(
    model, peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], bias=bias, init_lora_weights=False)
  )
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if name.endswith("bias") and p.requires_grad:
        p.add_(0.3)
  theirs = _logits(torch, pm.eval())
  pm.save_pretrained(str(tmp_path))
  lora, cfg = jlora.import_peft(tmp_path, params, name_map=_NAMES)
  assert cfg.bias == bias and cfg.modules_to_save is None
  ours = np.asarray(jlora.wrap(_apply, cfg)(params, lora, _X))
  assert np.abs(ours - _apply(params, _X)).max() > 1e-2
  print(f"bias={bias}: PEFT -> jlora logits max abs diff {np.abs(ours - theirs).max():.2e}")
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_lora_only_bias_of_a_stacked_kernel_adapted_in_part_is_refused():
  params = {"params": {"layers": {"up": {"kernel": jnp.ones((4, 8, 5)), "bias": jnp.ones((4, 5))}}}}
  common = dict(r=2, target_modules=("up",), layers_to_transform=(1, 2), layout_pattern={"up": "sio"})
  with pytest.raises(ValueError, match=r"only layers \[1, 2\] of the stacked kernel at 'params/layers/up"):
    jlora.init(params, jlora.LoraConfig(**common, bias="lora_only"), key=jax.random.key(0))
  # bias="all" trains every bias of every layer, as PEFT does: allowed, and counted whole.
  cfg = jlora.LoraConfig(**common, bias="all")
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  assert lora["params"]["layers"]["up"]["bias"].shape == (4, 5)
  # A tree made otherwise (here by hand) is refused when it is read, too.
  cut = jlora.LoraConfig(**common, bias="lora_only")
  with pytest.raises(ValueError, match="bias='lora_only' with layers_to_transform"):
    jlora.merge(params, lora, cut)


def test_summary_without_the_config_refuses_bias_copies():
  params = _params()
  cfg = jlora.LoraConfig(r=2, target_modules=("fc1",), bias="all")
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  with pytest.raises(
    ValueError, match=r"copies of biases \(\['fc1/bias', 'fc2/bias', 'ln/bias'\]\).*Pass the config"
  ):
    jlora.summary(params, lora)
