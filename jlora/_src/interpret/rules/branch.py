"""The LoRA branch of a product, in pieces the product rules share (single adapter, DoRA, bank,
experts, sibling fusion).

A product with an adapted kernel is ``x @ W`` (the *base* product) plus the
*branch* ``scale * ((drop(x) @ first) @ second)``: the rank-r product first, with
``first`` the factor that carries the contracted axes (``A`` for ``x @ W``; ``B``
for a tied head ``x @ E.T``). These pieces say how one ``dot_general`` splits so
(`Dot`, `Branch`), compute the branch, draw LoRA dropout, and hold the base
product and the branch apart until the sum's first use (`PendingSum`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.core import jax_compat
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.contractions import factor_product
from jlora._src.interpret.values import LoraValue, is_special


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


def kernel_dot(eqn: Any, invals: Sequence[Any]) -> tuple[Any, Any, Dot] | None:
  """A ``dot_general``'s kernel view, its other operand and its axes; ``None`` unless exactly
  one operand is a kernel view."""
  lhs, rhs = invals
  if is_special(lhs) == is_special(rhs):
    return None
  k_is_lhs = is_special(lhs)
  kernel, x = (lhs, rhs) if k_is_lhs else (rhs, lhs)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return kernel, x, Dot(k_is_lhs, *((lc, rc, lb, rb) if k_is_lhs else (rc, lc, rb, lb)))


def bind_dot(eqn: Any, dot: Dot, kernel: jax.Array, x: Any) -> list[Any]:
  """``eqn`` bound on an array ``kernel`` in the kernel's operand position and ``x`` in the other."""
  return jax_compat.bind(eqn, [kernel, x] if dot.k_is_lhs else [x, kernel])


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


def branch_of(eqn: Any, kernel: LoraValue, x: Any, dot: Dot) -> Branch | None:
  """The factorized branch of ``eqn`` on ``kernel``; ``None`` where the contraction spans both
  factors."""
  nk = len(kernel.shape)
  lab = V.letters(nk + x.ndim + 1)
  k_lab, x_lab, r = lab[:nk], lab[nk : nk + x.ndim], lab[-1]
  for i, j in zip([*dot.kc, *dot.kb], [*dot.xc, *dot.xb]):
    x_lab[j] = k_lab[i]
  out_lab = dot.out_order(k_lab, x_lab)
  a_lab = [k_lab[i] for i in kernel.a_axes] + [r]
  b_lab = [k_lab[i] for i in kernel.b_axes] + [r]
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


@dataclasses.dataclass(frozen=True)
class DotUse:
  """One ``dot_general`` that uses an adapted kernel: the equation, the kernel view, the other
  operand ``x``, the axes of each (`Dot`) and how its branch contracts (`Branch`)."""

  eqn: Any
  kernel: LoraValue
  x: Any
  dot: Dot
  br: Branch

  def base(self, w: jax.Array, x: Any) -> jax.Array:
    """The equation's product of an array ``w`` in the kernel's place with ``x``."""
    return bind_dot(self.eqn, self.dot, w, x)[0]


def first_product(x: jax.Array, first: jax.Array, br: Branch) -> jax.Array:
  """``t``: ``x`` contracted with the branch's first factor (rank last), unscaled."""
  f = first.astype(x.dtype)
  return factor_product(x, br.x_lab, f, br.first_lab, br.t_lab, **dict(br.opts))


def lora_branch(
  br: Branch, scale: float, x: jax.Array, a: jax.Array, b: jax.Array, *, t: jax.Array | None = None
) -> jax.Array:
  """``scale * ((x @ first) @ second)``, the rank-r product first; ``t`` is ``x @ first`` where a
  caller has computed it already (`jlora._src.interpret.fusion`)."""
  f, sec = (a, b) if br.first_is_a else (b, a)
  t = first_product(x, f, br) if t is None else t
  if scale != 1.0:  # alpha == r: no multiply to trace, linearize and lower
    t = t * jnp.asarray(scale, t.dtype)
  sec = sec.astype(t.dtype)
  return factor_product(t, br.t_lab, sec, br.second_lab, br.out_lab, **dict(br.opts))


def merged_is_cheaper(kernel: LoraValue, x: Any, dot: Dot, ctx: Context) -> bool:
  """Whether ``strategy="auto"`` merges this use: allowed here, and fewer FLOPs than the branch."""
  if not ctx.may_merge():
    return False
  m = math.prod(kernel.shape[i] for i in dot.kc)
  n = math.prod(kernel.shape) // max(m, 1)
  tokens = math.prod(x.shape) // max(m, 1)
  return V.flops_merged(m, n, kernel.rank) < V.flops_factorized(tokens, m, n, kernel.rank)


def b_branch(y: jax.Array, b: jax.Array, scale: float, axis: int) -> jax.Array:
  """``scale * (y @ B)``, where ``y``'s ``axis`` is the rank axis (``y``: the input through ``A``,
  by a convolution or a lookup) and ``b`` is ``(fan-out, r)``; the fan-out takes ``axis``."""
  y = y * jnp.asarray(scale, y.dtype)
  return jnp.moveaxis(jnp.tensordot(y, b.astype(y.dtype), axes=([axis], [1])), -1, axis)


# -- embedding lookups (`gather`) ---------------------------------------------------------------


def full_axes(eqn: Any, kernel: Any) -> list[int]:
  """The kernel axes a ``gather`` takes whole (the others it indexes)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  sizes = p["slice_sizes"]
  return [ax for ax in range(len(kernel.shape)) if ax not in indexed and sizes[ax] == kernel.shape[ax]]


def row_axis(eqn: Any, kernel: LoraValue) -> int | None:
  """The one fan-out axis of ``kernel`` whose whole rows a ``gather`` takes; ``None`` if there is
  none."""
  b_only = [ax for ax in kernel.b_axes if ax not in kernel.a_axes]
  if len(b_only) != 1 or len(kernel.b_axes) != 1 or b_only[0] not in full_axes(eqn, kernel):
    return None
  return b_only[0]


def lookup_rows(eqn: Any, kernel: LoraValue, idx: jax.Array) -> tuple[jax.Array, jax.Array, int] | None:
  """An embedding lookup of ``kernel``: ``(base rows, rows of A, the rank's axis in them)``;
  ``None`` where the lookup does not take whole rows of one fan-out axis."""
  dn = eqn.params["dimension_numbers"]
  d = row_axis(eqn, kernel)
  if d is None:
    return None
  sizes = list(eqn.params["slice_sizes"])
  sizes[d] = kernel.rank
  base = jax_compat.bind(eqn, [kernel.base, idx])[0]
  g = jax_compat.bind(eqn, [kernel.factor_in_view("a", d), idx], slice_sizes=tuple(sizes))[0]
  dropped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  kept = [ax for ax in range(len(kernel.shape)) if ax not in dropped]
  return base, g, dn.offset_dims[kept.index(d)]
