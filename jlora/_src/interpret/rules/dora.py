"""DoRA in the interpreter: the kernel ``g * (W + scale * A @ B)`` used factorized.

``g = m / ||W + scale * A @ B||`` (`jlora._src.adapters.dora`, the math that init
and merge use too) rides the kernel's views as a factor over the fan-out axes
(`LoraValue.g`); a product with the kernel is then
``g * (x @ W + scale * (x @ A) @ B)``, scaled per output feature after the rank-r
branch, so DoRA costs LoRA's branch plus the norms and one scale. The product
rules (`jlora._src.interpret.rules.products`) hand a DoRA kernel to the rules
here: `dot_general` (and `tied_dot`, where the model contracts the scaled axes),
`conv` and `gather`. Each computes its product through `product`, which keeps or
recomputes it for the backward pass (``dora_recompute``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.core import jax_compat
from jlora._src.interpret.context import Context
from jlora._src.interpret.rules.branch import (
  Branch,
  DotUse,
  PendingSum,
  b_branch,
  dropout,
  lookup_rows,
  lora_branch,
  row_axis,
)
from jlora._src.interpret.values import LoraValue


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


def _dropped_input(x: jax.Array, ctx: Context) -> jax.Array | None:
  """LoRA dropout's input for the branch; ``None`` without dropout (no key, or rate 0)."""
  xd = dropout(x, ctx)
  return None if xd is x else xd


def _g_labels(br: Branch) -> str:
  """The labels of ``g``'s axes: those of ``B`` without its rank."""
  return (br.second_lab if br.first_is_a else br.first_lab)[:-1]


def dot_general(use: DotUse, ctx: Context, *, first: jax.Array | None = None) -> list[Any] | None:
  """``g * (x @ W + scale * (drop(x) @ A) @ B)`` for a DoRA kernel (never merged); ``first`` is
  ``x @ first factor`` where sibling fusion computed it (no dropout). Where the model contracts
  the scaled axes (a tied head), `tied_dot` instead."""
  kernel, x, br = use.kernel, use.x, use.br
  g = on_output(kernel.g, _g_labels(br), br.out_lab)
  if g is None:
    return tied_dot(use, ctx)
  xd = None if first is not None else _dropped_input(x, ctx)

  def fn(w, v):  # v["xd"]: the dropped-out input, None without dropout
    base = use.base(w, v["x"])
    lora = lora_branch(br, kernel.scale, v["x"] if v["xd"] is None else v["xd"], v["a"], v["b"], t=v["t"])
    dropped = None if v["xd"] is None else use.base(w, v["xd"])
    return combine(v["g"], base, lora, dropped)

  v = dict(x=x, xd=xd, a=kernel.a, b=kernel.b, g=g, t=first)
  return [product(ctx.dora_recompute, fn, kernel.base, v)]


def tied_dot(use: DotUse, ctx: Context) -> list[Any] | None:
  """A DoRA kernel whose scaled (fan-out) axes the product contracts, as a tied head ``x @ E.T``
  does: ``(g * x) @ W + scale * (drop(g * x) @ B) @ A``, the scale on the input; ``None`` where
  ``g``'s axes are not all axes of the input either."""
  kernel, br = use.kernel, use.br
  g_in = on_output(kernel.g, _g_labels(br), br.x_lab)
  if g_in is None:
    return None
  x = use.x * g_in.astype(use.x.dtype)
  base = use.base(kernel.base, x)
  lora = lora_branch(br, kernel.scale, dropout(x, ctx), kernel.a, kernel.b)
  return [PendingSum(base, lora.astype(base.dtype))]


def conv(eqn: Any, kernel: LoraValue, x: jax.Array, ctx: Context) -> list[Any]:
  """A convolution with a DoRA kernel: ``g * (conv(x, W) + scale * conv(drop(x), A) @ B)``, ``g`` over
  the output's feature axis (PEFT's rescaled dropped base under dropout, `combine`)."""
  dn = eqn.params["dimension_numbers"]
  xd = _dropped_input(x, ctx)

  def fn(w, v):  # v["xd"]: the dropped-out input, None without dropout
    x, xd = v["x"], v["xd"]
    base = jax_compat.bind(eqn, [x, w])[0]
    y = jax_compat.bind(eqn, [x if xd is None else xd, v["a"].astype(x.dtype)])[0]
    dropped = None if xd is None else jax_compat.bind(eqn, [xd, w])[0]
    lora = b_branch(y, v["b"], kernel.scale, dn.out_spec[1])
    return combine(on_axis(v["g"], base.ndim, dn.out_spec[1]), base, lora, dropped)

  v = dict(x=x, xd=xd, a=kernel.factor_in_view("a", dn.rhs_spec[0]), b=kernel.b, g=kernel.g)
  return [product(ctx.dora_recompute, fn, kernel.base, v)]


def gather(eqn: Any, kernel: LoraValue, idx: jax.Array, ctx: Context) -> list[Any] | None:
  """An embedding lookup of a DoRA kernel: ``g * (W[idx] + scale * A[idx] @ B)``; ``None`` where the
  lookup does not take whole rows. With ``dora_recompute`` the backward pass looks the rows up
  again instead of keeping them."""
  if row_axis(eqn, kernel) is None:
    return None

  def fn(w, v):
    view = dataclasses.replace(kernel, w=w, a=v["a"], b=v["b"], g=v["g"])
    base, y, axis = lookup_rows(eqn, view, v["idx"])
    lora = b_branch(y, v["b"], kernel.scale, axis)
    return combine(on_axis(v["g"], base.ndim, axis), base, lora, None)

  v = dict(idx=idx, a=kernel.a, b=kernel.b, g=kernel.g)
  return [product(ctx.dora_recompute, fn, kernel.w, v)]
