"""A zoo of small models built from configs with random weights (nothing downloaded).

Each entry gives the model's apply function, its base tree, example inputs, a
target config, and the adapter shapes PEFT would build for the equivalent
PyTorch model, so tests can compare against independent expectations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jlora
from jlora._src.adapters.spec import AdapterSpec
from jlora._src.core.layouts import Layout

VOCAB, D, HEADS, FF, LAYERS, SEQ, BATCH = 32, 16, 2, 24, 2, 6, 2


# -- Llama-style decoder (Linen) ------------------------------------------------


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embedding over (batch, seq, heads, head_dim)."""
  seq, dim = x.shape[1], x.shape[-1]
  freqs = 1.0 / (10000 ** (jnp.arange(0, dim, 2) / dim))
  angles = jnp.arange(seq)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = x[..., ::2], x[..., 1::2]
  return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


def causal_attention(q, k, v):
  dh = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
  mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  logits = jnp.where(mask, logits, -1e9)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


class LlamaBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    b, t, _d = x.shape
    dh = D // HEADS
    h = RMSNorm(name="input_layernorm")(x)
    q = nn.Dense(D, use_bias=False, name="q_proj")(h).reshape(b, t, HEADS, dh)
    k = nn.Dense(D, use_bias=False, name="k_proj")(h).reshape(b, t, HEADS, dh)
    v = nn.Dense(D, use_bias=False, name="v_proj")(h).reshape(b, t, HEADS, dh)
    att = causal_attention(rotary(q), rotary(k), v).reshape(b, t, D)
    x = x + nn.Dense(D, use_bias=False, name="o_proj")(att)
    h = RMSNorm(name="post_attention_layernorm")(x)
    gate = nn.Dense(FF, use_bias=False, name="gate_proj")(h)
    up = nn.Dense(FF, use_bias=False, name="up_proj")(h)
    x = x + nn.Dense(D, use_bias=False, name="down_proj")(nn.silu(gate) * up)
    return x, None


class Llama(nn.Module):
  """Llama-style decoder; ``scan=True`` stacks the layers with ``nn.scan``."""

  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
    block = nn.remat(LlamaBlock) if self.remat else LlamaBlock
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
      x, _ = stack(name="layers")(x, None)
    else:
      for i in range(LAYERS):
        x, _ = block(name=f"layers_{i}")(x)
    x = RMSNorm(name="norm")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


# -- Flax MultiHeadDotProductAttention, an nn.jit module, a tied embedding head --


class MHAModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D, name="embed")
    x = embed(tokens)
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x, x, mask=mask)
    x = nn.LayerNorm(name="ln")(x)
    x = x + nn.jit(nn.Dense)(D, name="mlp")(nn.gelu(x))
    return embed.attend(x)


# -- convnet ----------------------------------------------------------------------


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(8, (3, 3), name="conv1")(images)
    x = nn.relu(x)
    x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv2")(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3,), name="conv1d")(x.reshape(x.shape[0], -1, x.shape[-1]))
    x = x.mean(axis=1)
    return nn.Dense(4, name="head")(x)


# -- NNX transformer --------------------------------------------------------------


class NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(D, D, rngs=rngs)
    self.k_proj = nnx.Linear(D, D, rngs=rngs)
    self.v_proj = nnx.Linear(D, D, rngs=rngs)
    self.o_proj = nnx.Linear(D, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.up_proj = nnx.Linear(D, FF, rngs=rngs)
    self.down_proj = nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, HEADS, D // HEADS)
    att = causal_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
    x = x + self.o_proj(att.reshape(b, t, D))
    return x + self.down_proj(nnx.gelu(self.up_proj(self.norm(x))))


class NNXTransformer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers = nnx.List([NNXBlock(rngs) for _ in range(LAYERS)])
    self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(x)


# -- gemma-style einsums: `w` leaves, fused k/v, a module holding two weights -------------------


KV_HEADS = 1


class Einsum(nn.Module):
  """gemma's `_layers.Einsum`: one weight (named ``w`` unless told), used by ``jnp.einsum``."""

  shape: tuple[int, ...]
  weight_name: str = "w"

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, nn.initializers.normal(0.3), self.shape)
    return jnp.einsum(eqn, x, w)


