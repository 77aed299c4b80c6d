"""Interpreter rules for the primitives that use a kernel: the LoRA branch, factorized.

* ``dot_general`` (Dense, DenseGeneral, einsum, batched contractions):
  ``x @ W + scale * ((drop(x) @ A) @ B)``, the rank-r product first; under
  ``strategy="auto"`` with neither gradient nor dropout, ``x @ (W + scale * A @ B)``
  where that costs fewer FLOPs;
* ``conv_general_dilated``: a convolution with ``A`` (r output channels), then
  ``B`` as a 1x1 map;
* ``gather`` (embedding lookup): rows of ``A`` gathered, then ``@ B``; the
  ``vocab x d`` update is never formed.

On a `Probe` each rule records the role the use gives each kernel axis instead.
A rule returns ``None`` where the use cannot be factored; the interpreter then
materialises the kernel for that use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from jlora._src.core import jax_compat, layouts
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.contractions import factor_product
from jlora._src.interpret.rules import dora
from jlora._src.interpret.values import LoraValue, Probe, is_special

P = jex.primitives


@dataclasses.dataclass(frozen=True)
class PendingSum:
  """A ``dot_general``'s base product and LoRA branch, not yet added.

  The sum is formed at the value's first use. If that use is an ``add`` (a
  Dense bias), the bias joins the base product first, ``(x @ W + b) + lora``:
  the association a hand-written layer has, which lets XLA keep one
  pre-activation residual instead of both products (see the benchmarks).
  """

  base: jax.Array
  lora: jax.Array


def settle(x: Any) -> Any:
  """``x`` with a `PendingSum` added up."""
  return x.base + x.lora if isinstance(x, PendingSum) else x


def dropout(x: jax.Array, ctx: Context) -> jax.Array:
  """LoRA dropout on the branch input, with this scope's next key (none without one)."""
  key = ctx.next_key()
  if key is None or ctx.dropout_rate == 0.0:
    return x
  keep = 1.0 - ctx.dropout_rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class Dot:
  """A ``dot_general`` seen from the kernel: which operand it is, and its axes on each side."""

  k_is_lhs: bool
  kc: Sequence[int]  # kernel contracting axes
  xc: Sequence[int]  # input contracting axes
  kb: Sequence[int]  # kernel batch axes
  xb: Sequence[int]  # input batch axes

  def out_order(self, k_axes: Sequence[Any], x_axes: Sequence[Any]) -> list[Any]:
    """The output's axes from per-axis entries of each operand: batch, then lhs free, rhs free."""
    k_free = [k_axes[i] for i in range(len(k_axes)) if i not in self.kc and i not in self.kb]
    x_free = [x_axes[j] for j in range(len(x_axes)) if j not in self.xc and j not in self.xb]
    return [k_axes[i] for i in self.kb] + (k_free + x_free if self.k_is_lhs else x_free + k_free)


def bind_dot(eqn: Any, dot: Dot, kernel: jax.Array, x: Any) -> list[Any]:
  return jax_compat.bind(eqn, [kernel, x] if dot.k_is_lhs else [x, kernel])


def _probe_dot(eqn: Any, kv: Probe, x: Any, dot: Dot, ctx: Context) -> list[Any]:
  roles = {i: layouts.OUT for i in range(len(kv.shape))}
  roles.update({i: layouts.IN for i in dot.kc})
  roles.update({i: layouts.STACKED for i in dot.kb})
  ctx.record(kv, roles, "dot_general")
  origin = dot.out_order(kv.origin, [()] * x.ndim)
  return [Probe(bind_dot(eqn, dot, kv.base, x)[0], tuple(origin), kv.site, output=True)]


def merged_is_cheaper(kv: LoraValue, x: Any, dot: Dot, ctx: Context) -> bool:
  """Whether ``strategy="auto"`` merges this use: allowed here, and fewer FLOPs than the branch."""
  if not ctx.may_merge():
    return False
  m = math.prod(kv.shape[i] for i in dot.kc)
  n = math.prod(kv.shape) // max(m, 1)
  tokens = math.prod(x.shape) // max(m, 1)
  return V.flops_merged(m, n, kv.rank) < V.flops_factorized(tokens, m, n, kv.rank)


