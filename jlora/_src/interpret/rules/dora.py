"""DoRA in the interpreter's product rules: the kernel ``g * (W + scale * A @ B)`` used factorized.

``g = m / ||W + scale * A @ B||`` (`jlora._src.adapters.dora`) rides the kernel's views
as a factor over the fan-out axes (`LoraValue.g`); a product with the kernel
is then ``g * (x @ W + scale * (x @ A) @ B)``, scaled per output feature after
the rank-r branch, so DoRA costs LoRA's branch plus the norms and one scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def combine(g: jax.Array, base: jax.Array, lora: jax.Array, dropped: jax.Array | None) -> jax.Array:
  """A DoRA product from its parts, PEFT's ``DoraLinearLayer.forward``.

  Args:
    g: the scale ``m / ||V||``, broadcastable to the output.
    base: ``x @ W``.
    lora: ``scale * (drop(x) @ A) @ B``.
    dropped: ``drop(x) @ W`` when dropout is active (PEFT then rescales the
      dropped input's base product), else ``None``.

  Returns:
    ``g * (base + lora)``, or ``base + (g - 1) * dropped + g * lora`` under dropout.
  """
  g = g.astype(base.dtype)
  lora = lora.astype(base.dtype)
  if dropped is None:
    return g * (base + lora)
  return base + (g - 1) * dropped + g * lora


def product(
  recompute: bool, fn: Callable[[Any, dict[str, Any]], jax.Array], frozen: Any, inputs: dict[str, Any]
) -> jax.Array:
  """A DoRA product ``fn(frozen, inputs)`` (``g * y``, ``y = x @ W + lora``), its ``y`` kept or
  recomputed for the backward pass.

  The magnitude's gradient is ``sum_tokens ct * y`` per output feature, so the
  backward pass reads ``y`` (``tokens x out``). By default autodiff keeps it.
  With ``recompute`` (`jlora.wrap`'s ``dora_recompute``) the backward pass
  computes ``fn`` again from its inputs (one more base product; about a LoRA
  step's temp bytes) and differentiates that; ``frozen`` (the base kernel)
  gets no cotangent, so no kernel-sized gradient is formed. The inputs of the
  recomputation are tied to the cotangent (``+ 0 * ct``: no finite value
  changes), so that no compiler schedules it in the forward pass and keeps its
  result (XLA:CPU drops the barriers of `jax.checkpoint` before scheduling).
  Reverse mode only (``jax.grad``, ``jax.vjp``), as any `jax.custom_vjp`.
  """
  if not recompute:
    return fn(frozen, inputs)

  def forward(frozen, inputs):
    return fn(frozen, inputs), (frozen, inputs)

  def backward(res, ct):
    frozen, inputs = res
    zero = jnp.ravel(ct)[0] * 0  # a data dependence on the cotangent, not folded for floats
    tie = lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a  # noqa: E731
    _, vjp = jax.vjp(lambda v: fn(frozen, v), jax.tree_util.tree_map(tie, inputs))
    return (None, *vjp(ct))

  f = jax.custom_vjp(fn)
  f.defvjp(forward, backward)
  return f(frozen, inputs)


def on_axis(g: jax.Array, ndim: int, axis: int) -> jax.Array:
  """A scale over one output feature axis, broadcastable to an ``ndim`` output at ``axis``."""
  return g.reshape([g.shape[0] if i == axis else 1 for i in range(ndim)])


def on_output(g: jax.Array, g_lab: str, out_lab: str) -> jax.Array | None:
  """A scale over labelled axes, broadcastable to an output labelled ``out_lab``; ``None`` when the
  product contracts one of its axes (the model contracts an output feature: materialise)."""
  if any(c not in out_lab for c in g_lab):
    return None
  order = [c for c in out_lab if c in g_lab]
  g = jnp.transpose(g, [g_lab.index(c) for c in order])
  return jnp.expand_dims(g, [i for i, c in enumerate(out_lab) if c not in g_lab])
