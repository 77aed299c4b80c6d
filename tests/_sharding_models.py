"""A compact Llama-style Linen decoder with Flax logical-axis metadata (for sharding tests).

Layers are stacked with ``nn.scan``, so every layer kernel has a leading
``layers`` axis: ``q/k/v_proj`` ``(L, embed, heads, head_dim)``, ``o_proj``
``(L, heads, head_dim, embed)``, MLP ``(L, embed, mlp)`` / ``(L, mlp, embed)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType

import jlora

# Logical axis names -> mesh axes, for an ("fsdp", "tp") mesh and a pure data-parallel ("data",) mesh.
FSDP_TP_RULES = (
  ("batch", "fsdp"),
  ("layers", None),
  ("vocab", "tp"),
  ("embed", "fsdp"),
  ("heads", "tp"),
  ("head_dim", None),
  ("mlp", "tp"),
  ("norm", None),
)
DP_RULES = (("batch", "data"),)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int = 64
  dim: int = 32
  heads: int = 4
  mlp: int = 64
  layers: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False


def _init(names: tuple[str, ...], init: Any = None) -> Any:
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), names)


class RMSNorm(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), self.cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale.astype(jnp.float32)).astype(self.cfg.dtype)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
    cfg = self.cfg
    head_dim = cfg.dim // cfg.heads
    kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    qkv = functools.partial(
      nn.DenseGeneral, features=(cfg.heads, head_dim), kernel_init=_init(("embed", "heads", "head_dim")), **kw
    )
    h = RMSNorm(cfg, name="input_layernorm")(x)
    q, k, v = (qkv(name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    n = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(cfg.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    x = x + nn.DenseGeneral(
      cfg.dim, axis=(-2, -1), kernel_init=_init(("heads", "head_dim", "embed")), name="o_proj", **kw
    )(o)
    h = RMSNorm(cfg, name="post_attention_layernorm")(x)
    gate = nn.Dense(cfg.mlp, kernel_init=_init(("embed", "mlp")), name="gate_proj", **kw)(h)
    up = nn.Dense(cfg.mlp, kernel_init=_init(("embed", "mlp")), name="up_proj", **kw)(h)
    x = x + nn.Dense(cfg.dim, kernel_init=_init(("mlp", "embed")), name="down_proj", **kw)(nn.silu(gate) * up)
    return x, None


class Llama(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = nn.Embed(
      cfg.vocab,
      cfg.dim,
      embedding_init=_init(("vocab", "embed"), nn.initializers.normal(1.0)),
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="embed_tokens",
    )(tokens)
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    stack = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(cfg, name="layers")(x, None)
    x = RMSNorm(cfg, name="norm")(x)
    logits = nn.Dense(
      cfg.vocab,
      use_bias=False,
      kernel_init=_init(("embed", "vocab")),
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="lm_head",
    )(x)
    return logits.astype(jnp.float32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# -- the small model the sharding tests share ------------------------------------------------------

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head")
# The kernels' (stacked, fan_in) layouts, written out (`infer_layouts` is exercised separately).
LAYOUTS = {"q_proj|k_proj|v_proj": (1, 1), "o_proj": (1, 2), "gate_proj|up_proj|down_proj": (1, 1)}


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
  """A mesh of ``shape`` over the first devices, every axis `AxisType.Auto`."""
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def small() -> dict[str, Any]:
  """A 2-layer scanned Llama, its boxed/unboxed params, a batch, and an unsharded adapter.

  Returns:
    A dict with ``model``, ``tokens`` ``(8, 8)``, ``boxed`` (params with logical-axis metadata),
    ``params`` (unboxed), ``cfg`` (rank 4 on `TARGETS`) and ``lora`` (made by a plain ``jit``, no
    shardings: the reference for sharded creation).
  """
  model = Llama(LlamaConfig())
  tokens = jax.random.randint(jax.random.key(5), (8, 8), 0, model.cfg.vocab)
  boxed = jax.jit(model.init)(jax.random.key(0), tokens)
  params = nn.unbox(boxed)
  cfg = jlora.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, layout_pattern=LAYOUTS)
  lora = jax.jit(lambda k: jlora.init(params, cfg, key=k))(jax.random.key(1))
  return dict(model=model, tokens=tokens, boxed=boxed, params=params, cfg=cfg, lora=lora)
