"""Interpreter rules for the primitives that use a kernel: the LoRA branch, factorized.

* ``dot_general`` (Dense, DenseGeneral, einsum, batched contractions): one of
  the named products below, chosen by `dot_general` in this order:

  - `probe_dot`: a `Probe` records the role the use gives each kernel axis;
  - `jlora._src.interpret.rules.dora.dot_general`: a DoRA kernel (never merged);
  - `merged_dot`: under ``strategy="auto"`` with neither gradient nor dropout,
    ``x @ (W + scale * A @ B)`` where that costs fewer FLOPs (with factorized
    gradients, should a caller differentiate it after all);
  - `factorized_dot`: ``x @ W + scale * ((drop(x) @ A) @ B)``, the rank-r product
    first, with LoRA dropout (`jlora._src.interpret.rules.branch.dropout`) on the
    branch input, or with the first product given by sibling fusion;

* ``conv_general_dilated`` (`conv`): a convolution with ``A`` (r output
  channels), then ``B`` as a 1x1 map;
* ``gather`` (`gather`, embedding lookup): rows of ``A`` gathered, then ``@ B``;
  the ``vocab x d`` update is never formed.

A rule returns ``None`` where the use cannot be factored; the interpreter then
materialises the kernel for that use. A bank's kernel never reaches these
rules: the table routes it first (`jlora._src.interpret.table`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from jlora._src.core import jax_compat, layouts
from jlora._src.interpret.context import Context
from jlora._src.interpret.rules import dora
from jlora._src.interpret.rules.branch import (
  Dot,
  DotUse,
  PendingSum,
  b_branch,
  bind_dot,
  branch_of,
  dropout,
  full_axes,
  kernel_dot,
  lookup_rows,
  lora_branch,
  merged_is_cheaper,
)
from jlora._src.interpret.values import Probe, is_special

P = jex.primitives


def dot_general(
  eqn: Any, invals: list[Any], ctx: Context, first: jax.Array | None = None
) -> list[Any] | None:
  """The ``dot_general`` rule for one adapter's kernel: a probe's record, DoRA, merged or
  factorized (see the module doc); ``first`` is ``x @ first factor`` where sibling fusion computed
  it (`jlora._src.interpret.fusion.fused`)."""
  found = kernel_dot(eqn, invals)
  if found is None:
    return None
  kernel, x, dot = found
  if isinstance(kernel, Probe):
    return probe_dot(eqn, kernel, x, dot, ctx)
  br = branch_of(eqn, kernel, x, dot)
  if br is None:
    return None
  use = DotUse(eqn, kernel, x, dot, br)
  if kernel.g is not None:
    return dora.dot_general(use, ctx, first=first)
  if first is None and merged_is_cheaper(kernel, x, dot, ctx):
    return [merged_dot(use)]
  return [factorized_dot(use, ctx, first=first)]


def probe_dot(eqn: Any, probe: Probe, x: Any, dot: Dot, ctx: Context) -> list[Any]:
  """Layout reading: records the contracted kernel axes as fan-in, batch axes as stacked and the
  rest as fan-out; the output is an output `Probe` of the product."""
  roles = {i: layouts.OUT for i in range(len(probe.shape))}
  roles.update({i: layouts.IN for i in dot.kc})
  roles.update({i: layouts.STACKED for i in dot.kb})
  ctx.record(probe, roles, "dot_general")
  origin = dot.out_order(probe.origin, [()] * x.ndim)
  return [Probe(bind_dot(eqn, dot, probe.base, x)[0], tuple(origin), probe.site, output=True)]


def factorized_dot(use: DotUse, ctx: Context, *, first: jax.Array | None = None) -> PendingSum:
  """``x @ W`` and ``scale * ((drop(x) @ A) @ B)``, added at the sum's first use; ``first``: the
  first product ``x @ A`` computed already (by sibling fusion, which runs without dropout)."""
  kernel, x = use.kernel, use.x
  base = use.base(kernel.base, x)
  xd = x if first is not None else dropout(x, ctx)
  lora = lora_branch(use.br, kernel.scale, xd, kernel.a, kernel.b, t=first)
  return PendingSum(base, lora.astype(base.dtype))


def merged_dot(use: DotUse) -> jax.Array:
  """``x @ (W + scale * A @ B)`` forward (fewer FLOPs for many tokens), with the factorized
  gradients: ``grad`` of an already-jitted apply (which chose this path, seeing no autodiff)
  never forms a kernel-sized gradient. The frozen base gets no cotangent."""

  kernel = use.kernel

  def merged(x, w, a, b):
    return use.base(dataclasses.replace(kernel, w=w, a=a, b=b).dense(), x)

  def backward(res, g):
    x, w, a, b = res

    def factorized(x, a, b):
      base = use.base(w, x)
      return base + lora_branch(use.br, kernel.scale, x, a, b).astype(base.dtype)

    dx, da, db = jax.vjp(factorized, x, a, b)[1](g)
    return dx, None, da, db

  f = jax.custom_vjp(merged)
  f.defvjp(lambda x, w, a, b: (merged(x, w, a, b), (x, w, a, b)), backward)
  return f(use.x, kernel.base, kernel.a, kernel.b)


def _probe_conv(eqn: Any, x: jax.Array, probe: Probe, ctx: Context) -> list[Any]:
  p = eqn.params
  o_axis, i_axis, *spatial = p["dimension_numbers"].rhs_spec
  roles = {ax: layouts.IN for ax in spatial}
  roles[i_axis] = (
    layouts.IN if p["feature_group_count"] == 1 else f"{layouts.GROUPED}{p['feature_group_count']}"
  )
  roles[o_axis] = layouts.OUT
  ctx.record(probe, roles, "conv_general_dilated")
  if any(d != 1 for d in p["rhs_dilation"] or ()):
    ctx.record(probe, roles, layouts.DILATED_CONV)
  return [jax_compat.bind(eqn, [x, probe.base])[0]]


def conv(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """The ``conv_general_dilated`` rule: ``conv(x, W) + scale * conv(drop(x), A) @ B``, with ``A``
  as a convolution to r channels and ``B`` as a 1x1 map (a DoRA kernel: `dora.conv`); a grouped
  convolution's adapter (``kernel.groups``, PEFT's) convolves with ``A`` ungrouped, over all input
  channels, and applies ``B`` as a grouped 1x1 map (`grouped_b_branch`). ``None`` for factors that do
  not split the kernel as output vs the rest."""
  x, kernel = invals
  if is_special(x) or not is_special(kernel):
    return None
  if isinstance(kernel, Probe):
    return _probe_conv(eqn, x, kernel, ctx)
  p = eqn.params
  dn = p["dimension_numbers"]
  o_axis, i_axis, *spatial = dn.rhs_spec
  groups = p["feature_group_count"]
  if (
    groups != kernel.groups
    or p["batch_group_count"] != 1
    or tuple(kernel.b_axes) != (o_axis,)
    or set(kernel.a_axes) != {i_axis, *spatial}
    or kernel.a.shape[kernel.a_axes.index(i_axis)] != kernel.shape[i_axis] * groups
  ):
    return None
  if kernel.g is not None:
    return dora.conv(eqn, kernel, x, ctx)
  base = jax_compat.bind(eqn, [x, kernel.base])[0]
  a = kernel.factor_in_view("a", o_axis).astype(x.dtype)
  y = jax_compat.bind(eqn, [dropout(x, ctx), a], feature_group_count=1)[0]
  axis = dn.out_spec[1]
  lora = grouped_b_branch(y, kernel.b, kernel.scale, axis, groups)
  return [base + lora.astype(base.dtype)]


def grouped_b_branch(y: jax.Array, b: jax.Array, scale: float, axis: int, groups: int) -> jax.Array:
  """`b_branch` as a grouped 1x1 map (PEFT's grouped ``lora_B``): ``y``'s ``axis`` holds r features,
  ``b`` is ``(fan-out, r / groups)``, and fan-out group ``k`` reads rank features group ``k``."""
  if groups == 1:
    return b_branch(y, b, scale, axis)
  y = jnp.moveaxis(y * jnp.asarray(scale, y.dtype), axis, -1)
  y = y.reshape(*y.shape[:-1], groups, -1)
  bg = b.astype(y.dtype).reshape(groups, -1, b.shape[-1])  # (groups, fan-out / groups, r / groups)
  out = jnp.einsum("...gr,gor->...go", y, bg)
  return jnp.moveaxis(out.reshape(*out.shape[:-2], -1), -1, axis)


def gather(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """The ``gather`` rule (an embedding lookup): ``W[idx] + scale * A[idx] @ B`` (a DoRA kernel:
  `dora.gather`); ``None`` where the lookup does not take whole rows of one fan-out axis."""
  kernel, idx = invals
  if is_special(idx) or not is_special(kernel):
    return None
  if isinstance(kernel, Probe):
    full = full_axes(eqn, kernel)
    roles = {ax: layouts.OUT for ax in full}
    roles.update({ax: layouts.IN for ax in range(len(kernel.shape)) if ax not in full})
    ctx.record(kernel, roles, "gather")
    return [jax_compat.bind(eqn, [kernel.base, idx])[0]]
  if kernel.g is not None:
    return dora.gather(eqn, kernel, idx, ctx)
  rows = lookup_rows(eqn, kernel, idx)
  if rows is None:
    return None
  base, y, axis = rows
  return [base + b_branch(y, kernel.b, kernel.scale, axis).astype(base.dtype)]