@dataclasses.dataclass(frozen=True)
class Branch:
  """How one ``dot_general``'s LoRA branch contracts, as ``einsum`` labels: ``x`` (``x_lab``)
  with the first factor (``first_lab``, rank last) to ``t`` (``t_lab``), then ``t`` with the
  second factor (``second_lab``) to the output (``out_lab``)."""

  first_is_a: bool
  x_lab: str
  first_lab: str
  t_lab: str
  second_lab: str
  out_lab: str
  opts: tuple[tuple[str, Any], ...]


def branch_of(eqn: Any, kv: LoraValue, x: Any, dot: Dot) -> Branch | None:
  """The factorized branch of ``eqn`` on ``kv``; ``None`` where the contraction spans both factors."""
  nk = len(kv.shape)
  lab = V.letters(nk + x.ndim + 1)
  k_lab, x_lab, r = lab[:nk], lab[nk : nk + x.ndim], lab[-1]
  for i, j in zip([*dot.kc, *dot.kb], [*dot.xc, *dot.xb]):
    x_lab[j] = k_lab[i]
  out_lab = dot.out_order(k_lab, x_lab)
  a_lab = [k_lab[i] for i in kv.a_axes] + [r]
  b_lab = [k_lab[i] for i in kv.b_axes] + [r]
  contracted = {k_lab[i] for i in dot.kc}
  if contracted <= set(a_lab):
    first_is_a, first_lab, second_lab = True, a_lab, b_lab
  elif contracted <= set(b_lab):
    first_is_a, first_lab, second_lab = False, b_lab, a_lab
  else:
    return None
  keep = set(second_lab) | set(out_lab)
  t_lab = "".join(c for c in dict.fromkeys(x_lab + first_lab) if c in keep)
  opts = (
    ("precision", eqn.params.get("precision")),
    ("preferred_element_type", eqn.params.get("preferred_element_type")),
  )
  labels = ("".join(x_lab), "".join(first_lab), t_lab, "".join(second_lab), "".join(out_lab))
  return Branch(first_is_a, *labels, opts)


def kernel_dot(eqn: Any, invals: Sequence[Any]) -> tuple[Any, Any, Dot] | None:
  """A ``dot_general``'s kernel view, its other operand and its axes; ``None`` unless exactly
  one operand is a kernel view."""
  lhs, rhs = invals
  if is_special(lhs) == is_special(rhs):
    return None
  k_is_lhs = is_special(lhs)
  kv, x = (lhs, rhs) if k_is_lhs else (rhs, lhs)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return kv, x, Dot(k_is_lhs, *((lc, rc, lb, rb) if k_is_lhs else (rc, lc, rb, lb)))


def first_product(x: jax.Array, first: jax.Array, br: Branch) -> jax.Array:
  """``t``: ``x`` contracted with the branch's first factor (rank last), unscaled."""
  f = first.astype(x.dtype)
  return factor_product(x, br.x_lab, f, br.first_lab, br.t_lab, **dict(br.opts))


