"""Interpreter rules for control flow: the evaluation follows kernel views into bodies.

``jit``/``pjit`` and ``closed_call`` bodies are inlined, ``remat`` bodies stay
rematerialised, ``scan`` slices the factors of scanned (stacked) kernels per
step, ``while`` and ``cond`` close over them, and ``custom_jvp``/``custom_vjp``
functions that take an adapted kernel are evaluated through their primal (so
autodiff, not their custom rule, gives their derivative). Values that leave a
body are plain arrays (`jlora._src.interpret.materialize.plain_outputs`).

Each rule is made from the interpreter's ``eval_jaxpr(jaxpr, consts, args, ctx)``,
which the rule table passes in (`jlora._src.interpret.table`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora._src.core import jax_compat, layouts
from jlora._src.core.qarray import is_quantized
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Rule
from jlora._src.interpret.materialize import plain_outputs
from jlora._src.interpret.values import Probe, QuantView, Special, is_special

EvalJaxpr = Callable[..., list[Any]]

__all__ = ["EvalJaxpr", "cond", "inline", "remat", "scan", "split_scanned", "while_loop"]


def inline(param: str, eval_jaxpr: EvalJaxpr) -> Rule:
  """A call's rule: its body (``eqn.params[param]``) evaluated in place."""

  def rule(eqn, invals, ctx):
    closed = eqn.params[param]
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    return eval_jaxpr(jaxpr, consts, invals, ctx)

  return rule


def remat(eval_jaxpr: EvalJaxpr) -> Rule:
  """``remat``'s rule: the body evaluated inside `jax.checkpoint` with the equation's policy."""

  def rule(eqn, invals, ctx):
    jaxpr = eqn.params["jaxpr"]

    def body(vals):
      outs = eval_jaxpr(jaxpr, (), vals, ctx)
      return plain_outputs(outs, ctx, "the output of a `remat` block")

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return fn(list(invals))

  return rule


def _split_weight(w: Any) -> tuple[Any, Callable[[Any], Any]]:
  """A kernel's per-step part in a ``scan`` over its leading axis, and how to rebuild a step's
  kernel: a quantized weight is sliced as codes and scales, so each step dequantizes one layer."""
  if not is_quantized(w):
    return w, lambda step: step
  if w.block_size is None or w.scale_scales is not None:
    return w.dequantize(), lambda step: step  # per-channel or double-quantized scales span the layers
  return w, lambda step: dataclasses.replace(step, shape=w.shape[1:])


def split_scanned(x: Special) -> tuple[Any, Any, Callable[[Any, Any], Special]]:
  """A kernel view scanned over its leading axis: ``(per-step slices, loop-invariant parts,
  rebuild(slices, invariant) -> one step's view)``. Factors (and DoRA's scale) that carry the
  axis are sliced; the others are loop-invariant."""
  if isinstance(x, Probe):

    def rebuild_probe(xs, _):
      return Probe(xs, x.origin[1:], x.site)

    return x.w, None, rebuild_probe
  w_xs, rebuild_w = _split_weight(x.w)
  if isinstance(x, QuantView):
    return w_xs, None, lambda xs, _: QuantView(rebuild_w(xs))
  sliced_a = 0 in x.a_axes
  sliced_b = 0 in x.b_axes
  a = jnp.moveaxis(x.a, x.a_axes.index(0), 0) if sliced_a else x.a
  b = jnp.moveaxis(x.b, x.b_axes.index(0), 0) if sliced_b else x.b
  g = jnp.moveaxis(x.g, x.b_axes.index(0), 0) if sliced_b and x.g is not None else x.g  # DoRA's scale

  def shift(axes: V.Axes) -> V.Axes:
    return tuple(i - 1 for i in axes if i != 0)

  def rebuild(xs, inv):
    w, a_s, b_s, g_s = xs
    a_i, b_i, g_i = inv
    return dataclasses.replace(
      x,
      w=rebuild_w(w),
      a=a_s if sliced_a else a_i,
      b=b_s if sliced_b else b_i,
      a_axes=shift(x.a_axes),
      b_axes=shift(x.b_axes),
      g=g_s if sliced_b else g_i,
    )

  xs = (w_xs, a if sliced_a else None, b if sliced_b else None, g if sliced_b else None)
  inv = (None if sliced_a else a, None if sliced_b else b, None if sliced_b else g)
  return xs, inv, rebuild


def scan(eval_jaxpr: EvalJaxpr) -> Rule:
  """``scan``'s rule: kernel views among the scanned operands are sliced per step (`split_scanned`),
  each step's body evaluated with its own dropout key; carries and outputs are plain arrays."""

  def rule(eqn, invals, ctx):
    p = eqn.params
    nc, nk = jax_compat.scan_counts(p)
    closed = p["jaxpr"]
    consts = invals[:nc]
    init = plain_outputs(invals[nc : nc + nk], ctx, "a `scan` carry")
    packed, invariant, rebuilds = [], [], []
    for x in invals[nc + nk :]:
      xs, inv, rebuild = x, None, None
      if is_special(x):
        xs, inv, rebuild = split_scanned(x)
        if isinstance(x, Probe):
          ctx.record(x, {0: layouts.STACKED}, "scan")
      packed.append(xs)
      invariant.append(inv)
      rebuilds.append(rebuild)
    key = ctx.next_key()
    keys = None if key is None else jax.random.split(key, p["length"])

    def body(carry, step):
      xs, k = step
      vals = [rb(s, inv) if rb else s for s, inv, rb in zip(xs, invariant, rebuilds)]
      outs = eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *vals], ctx.child(k))
      outs = plain_outputs(outs, ctx, "a `scan` output")
      return outs[:nk], outs[nk:]

    carry, ys = lax.scan(
      body, init, (packed, keys), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys]

  return rule


def while_loop(eval_jaxpr: EvalJaxpr) -> Rule:
  """``while``'s rule: the body closes over kernel views, with a dropout key per iteration."""

  def rule(eqn, invals, ctx):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts = plain_outputs(invals[:cn], ctx, "a `while` condition")
    bconsts = invals[cn : cn + bn]
    init = plain_outputs(invals[cn + bn :], ctx, "a `while` carry")
    key = ctx.next_key()

    def cond(state):
      carry, _ = state
      return eval_jaxpr(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts, [*cconsts, *carry], ctx)[0]

    def body(state):
      carry, k = state
      step_key = None
      if k is not None:
        k, step_key = jax.random.split(k)
      closed = p["body_jaxpr"]
      outs = eval_jaxpr(closed.jaxpr, closed.consts, [*bconsts, *carry], ctx.child(step_key))
      return plain_outputs(outs, ctx, "a `while` carry"), k

    carry, _ = lax.while_loop(cond, body, (init, key))
    return list(carry)

  return rule


def cond(eval_jaxpr: EvalJaxpr) -> Rule:
  """``cond``'s rule: each branch closes over kernel views; outputs are plain arrays."""

  def rule(eqn, invals, ctx):
    index, *ops = invals
    key = ctx.next_key()

    def branch(closed):
      def fn(k):
        outs = eval_jaxpr(closed.jaxpr, closed.consts, ops, ctx.child(k))
        return plain_outputs(outs, ctx, "a `cond` output")

      return fn

    return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], key))

  return rule
