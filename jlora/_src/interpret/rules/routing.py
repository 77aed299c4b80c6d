"""Interpreter rules for a bank (`jlora.stack`): each example's LoRA branch with its own adapter.

A bank's kernel is a `LoraValue` whose ``routed`` holds the adapters' scales
there; its factors hold the N adapters side by side on the rank axis
(adapter-major, ``N * r``), so every view rule (reshape, transpose, slice,
``scan`` over stacked layers, casts) moves them unchanged. At a product the
rank axis is unfolded to ``(N, r)`` and example ``e`` (the leading axis of the
kernel's other operand, ``adapter_ids[e]`` its adapter) gets

  ``x_e @ W + scale[id] * ((drop(x_e) @ A[id]) @ B[id])``

computed factorized in one of two ways (never a per-example or per-adapter
merged kernel):

* ``"gather"`` (BGMV): the factors of each example's adapter are gathered,
  ``(batch, ..., r)``, and contracted with the example axis as a batch axis;
* ``"ragged"`` (SGMV, Punica): the examples sorted by adapter, then two
  ``lax.ragged_dot_general`` over the adapters' groups. It covers products
  whose contracted factor holds only the contracted axes and whose other
  factor only output axes (every Dense and DenseGeneral); other products (a
  stacked axis kept in the output, an embedding lookup) use the gather.

In the rule table (`jlora._src.interpret.table`) `routed` puts these rules
around the single-adapter ones: an equation with a bank's kernel goes to
`dot_general` or `gather` here, or is refused with `unroutable` (`refuse`: a
convolution, expert kernels); any other to the single-adapter rule.

Id ``-1`` gives the base model alone (a zero branch). An id out of
``[-1, N)`` that only shows up at run time (under ``jit``) makes that
example's outputs NaN: never a silently clipped adapter (concrete ids are
checked in `routing` and raise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora._src.interpret.context import Context, Rule
from jlora._src.interpret.contractions import contract
from jlora._src.interpret.rules.branch import Branch, PendingSum, bind_dot, branch_of, kernel_dot, lookup_rows
from jlora._src.interpret.values import LoraValue

DESIGNS = ("gather", "ragged")


@dataclasses.dataclass(frozen=True)
class Routing:
  """The adapter of each example in one call.

  Attributes:
    ids: ``(batch,)`` integer adapter ids, ``-1`` for the base model alone.
    num_adapters: N, the bank's size.
    design: ``"gather"`` or ``"ragged"`` (see the module doc).
    dropout: each adapter's ``lora_dropout`` rate.
  """

  ids: jax.Array
  num_adapters: int
  design: str
  dropout: tuple[float, ...]

  @property
  def batch(self) -> int:
    return int(self.ids.shape[0])

  def slots(self) -> jax.Array:
    """Each example's adapter, with ``N`` (no adapter) for ``-1`` and for ids out of range."""
    n = self.num_adapters
    return jnp.where((self.ids >= 0) & (self.ids < n), self.ids, n)

  def per_example(self, table: tuple[float, ...], dtype: Any) -> jax.Array:
    """``table[id]`` per example: ``0`` for ``-1``, NaN for an id out of range."""
    ids = self.ids
    values = jnp.asarray((*table, 0.0), dtype)[self.slots()]
    return jnp.where((ids < -1) | (ids >= self.num_adapters), jnp.asarray(jnp.nan, dtype), values)


def routing(num_adapters: int, adapter_ids: Any, design: str, dropout: tuple[float, ...]) -> Routing:
  """Checks ``adapter_ids`` for a bank of ``num_adapters`` and returns the call's `Routing`.

  Raises:
    ValueError: for no ids, ids that are not one per example (a 1-D array),
      or concrete ids out of ``[-1, num_adapters)``.
    TypeError: for ids that are not integers.
  """
  if adapter_ids is None:
    raise ValueError(
      "A bank's apply needs `adapter_ids=`: one adapter index per example (the leading batch axis), "
      f"in [0, {num_adapters}), or -1 for the base model alone."
    )
  if not hasattr(adapter_ids, "dtype"):
    adapter_ids = np.asarray(adapter_ids)
  if not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
    raise TypeError(f"`adapter_ids` must be integers; got dtype {adapter_ids.dtype}.")
  if adapter_ids.ndim != 1:
    raise ValueError(
      f"`adapter_ids` must be 1-D, one id per example along the leading batch axis; got shape "
      f"{tuple(adapter_ids.shape)}."
    )
  if not isinstance(adapter_ids, jax.core.Tracer):
    concrete = np.asarray(adapter_ids)
    bad = np.flatnonzero((concrete < -1) | (concrete >= num_adapters))
    if bad.size:
      raise ValueError(
        f"`adapter_ids` {concrete[bad].tolist()} (at examples {bad.tolist()}) are out of range for a bank "
        f"of {num_adapters} adapters: ids are in [0, {num_adapters}), or -1 for the base model alone."
      )
  return Routing(_as_int32(adapter_ids, num_adapters), num_adapters, design, dropout)


