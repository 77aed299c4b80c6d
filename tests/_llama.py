"""A tiny Llama in Flax Linen whose module tree mirrors Hugging Face's `LlamaForCausalLM`.

Used by the PEFT interop tests: weights are copied from a PyTorch model, so
the jlora path ``params/model/layers_0/self_attn/q_proj/kernel`` is PEFT's
``model.layers.0.self_attn.q_proj``. Kernels are ``(in, out)``, the transpose
of PyTorch's Linear ``weight`` ``(out, in)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


class Attention(nn.Module):
  heads: int
  kv_heads: int
  head_dim: int
  inv_freq: tuple

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name, precision="highest")  # noqa: E731
    q = dense(self.heads * self.head_dim, "q_proj")(x).reshape(b, t, self.heads, self.head_dim)
    k = dense(self.kv_heads * self.head_dim, "k_proj")(x).reshape(b, t, self.kv_heads, self.head_dim)
    v = dense(self.kv_heads * self.head_dim, "v_proj")(x).reshape(b, t, self.kv_heads, self.head_dim)
    freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(self.inv_freq, jnp.float32)[None]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[None, :, None], jnp.sin(emb)[None, :, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    rep = self.heads // self.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(self.head_dim)
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision="highest")
    return dense(x.shape[-1], "o_proj")(out.reshape(b, t, -1))


class Mlp(nn.Module):
  intermediate: int

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name, precision="highest")  # noqa: E731
    h = nn.silu(dense(self.intermediate, "gate_proj")(x)) * dense(self.intermediate, "up_proj")(x)
    return dense(x.shape[-1], "down_proj")(h)


class Layer(nn.Module):
  cfg: dict

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    attn = Attention(c["heads"], c["kv_heads"], c["head_dim"], c["inv_freq"], name="self_attn")
    x = x + attn(RMSNorm(c["eps"], name="input_layernorm")(x))
    return x + Mlp(c["intermediate"], name="mlp")(RMSNorm(c["eps"], name="post_attention_layernorm")(x))


class Model(nn.Module):
  cfg: dict

  @nn.compact
  def __call__(self, ids):
    c = self.cfg
    x = nn.Embed(c["vocab"], c["hidden"], name="embed_tokens")(ids)
    for i in range(c["layers"]):
      x = Layer(c, name=f"layers_{i}")(x)
    return RMSNorm(c["eps"], name="norm")(x)


class LlamaForCausalLM(nn.Module):
  cfg: dict

  @nn.compact
  def __call__(self, ids):
    x = Model(self.cfg, name="model")(ids)
    return nn.Dense(self.cfg["vocab"], use_bias=False, name="lm_head", precision="highest")(x)


def from_torch(torch_model):
  """``(flax_module, variables)`` with the weights of a transformers `LlamaForCausalLM`."""
  hf = torch_model.config
  sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
  head_dim = hf.hidden_size // hf.num_attention_heads
  cfg = dict(
    vocab=hf.vocab_size,
    hidden=hf.hidden_size,
    intermediate=hf.intermediate_size,
    layers=hf.num_hidden_layers,
    heads=hf.num_attention_heads,
    kv_heads=hf.num_key_value_heads,
    head_dim=head_dim,
    eps=hf.rms_norm_eps,
    inv_freq=tuple(float(f) for f in torch_model.model.rotary_emb.inv_freq.cpu().numpy()),
  )
  params: dict = {}

  def put(path, value):
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jnp.asarray(value)

  for key, value in sd.items():
    parts = key.split(".")
    if parts[-1] != "weight":
      continue
    if parts[:2] == ["model", "layers"]:
      parts = ["model", f"layers_{parts[2]}"] + parts[3:]
    mod = parts[:-1]
    if mod[-1] == "embed_tokens":
      put(mod + ["embedding"], value)
    elif mod[-1].endswith("norm"):
      put(mod + ["scale"], value)
    else:
      put(mod + ["kernel"], value.T)
  return LlamaForCausalLM(cfg), {"params": params}
