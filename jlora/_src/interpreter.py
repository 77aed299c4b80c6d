"""The jaxpr interpreter behind `jlora.wrap`: factorized LoRA wherever a kernel is used.

The model is traced once to a jaxpr (``jax.make_jaxpr``); the interpreter then
re-evaluates it with each adapted kernel replaced by a `LoraValue`. View
primitives (reshape, transpose, casts, slices, squeeze) move the adapter
factors along with the kernel; the primitives that *use* a kernel compute the
LoRA branch factorized:

* ``dot_general`` (Dense, DenseGeneral, einsum, batched contractions):
  ``x @ W + scale * ((drop(x) @ A) @ B)``, the rank-r product first;
* ``conv_general_dilated``: a convolution with ``A`` (r output channels),
  then ``B`` as a 1x1 map;
* ``gather`` (embedding lookup): rows of ``A`` gathered, then ``@ B``; the
  ``vocab x d`` update is never formed.

Control flow is followed: ``jit``/``pjit`` and ``closed_call`` bodies are
inlined, ``remat`` bodies stay rematerialised, ``scan`` slices the factors of
scanned (stacked) kernels per step, ``while`` and ``cond`` close over them, and
``custom_jvp``/``custom_vjp`` functions that take an adapted kernel are
evaluated through their primal (so autodiff, not their custom rule, gives
their derivative). Any other use materialises ``W + scale * A @ B`` for that
use only and warns once, naming the parameter path.

The same walk, run on `Probe` values, reads how a model contracts each kernel
(`infer_layouts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

try:
  from jax._src import source_info_util  # HLO op names; internal, so optional
except ImportError:  # pragma: no cover
  source_info_util = None

from jlora._src import layouts
from jlora._src import values as V
from jlora._src.values import LoraValue, Probe

P = jex.primitives

Special = LoraValue | Probe


class MaterializationWarning(UserWarning):
  """An adapted kernel had to be materialised as ``W + scale * A @ B`` for one use."""


@dataclasses.dataclass
class Context:
  """Per-call state of one interpretation."""

  strategy: str  # "auto" | "factorized"
  differentiated: bool
  dropout_rate: float
  key: jax.Array | None
  warned: set[str]
  roles: dict[str, list[tuple[str, dict[int, str]]]] | None = None  # probe mode
  counter: int = 0

  def child(self, key: jax.Array | None) -> Context:
    return dataclasses.replace(self, key=key, counter=0)

  def next_key(self) -> jax.Array | None:
    if self.key is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.key, self.counter)


def _is_special(x: Any) -> bool:
  return isinstance(x, (LoraValue, Probe))


@dataclasses.dataclass(frozen=True)
class _PendingSum:
  """A ``dot_general``'s base product and LoRA branch, not yet added.

  The sum is formed at the value's first use. If that use is an ``add`` (a
  Dense bias), the bias joins the base product first, ``(x @ W + b) + lora``:
  the association a hand-written layer has, which lets XLA keep one
  pre-activation residual instead of both products (see the benchmarks).
  """

  base: jax.Array
  lora: jax.Array


def _settle(x: Any) -> Any:
  return x.base + x.lora if isinstance(x, _PendingSum) else x


def _bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
  """Binds ``eqn``'s primitive on new inputs (``overrides`` replace params)."""
  params = eqn.primitive.get_bind_params({**eqn.params, **overrides})
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _base(x: Any) -> Any:
  return x.w if _is_special(x) else x


def materialize(x: Any, ctx: Context, why: str) -> Any:
  """A plain array for ``x``; warns once per kernel when ``x`` is a `LoraValue`."""
  if isinstance(x, Probe):
    return x.w
  if not isinstance(x, LoraValue):
    return x
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


def _is_output(x: Any) -> bool:
  return isinstance(x, Probe) and x.output


