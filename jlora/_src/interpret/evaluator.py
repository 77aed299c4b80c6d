"""The jaxpr interpreter behind `jlora.wrap`: factorized LoRA wherever a kernel is used.

The model is traced once to a jaxpr (``jax.make_jaxpr``); the interpreter then
re-evaluates it with each adapted kernel replaced by a `LoraValue`. Each
primitive that meets a kernel view has a rule:

* view primitives (reshape, transpose, casts, slices, squeeze) move the adapter
  factors along with the kernel (`jlora._src.interpret.rules.views`);
* the primitives that *use* a kernel compute the LoRA branch factorized:
  ``dot_general``, ``conv_general_dilated`` and ``gather``
  (`jlora._src.interpret.rules.products`);
* control flow is followed (here): ``jit``/``pjit`` and ``closed_call`` bodies
  are inlined, ``remat`` bodies stay rematerialised, ``scan`` slices the factors
  of scanned (stacked) kernels per step, ``while`` and ``cond`` close over them,
  and ``custom_jvp``/``custom_vjp`` functions that take an adapted kernel are
  evaluated through their primal (so autodiff, not their custom rule, gives
  their derivative).

Any other use materialises ``W + scale * A @ B`` for that use only and warns
once, naming the parameter path. A rule is ``rule(eqn, invals, ctx)`` and
returns the outputs, or ``None`` to ask for that materialisation.

The same walk, run on `Probe` values, reads how a model contracts each kernel
(`infer_layouts`). Primitives are re-bound through `jlora._src.core.jax_compat`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from jlora._src.core import jax_compat, layouts
from jlora._src.core.qarray import is_quantized
from jlora._src.interpret import fusion as interpreter_fusion
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.rules import moe, parallel, products, routing, views
from jlora._src.interpret.rules.products import PendingSum, settle
from jlora._src.interpret.values import LoraValue, Probe, QuantView, Special, is_special

__all__ = ["Context", "MaterializationWarning", "eval_jaxpr", "materialize", "plain_outputs"]

P = jex.primitives


class MaterializationWarning(UserWarning):
  """An adapted kernel had to be materialised as ``W + scale * A @ B`` for one use.

  The result is still exact; the warning (once per kernel) says that this use
  costs a kernel-sized temporary and gradient. Turn it into an error where that
  must never happen: ``warnings.simplefilter("error", jlora.MaterializationWarning)``.

  Example:
    >>> import warnings, jax, jax.numpy as jnp, jlora
    >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("w",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> fn = lambda p, x: jnp.sin(p["w"]["kernel"]) + x    # an elementwise use: not a product
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = jlora.wrap(fn, cfg)(params, lora, 1.0)
    >>> [w.category.__name__ for w in caught]
    ['MaterializationWarning']
  """


def materialize(x: Any, ctx: Context, why: str) -> Any:
  """A plain array for ``x``; warns once per kernel when ``x`` is a `LoraValue`."""
  if isinstance(x, (Probe, QuantView)):
    return V.dense_weight(x.w)
  if not isinstance(x, LoraValue):
    return x
  if x.routed is not None:
    raise routing.unroutable(x, why)
  if x.site not in ctx.warned:
    ctx.warned.add(x.site)
    warnings.warn(
      f"jlora: the adapted kernel {x.site!r} reaches {why}, which the factorized path does "
      "not cover; W + scale*A@B is materialised for that use (correct, but it costs a "
      "kernel-sized temporary and a kernel-sized gradient).",
      MaterializationWarning,
      stacklevel=2,
    )
  return x.dense()


def plain_outputs(outs: Sequence[Any], ctx: Context, why: str) -> list[Any]:
  """``outs`` as plain arrays (materialising, with a warning, any kernel view among them)."""
  return [materialize(o, ctx, why) for o in outs]


def _eval_eqn(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  pending = [x for x in invals if isinstance(x, PendingSum)]
  if eqn.primitive is P.add_p and len(pending) == 1 and not any(is_special(x) for x in invals):
    p = pending[0]  # (x @ W) + b + lora: the bias joins the base product first
    return [jax_compat.bind(eqn, [p.base if x is p else x for x in invals])[0] + p.lora]
  invals = [settle(x) for x in invals]
  if eqn.primitive not in views.OUTPUT_VIEWS:
    invals = [x.w if isinstance(x, Probe) and x.output else x for x in invals]
  if eqn.primitive not in _PASSES_QUANTIZED:  # a quantized weight is dequantized at its use
    invals = [x.w.dequantize() if isinstance(x, QuantView) else x for x in invals]
  if not any(is_special(x) for x in invals):
    return jax_compat.bind(eqn, invals)
  rule = _RULES.get(eqn.primitive)
  outs = rule(eqn, invals, ctx) if rule is not None else None
  if outs is None:
    why = f"primitive `{eqn.primitive.name}`"
    outs = jax_compat.bind(eqn, [materialize(x, ctx, why) for x in invals])
  return outs


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
  """Evaluates ``jaxpr`` with `LoraValue`/`Probe` inputs, returning outputs as found."""
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  siblings = interpreter_fusion.Siblings(jaxpr, env, ctx, _eval_eqn)  # sibling fusion
  for i, eqn in enumerate(jaxpr.eqns):
    if siblings.done(i):
      continue
    with jax_compat.source_context(eqn):
      invals = [read(v) for v in eqn.invars]
      outs = siblings.eval(i, eqn, invals)
      outs = _eval_eqn(eqn, invals, ctx) if outs is None else outs
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [settle(read(v)) for v in jaxpr.outvars]


# -- control flow --------------------------------------------------------------


def _inline(param: str):
  def rule(eqn, invals, ctx):
    closed = eqn.params[param]
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    return eval_jaxpr(jaxpr, consts, invals, ctx)

  return rule


def _remat(eqn, invals, ctx):
  jaxpr = eqn.params["jaxpr"]

  def body(vals):
    outs = eval_jaxpr(jaxpr, (), vals, ctx)
    return plain_outputs(outs, ctx, "the output of a `remat` block")

  fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
  return fn(list(invals))


def _split_weight(w: Any) -> tuple[Any, Callable[[Any], Any]]:
  """A kernel's per-step part in a ``scan`` over its leading axis, and how to rebuild a step's
  kernel: a quantized weight is sliced as codes and scales, so each step dequantizes one layer."""
  if not is_quantized(w):
    return w, lambda step: step
  if w.block_size is None or w.scale_scales is not None:
    return w.dequantize(), lambda step: step  # per-channel or double-quantized scales span the layers
  return w, lambda step: dataclasses.replace(step, shape=w.shape[1:])


def _split_scanned(x: Special) -> tuple[Any, Any, Callable[[Any, Any], Special]]:
  """Splits a special value into (per-step slices, loop-invariant parts, rebuild)."""
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


def _scan(eqn, invals, ctx):
  p = eqn.params
  nc, nk = jax_compat.scan_counts(p)
  closed = p["jaxpr"]
  consts = invals[:nc]
  init = plain_outputs(invals[nc : nc + nk], ctx, "a `scan` carry")
  xs_in = invals[nc + nk :]
  packed, invariant, rebuilds = [], [], []
  for x in xs_in:
    if is_special(x):
      xs, inv, rebuild = _split_scanned(x)
      if isinstance(x, Probe):
        ctx.record(x, {0: layouts.STACKED}, "scan")
    else:
      xs, inv, rebuild = x, None, None
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


def _while(eqn, invals, ctx):
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
    outs = eval_jaxpr(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts, [*bconsts, *carry], ctx.child(step_key))
    return plain_outputs(outs, ctx, "a `while` carry"), k

  carry, _ = lax.while_loop(cond, body, (init, key))
  return list(carry)


def _cond(eqn, invals, ctx):
  index, *ops = invals
  key = ctx.next_key()

  def branch(closed):
    def fn(k):
      outs = eval_jaxpr(closed.jaxpr, closed.consts, ops, ctx.child(k))
      return plain_outputs(outs, ctx, "a `cond` output")

    return fn

  return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], key))


# Primitives that take a quantized weight as it is (a scan slices it per step; the others pass it
# into their bodies); every other primitive gets it dequantized.
_PASSES_QUANTIZED = frozenset(
  {P.scan_p, P.jit_p, P.closed_call_p, P.remat_p, P.custom_jvp_call_p, P.custom_vjp_call_p}
)

_RULES: dict[Any, Callable[..., list[Any] | None]] = {
  **views.RULES,
  **products.RULES,
  **moe.RULES,
  **parallel.RULES,
  parallel.SHARD_MAP_P: parallel.shard_map_rule(eval_jaxpr, plain_outputs),
  P.jit_p: _inline("jaxpr"),
  P.closed_call_p: _inline("call_jaxpr"),
  P.remat_p: _remat,
  P.scan_p: _scan,
  P.while_p: _while,
  P.cond_p: _cond,
  P.custom_jvp_call_p: _inline("call_jaxpr"),
  P.custom_vjp_call_p: _inline("call_jaxpr"),
  **routing.RULES,  # a bank's kernels, per example; others go on to the rules above
}
