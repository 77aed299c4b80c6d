"""A GPT-style decoder and the three train steps the benchmarks compare.

* ``full``: full fine-tuning, AdamW on every parameter.
* ``jlora``: the plain model run through ``jlora.wrap`` with an ``"all-linear"``
  adapter tree; AdamW on the adapter tree only, the base passed as a
  non-differentiated argument.
* ``qwix``: Google's qwix LoRA (``qwix.LoraProvider`` on every ``*_proj`` layer of
  the blocks, the same rank and alpha); AdamW on its ``*_lora_a``/``*_lora_b``
  params only (measured where qwix is installed: ``pip install -e ".[bench]"``).
* ``hand``: the same model with factorized LoRA written into every linear
  layer of the blocks (``x @ W + s * (x @ A) @ B``, ``A``/``B`` separate
  params): the overhead-free ideal jlora is measured against. AdamW on the
  ``lora_A``/``lora_B`` leaves only, the base passed as a non-differentiated
  argument.

Shapes: a Dense kernel is ``(in, out)``; ``lora_A`` is ``(in, r)`` and
``lora_B`` is ``(r, out)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

import jlora

try:
  import qwix
except ImportError:  # the `bench` extra
  qwix = None

LORA_LEAVES = ("lora_A", "lora_B")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  """Sizes of the decoder and of its LoRA adapters."""

  vocab: int = 4096
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  mlp_ratio: int = 4
  seq_len: int = 128
  batch: int = 8
  rank: int = 16
  alpha: float = 32.0
  bias: bool = True  # biases on the blocks' linear layers
  mlp: str = "gelu"  # "gelu": up, down; "swiglu": gate, up, down (Llama's seven linear layer types)


def add_size_args(p: argparse.ArgumentParser, *, seq: int = 128, batch: int = 8, seq_help: str = "") -> None:
  """The decoder-size flags every benchmark takes (defaults: the README's GPT)."""
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=seq, help=seq_help or None)
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--vocab", type=int, default=4096)


def config_from(args: argparse.Namespace, **fields: Any) -> GPTConfig:
  """The `GPTConfig` of the size flags (heads of 64 dims, ``alpha = 2 r``), with ``fields`` on top."""
  return GPTConfig(
    vocab=args.vocab,
    d_model=args.d_model,
    n_layers=args.layers,
    n_heads=max(1, args.d_model // 64),
    seq_len=args.seq,
    batch=args.batch,
    rank=args.rank,
    alpha=2.0 * args.rank,
    **fields,
  )


def finish(checks: dict[str, bool], out: pathlib.Path, result: dict[str, Any]) -> dict[str, Any]:
  """Prints each check as PASS/FAIL, writes ``result`` as JSON to ``out`` and returns it."""
  for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}  {name}")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f"wrote {out}")
  return result


class Linear(nn.Module):
  """``nn.Dense`` (kernel ``(in, out)``, bias unless ``use_bias=False``), optionally with
  hand-written LoRA.

  With ``lora_rank > 0`` it computes ``x @ W + b + s * (x @ A) @ B`` with
  ``A`` ``(in, r)`` (Kaiming-uniform, as PEFT) and ``B`` ``(r, out)`` (zeros).
  """

  features: int
  lora_rank: int = 0
  lora_alpha: float = 32.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if self.lora_rank:
      bound = 1.0 / math.sqrt(d_in)
      a_init = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
      a = self.param("lora_A", a_init, (d_in, self.lora_rank))
      b = self.param("lora_B", nn.initializers.zeros_init(), (self.lora_rank, self.features))
      s = self.lora_alpha / self.lora_rank
      y = y + s * (x @ a) @ b
    return y