class GemmaMLP(nn.Module):
  """gemma's FeedForward: ``gating_einsum`` (2, hidden, d) and ``linear`` (hidden, d) in one module."""

  @nn.compact
  def __call__(self, x):
    gating = Einsum((2, FF, D), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NHF->...NH", x)
    h = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    linear = Einsum((FF, D), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", h)


class GemmaAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    dh = D // HEADS
    q = Einsum((HEADS, D, dh), name="q_einsum")("BTD,NDH->BTNH", x)
    k, v = Einsum((2, KV_HEADS, D, dh), name="kv_einsum")("BSD,CKDH->CBSKH", x)
    rep = HEADS // KV_HEADS
    att = causal_attention(q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2))
    return Einsum((HEADS, dh, D), name="attn_vec_einsum")("BTNH,NHD->BTD", att)


class GemmaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + GemmaAttention(name="attn")(RMSNorm(name="pre_attention_norm")(x))
    return x + GemmaMLP(name="mlp")(RMSNorm(name="pre_ffw_norm")(x))


class GemmaStyle(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    table = self.param("input_embedding", nn.initializers.normal(1.0), (VOCAB, D))
    x = table[tokens]
    for i in range(LAYERS):
      x = GemmaBlock(name=f"layer_{i}")(x)
    return x @ table.T  # tied head, as gemma


# -- GPT-2-style: 2-D kernels stored (out, in), used as x @ W.T ---------------------------------


class Conv1D(nn.Module):
  """transformers' FlaxConv1D: ``kernel`` stored (features, in), applied as ``x @ kernel.T``."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.3), (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return x @ kernel.T + bias


class GPT2Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = jnp.split(Conv1D(3 * D, name="c_attn")(h), 3, axis=-1)  # one fused adapter, as PEFT
    split = lambda y: y.reshape(b, t, HEADS, D // HEADS)  # noqa: E731
    att = causal_attention(split(q), split(k), split(v)).reshape(b, t, D)
    x = x + Conv1D(D, name="c_proj")(att)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + Conv1D(D, name="mlp_c_proj")(nn.gelu(Conv1D(FF, name="c_fc")(h)))


class GPT2Style(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="wte")(tokens)
    for i in range(LAYERS):
      x = GPT2Block(name=f"h_{i}")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


# -- MaxText-style scan: the layer axis stored second, kernels (in, L, out) -----------------------


class MaxTextStyle(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    stack = nn.scan(
      nn.remat(LlamaBlock), variable_axes={"params": 1}, split_rngs={"params": True}, length=LAYERS
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


# -- mixture of experts: top-k routing, experts through ragged_dot, a scanned layer stack ---------

EXPERTS, TOP_K = 4, 2


class Experts(nn.Module):
  """SwiGLU-free expert MLPs over tokens sorted by expert: kernels ``wi`` (E, D, FF), ``wo`` (E, FF, D)."""

  @nn.compact
  def __call__(self, xs, group_sizes):
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
    wi = self.param("wi", init, (EXPERTS, D, FF))
    wo = self.param("wo", init, (EXPERTS, FF, D))
    return jax.lax.ragged_dot(nn.silu(jax.lax.ragged_dot(xs, wi, group_sizes)), wo, group_sizes)


class MoEBlock(nn.Module):
  """Shared causal attention, then a top-k routed expert MLP (MaxText/tunix style dispatch)."""

  @nn.compact
  def __call__(self, x, _=None):
    b, t, _d = x.shape
    dh = D // HEADS
    h = RMSNorm(name="input_layernorm")(x)
    q, k, v = (
      nn.Dense(D, use_bias=False, name=n)(h).reshape(b, t, HEADS, dh) for n in ("q_proj", "k_proj", "v_proj")
    )
    x = x + nn.Dense(D, use_bias=False, name="o_proj")(
      causal_attention(rotary(q), rotary(k), v).reshape(b, t, D)
    )
    tokens = RMSNorm(name="post_attention_layernorm")(x).reshape(b * t, D)
    probs = jax.nn.softmax(nn.Dense(EXPERTS, use_bias=False, name="router")(tokens), -1)
    weights, experts = jax.lax.top_k(probs, TOP_K)  # (tokens, k)
    order = jnp.argsort(experts.reshape(-1), stable=True)  # routed copies sorted by expert
    rows = order // TOP_K
    group_sizes = jnp.bincount(experts.reshape(-1), length=EXPERTS).astype(jnp.int32)
    out = Experts(name="experts")(tokens[rows], group_sizes) * weights.reshape(-1)[order][:, None]
    return x + jnp.zeros_like(tokens).at[rows].add(out).reshape(b, t, D), None


class MoEDecoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
    stack = nn.scan(MoEBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(RMSNorm(name="norm")(x))


# -- plain function -----------------------------------------------------------------


def plain_init(key: jax.Array) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "encoder": {
      "fc1": {"w": jax.random.normal(k1, (D, FF)) / math.sqrt(D), "b": jnp.zeros(FF)},
      "fc2": {"w": jax.random.normal(k2, (FF, D)) / math.sqrt(FF), "b": jnp.zeros(D)},
    },
    "out": {"w": jax.random.normal(k3, (D, 4)) / math.sqrt(D)},
  }


def plain_apply(params: dict, x: jax.Array) -> jax.Array:
  enc = params["encoder"]
  h = jnp.tanh(x @ enc["fc1"]["w"] + enc["fc1"]["b"])
  h = jax.checkpoint(lambda h: h @ enc["fc2"]["w"] + enc["fc2"]["b"])(h)
  return jax.jit(lambda h, w: h @ w)(h, params["out"]["w"])


# -- the zoo ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One zoo model: ``apply_fn(tree, inputs)`` and what its adapters must look like."""

  name: str
  apply_fn: Callable[..., Any]
  tree: Any
  inputs: jax.Array
  config: jlora.LoraConfig
  expected_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # path -> (A, B)
  peft_params: int  # trainable count PEFT builds for the equivalent PyTorch model
  targets: jax.Array | None = None


def _tokens(key):
  return jax.random.randint(key, (BATCH, SEQ), 0, VOCAB)


def _llama_case(scan: bool) -> Case:
  model = Llama(scan=scan, remat=scan)
  tokens = _tokens(jax.random.key(1))
  variables = model.init(jax.random.key(0), tokens)
  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=False)
  dims = {n: (D, D) for n in names[:4]} | {"gate_proj": (D, FF), "up_proj": (D, FF), "down_proj": (FF, D)}
  shapes = {}
  for n, (i, o) in dims.items():
    if scan:
      shapes[f"params/layers/{n}/kernel"] = ((LAYERS, i, 4), (LAYERS, 4, o))
    else:
      for layer in range(LAYERS):
        shapes[f"params/layers_{layer}/{n}/kernel"] = ((i, 4), (4, o))
  peft = LAYERS * sum(4 * (i + o) for i, o in dims.values())
  return Case(
    "llama_scan" if scan else "llama",
    model.apply,
    variables,
    tokens,
    cfg,
    shapes,
    peft,
    targets=jnp.roll(tokens, -1, axis=1),
  )


def _mha_case() -> Case:
  model = MHAModel()
  tokens = _tokens(jax.random.key(2))
  variables = model.init(jax.random.key(0), tokens)
  dh = D // HEADS
  cfg = jlora.LoraConfig(
    r=2, lora_alpha=4, target_modules=("query", "value", "out", "embed", "mlp"), init_lora_weights=False
  )
  shapes = {
    "params/attn/query/kernel": ((D, 2), (2, HEADS, dh)),
    "params/attn/value/kernel": ((D, 2), (2, HEADS, dh)),
    "params/attn/out/kernel": ((HEADS, dh, 2), (2, D)),
    "params/embed/embedding": ((VOCAB, 2), (2, D)),
    "params/mlp/kernel": ((D, 2), (2, D)),
  }
  peft = 2 * (D + D) * 4 + 2 * (VOCAB + D)
  return Case("mha_tied", model.apply, variables, tokens, cfg, shapes, peft, targets=jnp.roll(tokens, -1, 1))


def _conv_case() -> Case:
  model = ConvNet()
  images = jax.random.normal(jax.random.key(3), (BATCH, 8, 8, 3))
  variables = model.init(jax.random.key(0), images)
  cfg = jlora.LoraConfig(
    r=2, lora_alpha=2, target_modules=("conv1", "conv2", "conv1d"), init_lora_weights=False
  )
  shapes = {
    "params/conv1/kernel": ((3, 3, 3, 2), (2, 8)),
    "params/conv2/kernel": ((3, 3, 8, 2), (2, 8)),
    "params/conv1d/kernel": ((3, 8, 2), (2, 8)),
  }
  peft = 2 * (27 + 8) + 2 * (72 + 8) + 2 * (24 + 8)
  return Case("convnet", model.apply, variables, images, cfg, shapes, peft, targets=jnp.ones((BATCH, 4)))


def _nnx_case() -> Case:
  model = NNXTransformer(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = _tokens(jax.random.key(4))

  def apply_fn(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  cfg = jlora.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
  shapes = {}
  for layer in range(LAYERS):
    for n, (i, o) in {
      "q_proj": (D, D),
      "k_proj": (D, D),
      "v_proj": (D, D),
      "o_proj": (D, D),
      "up_proj": (D, FF),
      "down_proj": (FF, D),
    }.items():
      shapes[f"layers/{layer}/{n}/kernel"] = ((i, 4), (4, o))
  peft = sum(math.prod(a) + math.prod(b) for a, b in shapes.values())
  return Case("nnx", apply_fn, state, tokens, cfg, shapes, peft, targets=jnp.roll(tokens, -1, 1))


def _plain_case() -> Case:
  params = plain_init(jax.random.key(5))
  x = jax.random.normal(jax.random.key(6), (BATCH, D))
  cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("fc1", "fc2", "out"), init_lora_weights=False)
  shapes = {
    "encoder/fc1/w": ((D, 3), (3, FF)),
    "encoder/fc2/w": ((FF, 3), (3, D)),
    "out/w": ((D, 3), (3, 4)),
  }
  peft = 3 * (D + FF) * 2 + 3 * (D + 4)
  return Case("plain", plain_apply, params, x, cfg, shapes, peft, targets=jnp.ones((BATCH, 4)))


def _gemma_case() -> Case:
  model = GemmaStyle()
  tokens = _tokens(jax.random.key(8))
  variables = model.init(jax.random.key(0), tokens)
  r, dh = 2, D // HEADS
  cfg = jlora.LoraConfig(r=r, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
  shapes = {}
  for i in range(LAYERS):
    p = f"params/layer_{i}"
    shapes |= {
      f"{p}/attn/attn_vec_einsum/w": ((HEADS, dh, r), (r, D)),  # "iio": o_proj
      f"{p}/attn/kv_einsum/w": ((2, r, D), (2, KV_HEADS, r, dh)),  # "soio": k_proj and v_proj
      f"{p}/attn/q_einsum/w": ((r, D), (HEADS, r, dh)),  # "oio": q_proj
      f"{p}/mlp/gating_einsum": ((2, r, D), (2, FF, r)),  # "soi": gate_proj and up_proj
      f"{p}/mlp/linear": ((FF, r), (r, D)),  # "io": down_proj
    }
  per_layer = r * ((D + D) + 2 * (D + KV_HEADS * dh) + (D + D) + 2 * (D + FF) + (FF + D))
  return Case(
    "gemma_style", model.apply, variables, tokens, cfg, shapes, LAYERS * per_layer, jnp.roll(tokens, -1, 1)
  )


def _gpt2_case() -> Case:
  model = GPT2Style()
  tokens = _tokens(jax.random.key(9))
  variables = model.init(jax.random.key(0), tokens)
  r = 2
  names = ("c_attn", "c_proj", "c_fc", "mlp_c_proj")
  cfg = jlora.LoraConfig(r=r, lora_alpha=4, target_modules=names, init_lora_weights=False)
  dims = {"c_attn": (D, 3 * D), "c_proj": (D, D), "c_fc": (D, FF), "mlp_c_proj": (FF, D)}  # (in, out)
  shapes = {
    f"params/h_{i}/{n}/kernel": ((r, fan_in), (fan_out, r))  # "oi": PEFT's own lora_A / lora_B shapes
    for i in range(LAYERS)
    for n, (fan_in, fan_out) in dims.items()
  }
  peft = LAYERS * sum(r * (i + o) for i, o in dims.values())
  return Case("gpt2_style", model.apply, variables, tokens, cfg, shapes, peft, jnp.roll(tokens, -1, 1))


def _maxtext_case() -> Case:
  model = MaxTextStyle()
  tokens = _tokens(jax.random.key(10))
  variables = model.init(jax.random.key(0), tokens)
  r = 2
  names = ("q_proj", "o_proj", "up_proj", "down_proj")
  cfg = jlora.LoraConfig(r=r, lora_alpha=4, target_modules=names, init_lora_weights=False)
  dims = {"q_proj": (D, D), "o_proj": (D, D), "up_proj": (D, FF), "down_proj": (FF, D)}
  shapes = {
    f"params/layers/{n}/kernel": ((i, LAYERS, r), (r, LAYERS, o))  # "iso"
    for n, (i, o) in dims.items()
  }
  peft = LAYERS * sum(r * (i + o) for i, o in dims.values())
  return Case("maxtext_scan", model.apply, variables, tokens, cfg, shapes, peft, jnp.roll(tokens, -1, 1))


def _moe_case() -> Case:
  model = MoEDecoder()
  tokens = _tokens(jax.random.key(11))
  variables = model.init(jax.random.key(0), tokens)
  r = 3  # neither LAYERS nor EXPERTS, so the factor shapes name one layout
  names = ("q_proj", "v_proj", "experts/wi", "experts/wo")
  cfg = jlora.LoraConfig(r=r, lora_alpha=6, target_modules=names, init_lora_weights=False)
  shapes = {
    "params/layers/q_proj/kernel": ((LAYERS, D, r), (LAYERS, r, D)),
    "params/layers/v_proj/kernel": ((LAYERS, D, r), (LAYERS, r, D)),
    "params/layers/experts/wi": ((LAYERS, EXPERTS, D, r), (LAYERS, EXPERTS, r, FF)),  # "ssio"
    "params/layers/experts/wo": ((LAYERS, EXPERTS, FF, r), (LAYERS, EXPERTS, r, D)),
  }
  # PEFT's `target_parameters` (ParamWrapper) on an (E, in, out) parameter:
  # lora_A (r*E, in), lora_B (out, r*E).
  peft = LAYERS * (2 * r * (D + D) + 2 * EXPERTS * r * (D + FF))
  return Case("moe_scan", model.apply, variables, tokens, cfg, shapes, peft, jnp.roll(tokens, -1, 1))


def _built_once(build: Callable[[], Case]) -> Callable[[], Case]:
  """``build``, run once per session: later calls get the same arrays in fresh containers.

  Building a model initializes it op by op, seconds of compiling on a small machine; a test that
  edits its case's tree in place edits its own copy.
  """
  once = functools.cache(build)

  def case() -> Case:
    built = once()
    return dataclasses.replace(built, tree=jax.tree_util.tree_map(lambda x: x, built.tree))

  return case


BUILDERS: dict[str, Callable[[], Case]] = {
  name: _built_once(build)
  for name, build in {
    "gemma_style": _gemma_case,
    "gpt2_style": _gpt2_case,
    "maxtext_scan": _maxtext_case,
    "llama": lambda: _llama_case(False),
    "llama_scan": lambda: _llama_case(True),
    "mha_tied": _mha_case,
    "convnet": _conv_case,
    "nnx": _nnx_case,
    "plain": _plain_case,
    "moe_scan": _moe_case,
  }.items()
}


def trained(lora: Any, key: jax.Array) -> Any:
  """An adapter moved off its init, as training leaves it: magnitudes off the kernel norms, factors perturbed.

  Args:
    lora: an adapter tree (``lora_A``/``lora_B`` factors, DoRA's ``lora_magnitude`` vectors).
    key: the PRNG key; leaf ``i`` draws from ``fold_in(key, i)``.

  Returns:
    The same tree with every magnitude scaled by a uniform factor in [0.5, 1.5) and ``0.3 * N(0, 1)`` noise
    added to every other leaf.
  """
  leaves, tdef = jax.tree_util.tree_flatten_with_path(lora)
  out = []
  for i, (kp, x) in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    if str(kp[-1].key) == "lora_magnitude":
      out.append(x * jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5))
    else:
      out.append(x + 0.3 * jax.random.normal(k, x.shape, x.dtype))
  return jax.tree_util.tree_unflatten(tdef, out)


def loss_fn(case: Case, outputs: jax.Array) -> jax.Array:
  """Cross-entropy for token models, squared error otherwise."""
  if outputs.ndim == 3:
    logp = jax.nn.log_softmax(outputs, -1)
    return -jnp.mean(jnp.take_along_axis(logp, case.targets[..., None], -1))
  return jnp.mean((outputs - case.targets) ** 2)


def two_layer_tree(dtype: Any = jnp.float32) -> dict:
  """Two layers of unstacked q/v projections, ``(64, 32)`` and ``(64, 48)`` kernels of ones."""
  return {
    f"layers_{i}": {
      "q_proj": {"kernel": jnp.ones((64, 32), dtype)},
      "v_proj": {"kernel": jnp.ones((64, 48), dtype)},
    }
    for i in range(2)
  }


def stacked_adapter_spec() -> AdapterSpec:
  """An adapter on a kernel ``(in 4, stacked 3, out 5)``, on layers 0 and 2 at rank 2, scale 0.5."""
  return AdapterSpec(
    path=("w",), module="", kernel_shape=(4, 3, 5), layout=Layout("iso"), rank=2, scale=0.5, layers=(0, 2)
  )
