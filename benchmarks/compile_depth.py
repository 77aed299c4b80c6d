"""Lowering and compile time of a wrapped deep model against full fine-tuning, by depth.

An unscanned Llama-shaped decoder (d=64, 4 heads, SwiGLU 128, vocab 256; each layer its own
modules, as Hugging Face Flax models are written), all-linear LoRA r=8. For each depth it lowers
and compiles, in one run, the gradient step of full fine-tuning (``grad`` w.r.t. the params), of
jlora (``grad`` w.r.t. the adapter tree of ``jlora.wrap(model.apply, cfg)``) and of the same
LoRA written by hand into every linear layer of the blocks (``x @ W + (x @ A) @ B``, ``grad``
w.r.t. the ``lora_A``/``lora_B`` params: the same dots as jlora's, none of its tracing), and
prints the seconds, the ratios jlora / full and jlora / hand, and the number of dots in each
compiled program (what XLA's compile time follows).

Run: ``python benchmarks/compile_depth.py`` (``--depths 8,32,80``; ``--unfused`` wraps with
``fuse_siblings=False``, for comparison).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpt import LORA_LEAVES, Linear  # noqa: E402

import jlora  # noqa: E402

D, HEADS, FF, VOCAB, RANK = 64, 4, 128, 256, 8


class Block(nn.Module):
  lora_rank: int = 0  # > 0: hand-written LoRA in every linear layer (`_gpt.Linear`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    dense = lambda n, name: Linear(n, self.lora_rank, RANK, use_bias=False, name=name)  # noqa: E731
    h = nn.RMSNorm(name="input_layernorm")(x)
    q, k, v = (dense(D, n)(h).reshape(b, t, HEADS, D // HEADS) for n in ("q_proj", "k_proj", "v_proj"))
    x = x + dense(D, "o_proj")(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, D))
    h = nn.RMSNorm(name="post_attention_layernorm")(x)
    return x + dense(D, "down_proj")(nn.silu(dense(FF, "gate_proj")(h)) * dense(FF, "up_proj")(h))


class Decoder(nn.Module):
  layers: int
  lora_rank: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
    for i in range(self.layers):
      x = Block(self.lora_rank, name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


def _timed(fn: Any, arg: Any) -> tuple[float, float, int]:
  t0 = time.perf_counter()
  lowered = fn.lower(arg)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return t1 - t0, time.perf_counter() - t1, compiled.as_text().count(" dot(")


def measure(layers: int, fuse_siblings: bool = True) -> dict[str, float]:
  model, tokens = Decoder(layers), jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  cfg = jlora.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(tokens,))
  wrapped = jlora.wrap(model.apply, cfg, fuse_siblings=fuse_siblings)
  loss = lambda logits: jnp.mean(logits**2)  # noqa: E731
  full = jax.jit(jax.grad(lambda p: loss(model.apply(p, tokens))))
  lo = jax.jit(jax.grad(lambda a: loss(wrapped(params, a, tokens))))
  hand_model = Decoder(layers, RANK)
  flat = traverse_util.flatten_dict(hand_model.init(jax.random.key(0), tokens))
  hand_base = {k: v for k, v in flat.items() if k[-1] not in LORA_LEAVES}
  hand_lora = {k: v for k, v in flat.items() if k[-1] in LORA_LEAVES}
  hand_apply = lambda a: hand_model.apply(traverse_util.unflatten_dict({**hand_base, **a}), tokens)  # noqa: E731
  hand = jax.jit(jax.grad(lambda a: loss(hand_apply(a))))
  out = {}
  for name, fn, arg in (("full", full, params), ("jlora", lo, lora), ("hand", hand, hand_lora)):
    out[f"{name}_lower"], out[f"{name}_compile"], out[f"{name}_dots"] = _timed(fn, arg)
  total = lambda name: out[f"{name}_lower"] + out[f"{name}_compile"]  # noqa: E731
  return {**out, "ratio": total("jlora") / total("full"), "ratio_hand": total("jlora") / total("hand")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="8,32,80")
  parser.add_argument("--unfused", action="store_true", help="jlora.wrap(..., fuse_siblings=False)")
  args = parser.parse_args()
  head = ("layers", "full lower+compile", "hand lower+compile", "jlora lower+compile", "/full", "/hand")
  widths = (6, 20, 20, 21, 6, 6)
  print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths)) + "  dots full/hand/jlora")
  measure(1, fuse_siblings=not args.unfused)  # warm-up: the first lowering in a process pays JAX's own set-up
  for layers in map(int, args.depths.split(",")):
    r = measure(layers, fuse_siblings=not args.unfused)
    t = {n: f"{r[n + '_lower']:>8.2f} + {r[n + '_compile']:>6.2f} s" for n in ("full", "hand", "jlora")}
    print(
      f"{layers:>6} {t['full']} {t['hand']} {t['jlora']:>21} {r['ratio']:>6.2f} {r['ratio_hand']:>6.2f}  "
      f"{r['full_dots']}/{r['hand_dots']}/{r['jlora_dots']}",
      flush=True,
    )


if __name__ == "__main__":
  main()