class Block(nn.Module):
  """A pre-LN transformer block: causal self-attention, then a GELU (or SwiGLU) MLP."""

  cfg: GPTConfig
  lora_rank: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = lambda n, name: Linear(n, self.lora_rank, cfg.alpha, cfg.bias, name=name)
    bsz, t, d = x.shape
    h, dh = cfg.n_heads, d // cfg.n_heads
    y = nn.LayerNorm(name="ln_1")(x)
    q = dense(d, "q_proj")(y).reshape(bsz, t, h, dh)
    k = dense(d, "k_proj")(y).reshape(bsz, t, h, dh)
    v = dense(d, "v_proj")(y).reshape(bsz, t, h, dh)
    att = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", att, v).reshape(bsz, t, d)
    x = x + dense(d, "o_proj")(o)
    y = nn.LayerNorm(name="ln_2")(x)
    if cfg.mlp == "swiglu":
      y = nn.silu(dense(cfg.mlp_ratio * d, "gate_proj")(y)) * dense(cfg.mlp_ratio * d, "up_proj")(y)
    else:
      y = nn.gelu(dense(cfg.mlp_ratio * d, "up_proj")(y))
    return x + dense(d, "down_proj")(y)


class GPT(nn.Module):
  """Token + position embedding, ``n_layers`` blocks, final LN, ``lm_head``.

  ``lora_rank > 0`` bakes hand-written LoRA into every linear layer of the
  blocks (not the embeddings or ``lm_head``, as ``"all-linear"``).
  """

  cfg: GPTConfig
  lora_rank: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    t = tokens.shape[1]
    x = nn.Embed(cfg.vocab, cfg.d_model, name="wte")(tokens)
    x = x + nn.Embed(cfg.seq_len, cfg.d_model, name="wpe")(jnp.arange(t))[None]
    for i in range(cfg.n_layers):
      x = Block(cfg, self.lora_rank, name=f"layers_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(cfg.vocab, use_bias=False, name="lm_head")(x)


def lora_config(cfg: GPTConfig) -> jlora.LoraConfig:
  """The jlora config matching the hand-written model: all-linear, rank ``cfg.rank``."""
  return jlora.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules="all-linear")


def hand_params(variables: Any, lora: Any) -> dict:
  """The hand-written model's variables holding ``variables``' base and ``lora``'s adapters.

  ``lora`` is a jlora adapter tree for ``lora_config``: its ``.../kernel/lora_A``
  leaves become the hand-written layers' ``.../lora_A`` params.
  """
  flat = traverse_util.flatten_dict(variables["params"])
  for path, leaf in traverse_util.flatten_dict(lora["params"]).items():
    flat[(*path[:-2], path[-1])] = leaf
  return {"params": traverse_util.unflatten_dict(flat)}


def split_hand(params: Any) -> tuple[dict, dict]:
  """Splits the hand-written model's params into (base, lora) flat-path dicts."""
  flat = traverse_util.flatten_dict(params)
  base = {k: v for k, v in flat.items() if k[-1] not in LORA_LEAVES}
  lora = {k: v for k, v in flat.items() if k[-1] in LORA_LEAVES}
  return base, lora


def _xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


@dataclasses.dataclass
class Variant:
  """One train step: ``state = step(*state, *static)`` returns ``(*state, loss)``."""

  name: str
  step: Callable[..., Any]  # jitted; donates the state
  state: tuple[Any, ...]
  static: tuple[Any, ...]
  n_trainable: int

  def run(self) -> jax.Array:
    *self.state, loss = self.step(*self.state, *self.static)
    return loss


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def _variant(
  name: str,
  opt: optax.GradientTransformation,
  loss_fn: Callable[..., jax.Array],
  trainable: Any,
  *static: Any,
) -> Variant:
  """An AdamW step on ``trainable`` minimising ``loss_fn(trainable, *static)``; donates its state."""

  def step(trainable, opt_state, *static):
    loss, g = jax.value_and_grad(loss_fn)(trainable, *static)
    updates, opt_state = opt.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return Variant(
    name, jax.jit(step, donate_argnums=(0, 1)), (trainable, opt.init(trainable)), static, _count(trainable)
  )


