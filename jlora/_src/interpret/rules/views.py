"""Interpreter rules for view primitives: the adapter factors follow the kernel.

A view (reshape, transpose, unit-axis broadcast, cast, copy, sharding
constraint, slice, dynamic slice, reverse, squeeze, unstack) is bound on the base
kernel ``w``; the `LoraValue` then rearranges its factors to match, or the
`Probe` records which kernel axes each view axis came from. A rule returns
``None`` where the view cannot be followed; the interpreter then materialises
the kernel for that use. The rule table (`jlora._src.interpret.table`) keys
these rules by `PRIMITIVES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jax import lax
from jax.extend import core as jex

from jlora._src.core import jax_compat, layouts
from jlora._src.interpret.context import Context, Rule
from jlora._src.interpret.primitives import UNSTACK_P
from jlora._src.interpret.values import LoraValue, Probe, Special, is_special

P = jex.primitives


def _view(fn: Callable[..., Special | None]) -> Rule:
  """A rule from ``fn(x, w, params, ctx, *dynamic)``: ``w`` is the view bound on ``x.w``."""

  def rule(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
    if not is_special(invals[0]) or any(is_special(x) for x in invals[1:]):
      return None
    w = jax_compat.bind(eqn, [invals[0].base, *invals[1:]])[0]
    out = fn(invals[0], w, eqn.params, ctx, *invals[1:])
    return None if out is None else [out]

  return rule


def _transpose(x, w, params, ctx):
  return x.transpose(params["permutation"], w)


def _reshape(x, w, params, ctx, *dyn):
  if params.get("dimensions") is not None or dyn:
    return None
  return x.reshape(tuple(w.shape), w)


def _broadcast(x, w, params, ctx, *dyn):
  # Only broadcasts that add unit axes (expand_dims) are views.
  dims = params["broadcast_dimensions"]
  if dyn or list(dims) != sorted(dims) or any(w.shape[d] != s for d, s in zip(dims, x.shape)):
    return None
  if any(w.shape[j] != 1 for j in range(w.ndim) if j not in dims):
    return None
  return x.reshape(tuple(w.shape), w)


def _convert(x, w, params, ctx):
  if isinstance(x, Probe):
    return dataclasses.replace(x, w=w)
  return x.cast(params["new_dtype"], w)


def _same_view(x, w, params, ctx, *dyn):
  return dataclasses.replace(x, w=w)


def _record_index(x: Probe, ctx: Context, starts: dict[int, Any]) -> None:
  """Axes the model cuts down to one entry (``w[i]``, at ``starts[axis]``) are read as stacked layer
  axes; on a product (an output probe), as the fan-out axes the model takes apart entry by entry."""
  if x.output:
    picked = {ax: f"{layouts.SPLIT}{i}" for ax, i in starts.items() if isinstance(i, int)}
  else:
    picked = {ax: layouts.STACKED for ax in starts}
  if picked:
    ctx.record(x, picked, "index")


def _probe_index(x: Probe, w: Any, ctx: Context, starts: Sequence[Any]) -> Probe:
  cut = [ax for ax in range(len(x.shape)) if w.shape[ax] == 1 < x.shape[ax]]
  _record_index(x, ctx, {ax: starts[ax] for ax in cut})
  return dataclasses.replace(x, w=w)


def _slice(x, w, params, ctx):
  if isinstance(x, Probe):
    return _probe_index(x, w, ctx, params["start_indices"])
  strides = params["strides"] or (1,) * w.ndim
  out = x
  for ax, (lo, hi, st) in enumerate(zip(params["start_indices"], params["limit_indices"], strides)):
    if (lo, hi, st) != (0, x.shape[ax], 1):
      out = out.map_axis(ax, lambda f, d, lo=lo, hi=hi, st=st: lax.slice_in_dim(f, lo, hi, st, d))
  return dataclasses.replace(out, w=w)


def _dynamic_slice(x, w, params, ctx, *starts):
  if isinstance(x, Probe):
    return _probe_index(x, w, ctx, [None] * len(starts))
  out = x
  for ax, (start, size) in enumerate(zip(starts, params["slice_sizes"])):
    if size != x.shape[ax]:
      out = out.map_axis(ax, lambda f, d, s=start, n=size: lax.dynamic_slice_in_dim(f, s, n, d))
  return dataclasses.replace(out, w=w)


def _rev(x, w, params, ctx):
  if isinstance(x, Probe):
    return dataclasses.replace(x, w=w)
  out = x
  for ax in params["dimensions"]:
    out = out.map_axis(ax, lambda f, d: lax.rev(f, (d,)))
  return dataclasses.replace(out, w=w)


def _squeeze(x, w, params, ctx):
  return x.reshape(tuple(w.shape), w)


def unstack(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """``lax.unstack``, which iterating over an array binds from jax 0.11 (``k, v = kv``; jax 0.10
  sliced and squeezed): entry ``i`` is the view at index ``i`` of ``axis``, without that axis."""
  (x,) = invals
  if not isinstance(x, (LoraValue, Probe)):
    return None
  axis = eqn.params["axis"]
  ws = jax_compat.bind(eqn, [x.base])
  if isinstance(x, Probe):
    if x.shape[axis] > 1:
      for i in range(len(ws)):
        _record_index(x, ctx, {axis: i})
    origin = x.origin[:axis] + x.origin[axis + 1 :]
    return [dataclasses.replace(x, w=w, origin=origin) for w in ws]

  def drop(axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(ax - (ax > axis) for ax in axes if ax != axis)

  return [
    dataclasses.replace(
      x.map_axis(axis, lambda f, d, i=i: lax.index_in_dim(f, i, d, keepdims=False)),
      w=w,
      a_axes=drop(x.a_axes),
      b_axes=drop(x.b_axes),
    )
    for i, w in enumerate(ws)
  ]


transpose = _view(_transpose)
reshape = _view(_reshape)
squeeze = _view(_squeeze)
broadcast_in_dim = _view(_broadcast)
convert_element_type = _view(_convert)
copy = _view(_same_view)
sharding_constraint = _view(_same_view)
static_slice = _view(_slice)
dynamic_slice = _view(_dynamic_slice)
rev = _view(_rev)

# The views an output probe follows (the other primitives see the plain product).
OUTPUT_VIEWS = frozenset(
  {
    P.transpose_p,
    P.reshape_p,
    P.squeeze_p,
    P.convert_element_type_p,
    P.copy_p,
    P.sharding_constraint_p,
    P.slice_p,
  }
  | ({UNSTACK_P} if UNSTACK_P is not None else set())
)

# Every primitive with a view rule here: pure, so sibling fusion may compute a kernel's view early.
PRIMITIVES = OUTPUT_VIEWS | {P.broadcast_in_dim_p, P.dynamic_slice_p, P.rev_p}