def _as_int32(ids: Any, num_adapters: int) -> jax.Array:
  """``ids`` as int32, with every id out of ``[-1, num_adapters)`` (in its own dtype) as ``-2``.

  The range is checked before the cast, in the ids' dtype, so that no id wraps into range: a uint32
  ``2**32 - 1`` is not ``-1`` and an int64 ``2**32 + 1`` is not ``1``. ``-2`` is out of range for every
  bank, so `Routing` gives that example no adapter and a NaN scale.
  """
  ids = jnp.asarray(ids)
  info = jnp.iinfo(ids.dtype)
  valid = jnp.ones(ids.shape, bool)
  if info.min < -1:
    valid = valid & (ids >= jnp.asarray(-1, ids.dtype))
  if num_adapters <= info.max:
    valid = valid & (ids < jnp.asarray(num_adapters, ids.dtype))
  return jnp.where(valid, ids.astype(jnp.int32), jnp.int32(-2))


def is_routed(x: Any) -> bool:
  """Whether ``x`` is a bank's kernel view."""
  return isinstance(x, LoraValue) and x.routed is not None


def unroutable(kernel: LoraValue, why: str) -> ValueError:
  """The error for a bank's kernel reaching a use that cannot be routed per example."""
  return ValueError(
    f"jlora: the bank's kernel {kernel.site!r} reaches {why}, which cannot be routed per example (jlora "
    "never forms a per-example kernel). Routing covers dot_general (Dense, DenseGeneral, einsum) and "
    "embedding lookups, through views, jit, remat and scan; leave this kernel out of the adapters' "
    "target_modules."
  )


def _check_examples(kernel: LoraValue, shape: tuple[int, ...], free: bool, route: Routing, use: str) -> None:
  """The rule: the leading axis of a bank kernel's other operand is the example axis."""
  if free and shape and shape[0] == route.batch:
    return
  raise ValueError(
    f"jlora: the bank's kernel {kernel.site!r} is used in a {use} whose input has shape {shape}, but routing "
    f"needs the input's leading axis to be the example axis (size len(adapter_ids) = {route.batch}), not "
    "contracted or shared with the kernel. A model that flattens the batch and sequence axes, or sorts "
    "tokens (mixture-of-experts dispatch), cannot be routed per example: keep the batch axis leading at "
    "every adapted kernel."
  )


def _unfold(factor: jax.Array, n: int) -> jax.Array:
  """``(..., N * r)`` to ``(N, ..., r)``: the adapters' factors apart."""
  f = factor.reshape(*factor.shape[:-1], n, factor.shape[-1] // n)
  return jnp.moveaxis(f, -2, 0)


def _per_adapter(factor: jax.Array, route: Routing) -> jax.Array:
  """``(batch, ..., r)``: each example's adapter's factor (zeros for ``-1`` and ids out of range)."""
  return jnp.take(_unfold(factor, route.num_adapters), route.slots(), axis=0, mode="fill", fill_value=0)


def _along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
  """A per-example vector shaped to broadcast along ``axis`` of an ``ndim``-D array."""
  return v.reshape([-1 if i == axis else 1 for i in range(ndim)])


def dropout(x: jax.Array, ctx: Context, route: Routing) -> jax.Array:
  """LoRA dropout on the branch input, each example at its adapter's rate (as the single-adapter path
  does, with this scope's next key; none without one)."""
  key = ctx.next_key()
  if key is None:
    return x
  keep = _along(1.0 - route.per_example(route.dropout, x.dtype), x.ndim, 0)
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def _gather_branch(
  x: jax.Array, f: jax.Array, sec: jax.Array, plan: Branch, *, scale: jax.Array, route: Routing, opts: dict
) -> jax.Array:
  """BGMV: ``scale_e * ((x_e @ f[id_e]) @ sec[id_e])`` with the example axis as a batch axis."""
  e = plan.x_lab[0]
  t = contract(x, plan.x_lab, _per_adapter(f, route).astype(x.dtype), e + plan.first_lab, plan.t_lab, **opts)
  t = t * _along(scale.astype(t.dtype), t.ndim, plan.t_lab.index(e))
  return contract(
    t, plan.t_lab, _per_adapter(sec, route).astype(t.dtype), e + plan.second_lab, plan.out_lab, **opts
  )


def _ragged_fits(plan: Branch) -> bool:
  contracted = set(plan.first_lab[:-1])
  return contracted <= set(plan.x_lab) and not set(plan.second_lab[:-1]) & set(plan.x_lab)


def _ragged_branch(
  x: jax.Array, f: jax.Array, sec: jax.Array, plan: Branch, *, scale: jax.Array, route: Routing, opts: dict
) -> jax.Array:
  """SGMV: examples sorted by adapter, ``ragged(ragged(x, f), sec)`` over the adapters' groups; the
  examples of id ``-1`` (and out of range) sort past the groups, where ragged products give zeros."""
  n = route.num_adapters
  slots = route.slots()
  order = jnp.argsort(slots, stable=True)
  sizes = jnp.bincount(slots, length=n + 1)[:n].astype(jnp.int32)
  xs = jnp.take(x, order, axis=0)
  first = _unfold(f, n).astype(x.dtype)  # (N, *contracted, r)
  x_contracted = tuple(plan.x_lab.index(c) for c in plan.first_lab[:-1])
  into_first = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=((x_contracted, tuple(range(1, len(plan.first_lab)))), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
  )
  t = lax.ragged_dot_general(xs, first, sizes, into_first, **opts)  # (*x free, r)
  second = jnp.moveaxis(_unfold(sec, n), -1, 1).astype(t.dtype)  # (N, r, *out)
  into_second = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((t.ndim - 1,), (1,)), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
  )
  y = lax.ragged_dot_general(t, second, sizes, into_second, **opts)
  y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)  # back to the examples' order
  y_lab = [c for c in plan.x_lab if c not in plan.first_lab] + list(plan.second_lab[:-1])
  y = jnp.transpose(y, [y_lab.index(c) for c in plan.out_lab])
  return y * _along(scale.astype(y.dtype), y.ndim, plan.out_lab.index(plan.x_lab[0]))