def _eval_eqn(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  pending = [x for x in invals if isinstance(x, _PendingSum)]
  if eqn.primitive is P.add_p and len(pending) == 1 and not any(_is_special(x) for x in invals):
    p = pending[0]  # (x @ W) + b + lora: the bias joins the base product first
    return [_bind(eqn, [p.base if x is p else x for x in invals])[0] + p.lora]
  invals = [_settle(x) for x in invals]
  if eqn.primitive not in _OUTPUT_VIEWS:
    invals = [x.w if _is_output(x) else x for x in invals]
  if not any(_is_special(x) for x in invals):
    return _bind(eqn, invals)
  rule = _RULES.get(eqn.primitive)
  outs = rule(eqn, invals, ctx) if rule is not None else None
  if outs is None:
    why = f"primitive `{eqn.primitive.name}`"
    outs = _bind(eqn, [materialize(x, ctx, why) for x in invals])
  return outs


def _source_context(eqn: Any) -> Any:
  """Re-enters ``eqn``'s name stack, so HLO metadata and profiles keep the model's module names."""
  if source_info_util is None:  # pragma: no cover - a jax without this module
    return contextlib.nullcontext()
  name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
  return source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
  """Evaluates ``jaxpr`` with `LoraValue`/`Probe` inputs, returning outputs as found."""
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    with _source_context(eqn):
      outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], ctx)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [_settle(read(v)) for v in jaxpr.outvars]


def plain_outputs(outs: Sequence[Any], ctx: Context, why: str) -> list[Any]:
  return [materialize(o, ctx, why) for o in outs]


# -- view primitives -----------------------------------------------------------


def _view(fn: Callable[..., Special | None]):
  def rule(eqn, invals, ctx):
    if not _is_special(invals[0]) or any(_is_special(x) for x in invals[1:]):
      return None
    w = _bind(eqn, [invals[0].w, *invals[1:]])[0]
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


def _probe_index(x: Probe, w: Any, ctx: Context, starts: Sequence[Any]) -> Probe:
  """Axes a slice cuts down to one entry (``w[i]``) are read as stacked layer axes; on a
  product (an output probe), as the fan-out axes the model takes apart entry by entry."""
  cut = [ax for ax in range(len(x.shape)) if w.shape[ax] == 1 < x.shape[ax]]
  if x.output:
    picked = {ax: f"{layouts.SPLIT}{starts[ax]}" for ax in cut if isinstance(starts[ax], int)}
  else:
    picked = {ax: layouts.STACKED for ax in cut}
  if picked:
    _record(ctx, x, picked, "index")
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


# -- consumers -----------------------------------------------------------------


def _record(ctx: Context, probe: Probe, view_roles: dict[int, str], op: str) -> None:
  """Probe mode: notes that primitive ``op`` gives the kernel's axes these roles."""
  assert ctx.roles is not None
  ctx.roles.setdefault(probe.site, []).append((op, V.axis_roles(probe.origin, view_roles)))


