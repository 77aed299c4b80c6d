"""Helpers for the PEFT file tests (`tests/io/peft/`, `tests/e2e/test_peft_torch.py`): small trees, the
files read and edited by hand, and PyTorch twins for the comparisons against PEFT.

Shapes: Flax kernel ``(in, out)``; jlora ``lora_A`` ``(in, r)``, ``lora_B``
``(r, out)``; PEFT ``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)``.
The PyTorch comparisons run where ``torch``, ``transformers`` and ``peft`` are
installed (CPU, float32, atol 1e-4 on logits).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

PREFIX = "base_model.model."
# The order PEFT registers expert parameters in (GptOss/Llama4 register gate_up_proj first).
EXPERT_ORDER = {"gate_up_proj": 0, "down_proj": 1}


def linen_tree(key=0):
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


def config(**kw):
  base = dict(r=3, lora_alpha=6, target_modules=("q_proj", "v_proj", "embed_tokens"), init_lora_weights=False)
  base.update(kw)
  return jlora.LoraConfig(**base)


def read(directory):
  with open(os.path.join(directory, "adapter_config.json")) as f:
    cfg = json.load(f)
  return cfg, safetensors.numpy.load_file(os.path.join(directory, "adapter_model.safetensors"))


def rewrite(directory, tensors=None, config=None):
  """Edits the files by hand, as a PEFT user would: the re-saved tensors carry no jlora checksum."""
  if tensors is None:
    _, tensors = read(directory)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
  if config is not None:
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
      json.dump(config, f)


def torch_llama(seed=0):
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


def torch_logits(torch, model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias; harmless to these tests.
PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


D, LAYERS = 6, 2


PROJ = ("q_proj", "k_proj", "v_proj")


def attn_tree(key=0):
  k = iter(jax.random.split(jax.random.key(key), 3 * LAYERS))
  layer = lambda: {"self_attn": {p: {"kernel": 0.4 * jax.random.normal(next(k), (D, D))} for p in PROJ}}  # noqa: E731
  return {"model": {f"layers_{i}": layer() for i in range(LAYERS)}}


def attn_apply(tree, x):
  for i in range(LAYERS):
    attn = tree["model"][f"layers_{i}"]["self_attn"]
    x = jnp.tanh(x + sum(x @ attn[p]["kernel"] for p in PROJ))
  return x


def attn_torch(tree):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")

  class Layer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn = torch.nn.Module()
      for p in PROJ:
        setattr(self.self_attn, p, torch.nn.Linear(D, D, bias=False))

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = torch.nn.Module()
      self.model.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x):
      for layer in self.model.layers:
        x = torch.tanh(x + sum(getattr(layer.self_attn, p)(x) for p in PROJ))
      return x

  net = Net().eval()
  with torch.no_grad():
    for i, layer in enumerate(net.model.layers):
      for p in PROJ:
        w = np.asarray(tree["model"][f"layers_{i}"]["self_attn"][p]["kernel"]).T
        getattr(layer.self_attn, p).weight.copy_(torch.tensor(w))
  return torch, net


XS = np.random.default_rng(3).normal(size=(4, D)).astype(np.float32)


def peft_file_of_every_module(directory, tree):
  """A PEFT file with tensors for q, k and v of every layer (PEFT's own save, trained-looking)."""
  torch, net = attn_torch(tree)
  import peft  # noqa: PLC0415

  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(PROJ), init_lora_weights=False)
  peft.get_peft_model(net, cfg).save_pretrained(str(directory))


def peft_outputs(directory, tree):
  torch, net = attn_torch(tree)
  import peft  # noqa: PLC0415

  with torch.no_grad():
    return peft.PeftModel.from_pretrained(net, str(directory)).eval()(torch.tensor(XS)).numpy()
