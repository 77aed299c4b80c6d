"""Temp bytes of a LoRA step on a SwiGLU MLP, with and without Dense biases.

A standalone stack of SwiGLU MLP blocks (``x + down(silu(gate(x)) * up(x))``) on
``(batch, seq, d)`` activations, compiled (not run) for the gradient of full
fine-tuning (w.r.t. the kernels and biases) and of ``jlora.wrap`` with a rank-16 adapter on
every kernel (w.r.t. the adapter), and ``compiled.memory_analysis()``'s temp
bytes printed for each, with and without biases.

Without biases XLA:CPU fuses each sum ``x @ W + (x @ A) @ B`` of ``gate`` and
``up`` into its consumers (the SiLU, the product, and their backward pass)
instead of forming it, and keeps both ``tokens x ffn`` products alive for the
backward pass where full fine-tuning keeps one. With biases, jlora adds the
branch after the bias, ``(x @ W + b) + lora``, and the excess is smaller but
not gone (README, Performance).

Run: ``python benchmarks/swiglu_temp.py`` (``--layers 3 --d-model 512 --ffn 2048``).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

import jlora

NAMES = ("gate", "up", "down")


def _apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
  def dense(p: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    y = h @ p["kernel"]
    return y + p["bias"] if "bias" in p else y

  for layer in params.values():
    x = x + dense(layer["down"], jax.nn.silu(dense(layer["gate"], x)) * dense(layer["up"], x))
  return x


def _params(args: argparse.Namespace, bias: bool) -> dict[str, Any]:
  keys = iter(jax.random.split(jax.random.key(0), 3 * args.layers))
  shapes = {
    "gate": (args.d_model, args.ffn),
    "up": (args.d_model, args.ffn),
    "down": (args.ffn, args.d_model),
  }
  params = {}
  for i in range(args.layers):
    layer = {}
    for name in NAMES:
      layer[name] = {"kernel": jax.random.normal(next(keys), shapes[name]) / shapes[name][0] ** 0.5}
      if bias:
        layer[name]["bias"] = jnp.zeros(shapes[name][1])
    params[f"layer_{i:03d}"] = layer  # zero-padded: jit flattens the dict in sorted key order
  return params


def _temp_mib(fn: Any, *args: Any) -> float:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def measure(args: argparse.Namespace, bias: bool) -> dict[str, float]:
  params = _params(args, bias)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model))
  cfg = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=NAMES)
  lora = jlora.init(params, cfg, key=jax.random.key(2))
  wrapped = jlora.wrap(_apply, cfg)
  loss = lambda y: jnp.mean(y**2)  # noqa: E731
  full = _temp_mib(jax.grad(lambda p, x: loss(_apply(p, x))), params, x)
  lo = _temp_mib(jax.grad(lambda a, p, x: loss(wrapped(p, a, x))), lora, params, x)
  return {"full": full, "jlora": lo, "jlora/full": lo / full}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=3)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--ffn", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rank", type=int, default=16)
  args = p.parse_args()
  print(f"{'biases':<8}{'full (MiB)':>12}{'jlora (MiB)':>13}{'jlora/full':>12}")
  for bias in (False, True):
    r = measure(args, bias)
    print(f"{'yes' if bias else 'no':<8}{r['full']:>12.3f}{r['jlora']:>13.3f}{r['jlora/full']:>12.3f}")


if __name__ == "__main__":
  main()