def _dropout(x: jax.Array, ctx: Context) -> jax.Array:
  key = ctx.next_key()
  if key is None or ctx.dropout_rate == 0.0:
    return x
  keep = 1.0 - ctx.dropout_rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _dot_general(eqn, invals, ctx):
  lhs, rhs = invals
  if _is_special(lhs) and _is_special(rhs):
    return None
  k_is_lhs = _is_special(lhs)
  kv, x = (lhs, rhs) if k_is_lhs else (rhs, lhs)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  kc, xc, kb, xb = (lc, rc, lb, rb) if k_is_lhs else (rc, lc, rb, lb)
  base = _bind(eqn, [kv.w, rhs] if k_is_lhs else [lhs, kv.w])[0]
  if isinstance(kv, Probe):
    roles = {i: layouts.OUT for i in range(len(kv.shape))}
    roles.update({i: layouts.IN for i in kc})
    roles.update({i: layouts.STACKED for i in kb})
    _record(ctx, kv, roles, "dot_general")
    k_free = [kv.origin[i] for i in range(len(kv.shape)) if i not in kc and i not in kb]
    x_free = [() for j in range(x.ndim) if j not in xc and j not in xb]
    origin = [kv.origin[i] for i in kb] + (k_free + x_free if k_is_lhs else x_free + k_free)
    return [Probe(base, tuple(origin), kv.site, output=True)]

  nk = len(kv.shape)
  lab = V.letters(nk + x.ndim + 1)
  k_lab = lab[:nk]
  x_lab = lab[nk : nk + x.ndim]
  r = lab[-1]
  for i, j in zip(kc, xc):
    x_lab[j] = k_lab[i]
  for i, j in zip(kb, xb):
    x_lab[j] = k_lab[i]
  k_free = [k_lab[i] for i in range(nk) if i not in kc and i not in kb]
  x_free = [x_lab[j] for j in range(x.ndim) if j not in xc and j not in xb]
  out_lab = [k_lab[i] for i in kb] + (k_free + x_free if k_is_lhs else x_free + k_free)
  a_lab = [k_lab[i] for i in kv.a_axes] + [r]
  b_lab = [k_lab[i] for i in kv.b_axes] + [r]
  contracted = {k_lab[i] for i in kc}
  if contracted <= set(a_lab):
    first, second, first_lab, second_lab = kv.a, kv.b, a_lab, b_lab
  elif contracted <= set(b_lab):
    first, second, first_lab, second_lab = kv.b, kv.a, b_lab, a_lab
  else:
    return None  # contraction spans both factors: materialise

  m = math.prod(kv.shape[i] for i in kc)
  n = math.prod(kv.shape) // max(m, 1)
  tokens = math.prod(x.shape) // max(m, 1)
  if (
    ctx.strategy == "auto"
    and not ctx.differentiated
    and ctx.key is None
    and V.flops_merged(m, n, kv.rank) < V.flops_factorized(tokens, m, n, kv.rank)
  ):
    return _bind(eqn, [kv.dense(), rhs] if k_is_lhs else [lhs, kv.dense()])

  dtype = base.dtype
  keep = set(second_lab) | set(out_lab)
  t_lab = [c for c in dict.fromkeys(x_lab + first_lab) if c in keep]
  precision = eqn.params.get("precision")
  pet = eqn.params.get("preferred_element_type")
  xd = _dropout(x, ctx)
  t = jnp.einsum(
    f"{''.join(x_lab)},{''.join(first_lab)}->{''.join(t_lab)}",
    xd,
    first.astype(xd.dtype),
    precision=precision,
    preferred_element_type=pet,
  )
  t = t * jnp.asarray(kv.scale, t.dtype)
  lora = jnp.einsum(
    f"{''.join(t_lab)},{''.join(second_lab)}->{''.join(out_lab)}",
    t,
    second.astype(t.dtype),
    precision=precision,
    preferred_element_type=pet,
  )
  return [_PendingSum(base, lora.astype(dtype))]


def _conv(eqn, invals, ctx):
  x, kv = invals
  if _is_special(x) or not _is_special(kv):
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  base = _bind(eqn, [x, kv.w])[0]
  o_axis, i_axis, *spatial = dn.rhs_spec
  if isinstance(kv, Probe):
    roles = {ax: layouts.IN for ax in (i_axis, *spatial)}
    roles[o_axis] = layouts.OUT if p["feature_group_count"] == 1 else "grouped"
    _record(ctx, kv, roles, "conv_general_dilated")
    return [base]
  if (
    p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or tuple(kv.b_axes) != (o_axis,)
    or set(kv.a_axes) != {i_axis, *spatial}
  ):
    return None
  a_k = kv.factor_in_view("a", o_axis)
  xd = _dropout(x, ctx)
  y = _bind(eqn, [xd, a_k.astype(xd.dtype)])[0]
  f = dn.out_spec[1]
  y = y * jnp.asarray(kv.scale, y.dtype)
  lora = jnp.moveaxis(jnp.tensordot(y, kv.b.astype(y.dtype), axes=([f], [1])), -1, f)
  return [base + lora.astype(base.dtype)]