def make_variants(cfg: GPTConfig, *, key: jax.Array, lr: float = 1e-3) -> dict[str, Variant]:
  """The ``full``, ``jlora``, ``hand``, ``frozen`` and ``qlora_nf4``/``qlora_int8`` train steps on one batch.

  ``frozen`` trains only the LayerNorm parameters: every activation gradient
  is computed but no kernel gradient and no LoRA branch (the matmul-only
  limit of LoRA, used to split the step time into its parts). ``qlora_*``
  run jlora's step on the base quantized by `jlora.quantize` (block 64).
  ``jlora_unfused`` is jlora's step with ``fuse_siblings=False``; ``qwix`` (where
  qwix is installed) qwix's LoRA step.
  """
  k_init, k_lora, k_tok = jax.random.split(key, 3)
  tokens = jax.random.randint(k_tok, (cfg.batch, cfg.seq_len), 0, cfg.vocab)
  model = GPT(cfg)
  hand_model = GPT(cfg, lora_rank=cfg.rank)
  variables = model.init(k_init, tokens)
  opt = optax.adamw(lr)

  def with_base(base_flat: dict, trained_flat: dict) -> dict:
    return {"params": traverse_util.unflatten_dict({**base_flat, **trained_flat})}

  # Full fine-tuning.
  params = jax.tree_util.tree_map(jnp.copy, variables["params"])
  full = _variant("full", opt, lambda p, t: _xent(model.apply({"params": p}, t), t), params, tokens)

  # jlora.
  lcfg = lora_config(cfg)
  apply = jlora.wrap(model.apply, lcfg)
  lora = jlora.init(variables, lcfg, key=k_lora)
  jl = _variant("jlora", opt, lambda lo, v, t: _xent(apply(v, lo, t), t), lora, variables, tokens)

  # jlora on quantized bases (QLoRA): the same adapter, every kernel but the head in nf4 / int8.
  quantized = {}
  for qtype in ("nf4", "int8"):
    qvars = jlora.quantize(variables, qtype=qtype, block_size=64)
    lo = jax.tree_util.tree_map(jnp.copy, lora)
    quantized[f"qlora_{qtype}"] = _variant(
      f"qlora_{qtype}", opt, lambda lo, v, t: _xent(apply(v, lo, t), t), lo, qvars, tokens
    )

  # Hand-written factorized LoRA: same base values, its own A/B.
  _, hand_lora = split_hand(hand_model.init(k_init, tokens)["params"])
  base_flat = traverse_util.flatten_dict(variables["params"])
  hand = _variant(
    "hand",
    opt,
    lambda lo, b, t: _xent(hand_model.apply(with_base(b, lo), t), t),
    hand_lora,
    base_flat,
    tokens,
  )

  # Frozen kernels, trained LayerNorms: no dW, no LoRA branch.
  ln = {k: jnp.copy(v) for k, v in base_flat.items() if any(p.startswith("ln_") for p in k)}
  rest = {k: v for k, v in base_flat.items() if k not in ln}
  frozen = _variant(
    "frozen", opt, lambda n, r, t: _xent(model.apply(with_base(r, n), t), t), ln, rest, tokens
  )
  variants = {"full": full, "jlora": jl, "hand": hand, "frozen": frozen, **quantized}
  unfused = jlora.wrap(model.apply, lcfg, fuse_siblings=False)
  variants["jlora_unfused"] = _variant(
    "jlora_unfused",
    opt,
    lambda lo, v, t: _xent(unfused(v, lo, t), t),
    jax.tree_util.tree_map(jnp.copy, lora),
    variables,
    tokens,
  )
  if qwix is not None:
    variants["qwix"] = _qwix_variant(model, cfg, opt, k_init, tokens)
  return variants


def _qwix_variant(
  model: GPT, cfg: GPTConfig, opt: optax.GradientTransformation, key: jax.Array, tokens: jax.Array
) -> Variant:
  """qwix's LoRA on every linear layer of the blocks; AdamW on its LoRA params only."""
  qmodel = qwix.apply_lora_to_model(
    model, qwix.LoraProvider(module_path=r".*_proj", rank=cfg.rank, alpha=cfg.alpha)
  )
  flat = traverse_util.flatten_dict(qmodel.init(key, tokens)["params"])
  is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
  lora = {k: v for k, v in flat.items() if is_lora(k)}
  base = {k: v for k, v in flat.items() if not is_lora(k)}

  def loss(lo, b, t):
    return _xent(qmodel.apply({"params": traverse_util.unflatten_dict({**b, **lo})}, t), t)

  return _variant("qwix", opt, loss, lora, base, tokens)