def lora_dot(
  eqn: Any, kv: LoraValue, x: Any, dot: Dot, ctx: Context, *, first: jax.Array | None = None
) -> list[Any] | None:
  """The rule's result for a kernel `LoraValue`; ``first`` is ``x``'s product with the first
  factor where a caller has computed it already (`jlora._src.interpret.fusion`: no dropout)."""
  br = branch_of(eqn, kv, x, dot)
  if br is None:
    return None

  def branch(x: jax.Array, a: jax.Array, b: jax.Array, t: jax.Array | None = None) -> jax.Array:
    """``scale * ((x @ first) @ second)``, the rank-r product first."""
    f, sec = (a, b) if br.first_is_a else (b, a)
    t = first_product(x, f, br) if t is None else t
    if kv.scale != 1.0:  # alpha == r: no multiply to trace, linearize and lower
      t = t * jnp.asarray(kv.scale, t.dtype)
    sec = sec.astype(t.dtype)
    return factor_product(t, br.t_lab, sec, br.second_lab, br.out_lab, **dict(br.opts))

  base_w = kv.base
  if kv.g is not None:  # DoRA (jlora._src.interpret.rules.dora); never merged
    g_lab = (br.second_lab if br.first_is_a else br.first_lab)[:-1]
    g = dora.on_output(kv.g, g_lab, br.out_lab)
    if g is None:  # the model contracts the scaled axes (a tied head, x @ E.T): scale x instead
      g_in = dora.on_output(kv.g, g_lab, br.x_lab)
      if g_in is None or first is not None:
        return None
      x = x * g_in.astype(x.dtype)
      base = bind_dot(eqn, dot, base_w, x)[0]
      return [PendingSum(base, branch(dropout(x, ctx), kv.a, kv.b).astype(base.dtype))]
    xd = x if first is not None else dropout(x, ctx)

    def product(w, v):  # v["xd"]: the dropped-out input, None without dropout
      base = bind_dot(eqn, dot, w, v["x"])[0]
      lora = branch(v["x"] if v["xd"] is None else v["xd"], v["a"], v["b"], v["t"])
      dropped = None if v["xd"] is None else bind_dot(eqn, dot, w, v["xd"])[0]
      return dora.combine(v["g"], base, lora, dropped)

    v = dict(x=x, xd=None if xd is x else xd, a=kv.a, b=kv.b, g=g, t=first)
    return [dora.product(ctx.dora_recompute, product, base_w, v)]
  if first is None and merged_is_cheaper(kv, x, dot, ctx):
    return [_merged_with_factorized_grad(eqn, dot, kv, branch)(x, base_w, kv.a, kv.b)]
  base = bind_dot(eqn, dot, base_w, x)[0]
  lora = branch(x if first is not None else dropout(x, ctx), kv.a, kv.b, first)
  return [PendingSum(base, lora.astype(base.dtype))]