def _gather(eqn, invals, ctx):
  kv, idx = invals
  if _is_special(idx) or not _is_special(kv):
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  base = _bind(eqn, [kv.w, idx])[0]
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  full = [ax for ax in range(len(kv.shape)) if ax not in indexed and p["slice_sizes"][ax] == kv.shape[ax]]
  if isinstance(kv, Probe):
    roles = {ax: layouts.OUT for ax in full}
    roles.update({ax: layouts.IN for ax in range(len(kv.shape)) if ax not in full})
    _record(ctx, kv, roles, "gather")
    return [base]
  b_only = [ax for ax in kv.b_axes if ax not in kv.a_axes]
  if len(b_only) != 1 or len(kv.b_axes) != 1 or b_only[0] not in full:
    return None
  d = b_only[0]
  a_g = kv.factor_in_view("a", d)
  sizes = list(p["slice_sizes"])
  sizes[d] = kv.rank
  g = _bind(eqn, [a_g, idx], slice_sizes=tuple(sizes))[0]
  kept = [
    ax
    for ax in range(len(kv.shape))
    if ax not in dn.collapsed_slice_dims and ax not in dn.operand_batching_dims
  ]
  pos = dn.offset_dims[kept.index(d)]
  g = g * jnp.asarray(kv.scale, g.dtype)
  lora = jnp.moveaxis(jnp.tensordot(g, kv.b.astype(g.dtype), axes=([pos], [1])), -1, pos)
  return [base + lora.astype(base.dtype)]


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


def _split_scanned(x: Special) -> tuple[Any, Any, Callable[[Any, Any], Special]]:
  """Splits a special value into (per-step slices, loop-invariant parts, rebuild)."""
  if isinstance(x, Probe):

    def rebuild_probe(xs, _):
      return Probe(xs, x.origin[1:], x.site)

    return x.w, None, rebuild_probe
  sliced_a = 0 in x.a_axes
  sliced_b = 0 in x.b_axes
  a = jnp.moveaxis(x.a, x.a_axes.index(0), 0) if sliced_a else x.a
  b = jnp.moveaxis(x.b, x.b_axes.index(0), 0) if sliced_b else x.b

  def shift(axes: V.Axes) -> V.Axes:
    return tuple(i - 1 for i in axes if i != 0)

  def rebuild(xs, inv):
    w, a_s, b_s = xs
    a_i, b_i = inv
    return LoraValue(
      w,
      a_s if sliced_a else a_i,
      b_s if sliced_b else b_i,
      shift(x.a_axes),
      shift(x.b_axes),
      x.scale,
      x.site,
    )

  xs = (x.w, a if sliced_a else None, b if sliced_b else None)
  inv = (None if sliced_a else a, None if sliced_b else b)
  return xs, inv, rebuild


def _scan(eqn, invals, ctx):
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  closed = p["jaxpr"]
  consts = invals[:nc]
  init = plain_outputs(invals[nc : nc + nk], ctx, "a `scan` carry")
  xs_in = invals[nc + nk :]
  packed, invariant, rebuilds = [], [], []
  for x in xs_in:
    if _is_special(x):
      xs, inv, rebuild = _split_scanned(x)
      if isinstance(x, Probe):
        _record(ctx, x, {0: layouts.STACKED}, "scan")
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


# Primitives an output probe follows (the others see the plain product).
_OUTPUT_VIEWS = frozenset(
  {
    P.transpose_p,
    P.reshape_p,
    P.squeeze_p,
    P.convert_element_type_p,
    P.copy_p,
    P.sharding_constraint_p,
    P.slice_p,
  }
)

_RULES: dict[Any, Callable[..., list[Any] | None]] = {
  P.transpose_p: _view(_transpose),
  P.reshape_p: _view(_reshape),
  P.squeeze_p: _view(_squeeze),
  P.broadcast_in_dim_p: _view(_broadcast),
  P.convert_element_type_p: _view(_convert),
  P.copy_p: _view(_same_view),
  P.sharding_constraint_p: _view(_same_view),
  P.slice_p: _view(_slice),
  P.dynamic_slice_p: _view(_dynamic_slice),
  P.rev_p: _view(_rev),
  P.dot_general_p: _dot_general,
  P.conv_general_dilated_p: _conv,
  P.gather_p: _gather,
  P.jit_p: _inline("jaxpr"),
  P.closed_call_p: _inline("call_jaxpr"),
  P.remat_p: _remat,
  P.scan_p: _scan,
  P.while_p: _while,
  P.cond_p: _cond,
  P.custom_jvp_call_p: _inline("call_jaxpr"),
  P.custom_vjp_call_p: _inline("call_jaxpr"),
}