def routed(bank_rule: Rule, single: Rule) -> Rule:
  """The rule that gives an equation with a bank's kernel among its operands (`is_routed`) to
  ``bank_rule``, and any other to ``single`` (the single-adapter rule)."""

  def rule(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
    if any(is_routed(x) for x in invals):
      return bank_rule(eqn, invals, ctx)
    return single(eqn, invals, ctx)

  return rule


def refuse(use: str) -> Rule:
  """A bank rule for a ``use`` that cannot be routed per example: it raises `unroutable`."""

  def rule(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
    raise unroutable(next(x for x in invals if is_routed(x)), use)

  return rule


def dot_general(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """A ``dot_general`` with a bank's kernel: each example's branch with its own adapter, by
  ``"gather"`` or ``"ragged"`` (see the module doc); ``None`` where both operands are kernel views.

  Raises:
    ValueError: where the product contracts axes of both factors, or the input's leading axis is
      not the example axis.
  """
  found = kernel_dot(eqn, invals)
  if found is None:
    return None
  kernel, x, dot = found
  route: Routing = ctx.routing
  plan = branch_of(eqn, kernel, x, dot)
  if plan is None:
    raise unroutable(kernel, "a `dot_general` that contracts axes of both of its factors")
  e = plan.x_lab[0]
  _check_examples(
    kernel, tuple(x.shape), e in plan.out_lab and e not in plan.first_lab + plan.second_lab, route, "product"
  )
  opts = dict(plan.opts)
  base = bind_dot(eqn, dot, kernel.base, x)[0]
  xd = dropout(x, ctx, route)
  f, sec = (kernel.a, kernel.b) if plan.first_is_a else (kernel.b, kernel.a)
  scale = route.per_example(kernel.routed, jnp.float32)
  fn = _ragged_branch if route.design == "ragged" and _ragged_fits(plan) else _gather_branch
  return [PendingSum(base, fn(xd, f, sec, plan, scale=scale, route=route, opts=opts).astype(base.dtype))]


def gather(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """An embedding lookup of a bank's kernel: each example's rows of its own adapter's ``A``, then
  ``@ B``.

  Raises:
    ValueError: where the lookup does not take whole rows, or its leading axis is not the example
      axis.
  """
  kernel, idx = invals
  if not is_routed(kernel):
    return None
  rows = lookup_rows(eqn, kernel, idx)
  if rows is None:
    raise unroutable(kernel, "a `gather` that is not an embedding lookup of whole rows")
  base, g, axis = rows
  route: Routing = ctx.routing
  _check_examples(kernel, tuple(base.shape), axis != 0, route, "lookup")
  n = route.num_adapters
  # Each example's own adapter's rows of A: (batch, ..., r), the rank last.
  g = jnp.moveaxis(g, axis, -1)
  g = g.reshape(*g.shape[:-1], n, g.shape[-1] // n)
  pick = jnp.minimum(route.slots(), n - 1)  # -1 and bad ids: zero or NaN scale below
  g = jnp.take_along_axis(g, pick.reshape((-1,) + (1,) * (g.ndim - 1)), axis=-2)[..., 0, :]
  g = g * _along(route.per_example(kernel.routed, g.dtype), g.ndim, 0)
  b = _per_adapter(kernel.b, route).astype(g.dtype)  # (batch, fan-out, r)
  lab = "".join(chr(ord("a") + i) for i in range(g.ndim - 1))
  lora = contract(g, lab + "z", b, "aYz", lab + "Y")
  return [base + jnp.moveaxis(lora, -1, axis).astype(base.dtype)]