def _merged_with_factorized_grad(
  eqn: Any, dot: Dot, kv: LoraValue, branch: Callable[..., jax.Array]
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
  """``x @ (W + scale * A @ B)`` forward (fewer FLOPs for many tokens), with the factorized
  gradients: ``grad`` of an already-jitted apply (which chose this path, seeing no autodiff)
  never forms a kernel-sized gradient. The frozen base gets no cotangent."""

  def merged(x, w, a, b):
    return bind_dot(eqn, dot, dataclasses.replace(kv, w=w, a=a, b=b).dense(), x)[0]

  def backward(res, g):
    x, w, a, b = res

    def factorized(x, a, b):
      base = bind_dot(eqn, dot, w, x)[0]
      return base + branch(x, a, b).astype(base.dtype)

    dx, da, db = jax.vjp(factorized, x, a, b)[1](g)
    return dx, None, da, db

  f = jax.custom_vjp(merged)
  f.defvjp(lambda x, w, a, b: (merged(x, w, a, b), (x, w, a, b)), backward)
  return f


def _dot_general(eqn, invals, ctx):
  found = kernel_dot(eqn, invals)
  if found is None:
    return None
  kv, x, dot = found
  if isinstance(kv, Probe):
    return _probe_dot(eqn, kv, x, dot, ctx)
  return lora_dot(eqn, kv, x, dot, ctx)


def _b_branch(y: jax.Array, kv: LoraValue, axis: int) -> jax.Array:
  """``scale * (y @ B)``, where ``y``'s ``axis`` is the rank axis (``y``: input through ``A``)."""
  y = y * jnp.asarray(kv.scale, y.dtype)
  return jnp.moveaxis(jnp.tensordot(y, kv.b.astype(y.dtype), axes=([axis], [1])), -1, axis)


def _plus_b_branch(
  base: jax.Array, y: jax.Array, kv: LoraValue, axis: int, dropped: jax.Array | None = None
) -> jax.Array:
  """``base + scale * (y @ B)`` (its DoRA form where ``kv`` has a scale ``g`` over ``axis``);
  ``dropped``: the base product of the dropped-out input, under dropout with DoRA."""
  lora = _b_branch(y, kv, axis)
  if kv.g is not None:
    return dora.combine(dora.on_axis(kv.g, base.ndim, axis), base, lora, dropped)
  return base + lora.astype(base.dtype)


def _conv(eqn, invals, ctx):
  x, kv = invals
  if is_special(x) or not is_special(kv):
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  o_axis, i_axis, *spatial = dn.rhs_spec
  if isinstance(kv, Probe):
    base = jax_compat.bind(eqn, [x, kv.base])[0]
    roles = {ax: layouts.IN for ax in (i_axis, *spatial)}
    roles[o_axis] = layouts.OUT if p["feature_group_count"] == 1 else layouts.GROUPED
    ctx.record(kv, roles, "conv_general_dilated")
    if any(d != 1 for d in p["rhs_dilation"] or ()):
      ctx.record(kv, roles, layouts.DILATED_CONV)
    return [base]
  if (
    p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or tuple(kv.b_axes) != (o_axis,)
    or set(kv.a_axes) != {i_axis, *spatial}
  ):
    return None
  xd = dropout(x, ctx)

  def product(w, v):  # v["xd"]: the dropped-out input, None without dropout
    x, xd = v["x"], v["xd"]
    base = jax_compat.bind(eqn, [x, w])[0]
    y = jax_compat.bind(eqn, [x if xd is None else xd, v["a"].astype(x.dtype)])[0]
    dropped = None if xd is None or v["g"] is None else jax_compat.bind(eqn, [xd, w])[0]
    return _plus_b_branch(base, y, dataclasses.replace(kv, b=v["b"], g=v["g"]), dn.out_spec[1], dropped)

  v = dict(x=x, xd=None if xd is x else xd, a=kv.factor_in_view("a", o_axis), b=kv.b, g=kv.g)
  return [dora.product(ctx.dora_recompute and kv.g is not None, product, kv.base, v)]


def _gather(eqn, invals, ctx):
  kv, idx = invals
  if is_special(idx) or not is_special(kv):
    return None
  if isinstance(kv, Probe):
    full = _full_axes(eqn, kv)
    roles = {ax: layouts.OUT for ax in full}
    roles.update({ax: layouts.IN for ax in range(len(kv.shape)) if ax not in full})
    ctx.record(kv, roles, "gather")
    return [jax_compat.bind(eqn, [kv.base, idx])[0]]
  if _row_axis(eqn, kv) is None:
    return None

  def product(w, v):  # with dora_recompute, the lookup again in the backward pass, not kept rows
    view = dataclasses.replace(kv, w=w, a=v["a"], b=v["b"], g=v["g"])
    base, y, axis = lookup_rows(eqn, view, v["idx"])
    return _plus_b_branch(base, y, view, axis)

  recompute = ctx.dora_recompute and kv.g is not None
  return [dora.product(recompute, product, kv.w, dict(idx=idx, a=kv.a, b=kv.b, g=kv.g))]


def _full_axes(eqn: Any, kv: Any) -> list[int]:
  """The kernel axes a ``gather`` takes whole (the others it indexes)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  return [ax for ax in range(len(kv.shape)) if ax not in indexed and p["slice_sizes"][ax] == kv.shape[ax]]


def _row_axis(eqn: Any, kv: LoraValue) -> int | None:
  """The one fan-out axis of ``kv`` whose whole rows a ``gather`` takes; ``None`` if there is none."""
  b_only = [ax for ax in kv.b_axes if ax not in kv.a_axes]
  if len(b_only) != 1 or len(kv.b_axes) != 1 or b_only[0] not in _full_axes(eqn, kv):
    return None
  return b_only[0]


def lookup_rows(eqn: Any, kv: LoraValue, idx: jax.Array) -> tuple[jax.Array, jax.Array, int] | None:
  """An embedding lookup of ``kv``: ``(base rows, rows of A, the rank's axis in them)``; ``None``
  where the lookup does not take whole rows of one fan-out axis."""
  dn = eqn.params["dimension_numbers"]
  d = _row_axis(eqn, kv)
  if d is None:
    return None
  sizes = list(eqn.params["slice_sizes"])
  sizes[d] = kv.rank
  base = jax_compat.bind(eqn, [kv.base, idx])[0]
  g = jax_compat.bind(eqn, [kv.factor_in_view("a", d), idx], slice_sizes=tuple(sizes))[0]
  dropped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  kept = [ax for ax in range(len(kv.shape)) if ax not in dropped]
  return base, g, dn.offset_dims[kept.index(d)]


RULES: dict[Any, Callable[..., list[Any] | None]] = {
  P.dot_general_p: _dot_general,
  P.conv_general_dilated_p: _conv,
  P.gather_p: _gather,
}
