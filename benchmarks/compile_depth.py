"""Lowering and compile time of a wrapped deep model against full fine-tuning, by depth.

An unscanned Llama-shaped decoder (d=64, 4 heads, SwiGLU 128, vocab 256; each layer its own
modules, as Hugging Face Flax models are written), all-linear LoRA r=8. For each depth it lowers
and compiles, in one run, the gradient step of full fine-tuning (``grad`` w.r.t. the params) and of
jlora (``grad`` w.r.t. the adapter tree of ``jlora.wrap(model.apply, cfg)``), and prints the seconds,
their ratio and the number of dots in each compiled program (what XLA's compile time follows).

Run: ``python benchmarks/compile_depth.py`` (``--depths 8,32,80``; ``--unfused`` wraps with
``fuse_siblings=False``, for comparison).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora

D, HEADS, FF, VOCAB = 64, 4, 128, 256


class Block(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    h = nn.RMSNorm(name="input_layernorm")(x)
    q, k, v = (dense(D, n)(h).reshape(b, t, HEADS, D // HEADS) for n in ("q_proj", "k_proj", "v_proj"))
    x = x + dense(D, "o_proj")(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, D))
    h = nn.RMSNorm(name="post_attention_layernorm")(x)
    return x + dense(D, "down_proj")(nn.silu(dense(FF, "gate_proj")(h)) * dense(FF, "up_proj")(h))


class Decoder(nn.Module):
  layers: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(VOCAB, D, name="embed_tokens")(tokens)
    for i in range(self.layers):
      x = Block(name=f"layers_{i}")(x)
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
  cfg = jlora.LoraConfig(r=8, target_modules="all-linear")
  lora = jlora.init(params, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(tokens,))
  wrapped = jlora.wrap(model.apply, cfg, fuse_siblings=fuse_siblings)
  loss = lambda logits: jnp.mean(logits**2)  # noqa: E731
  full = jax.jit(jax.grad(lambda p: loss(model.apply(p, tokens))))
  lo = jax.jit(jax.grad(lambda a: loss(wrapped(params, a, tokens))))
  fl, fc, fd = _timed(full, params)
  ll, lc, ld = _timed(lo, lora)
  return {"full_lower": fl, "full_compile": fc, "full_dots": fd, "jlora_lower": ll, "jlora_compile": lc,
          "jlora_dots": ld, "ratio": (ll + lc) / (fl + fc)}  # fmt: skip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="8,32,80")
  parser.add_argument("--unfused", action="store_true", help="jlora.wrap(..., fuse_siblings=False)")
  args = parser.parse_args()
  head = ("layers", "full lower+compile", "jlora lower+compile", "ratio", "dots full/jlora")
  print(f"{head[0]:>6} {head[1]:>20} {head[2]:>21} {head[3]:>6} {head[4]:>16}")
  for layers in map(int, args.depths.split(",")):
    r = measure(layers, fuse_siblings=not args.unfused)
    print(
      f"{layers:>6} {r['full_lower']:>8.2f} + {r['full_compile']:>6.2f} s {r['jlora_lower']:>9.2f} + "
      f"{r['jlora_compile']:>6.2f} s {r['ratio']:>6.2f} {r['full_dots']:>7}/{r['jlora_dots']:<7}",
      flush=True,
    )


if __name__ == "__main__":
  main()
