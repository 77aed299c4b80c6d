"""Interpreter rule for mixture-of-experts kernels: ``ragged_dot`` with the LoRA branch factorized.

An expert kernel ``W`` of shape ``(E, D, F)`` (E experts stacked, D fan-in, F
fan-out) is used as ``lax.ragged_dot(x, W, group_sizes)``: rows of ``x``
``(m, D)``, sorted by expert, are multiplied by their group's kernel. Each
expert has its own adapter, ``A`` ``(E, D, r)`` and ``B`` ``(E, r, F)``, and the
branch is two grouped products over the same groups,

  ``ragged_dot(x, W, g) + scale * ragged_dot(ragged_dot(drop(x), A, g), B, g)``,

so neither the forward nor the backward pass forms an ``(E, D, F)`` delta or
gradient (JAX's transpose of ``ragged_dot`` gives per-group ``(E, D, r)`` and
``(E, r, F)`` gradients). On a `Probe` the rule records the group axis as
stacked, the contracted axes as fan-in and the rest as fan-out.

The forms handled are those of ``lax.ragged_dot`` and of MoE code written with
``lax.ragged_dot_general`` (MaxText, tunix): the kernel is the right operand
with one group axis, the input is ragged on one of its free (row) axes, no
batch axes and no ``group_offset``. Any other form returns ``None`` and the
interpreter materialises the kernel for that use, with its warning.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from jax import lax

from jlora._src.core import jax_compat, layouts
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.primitives import RAGGED_DOT_P
from jlora._src.interpret.rules.branch import PendingSum, dropout
from jlora._src.interpret.values import LoraValue, Probe, is_special

__all__ = ["RAGGED_DOT_P", "ragged_dot"]


def _form(eqn: Any, invals: list[Any]) -> tuple[Any, Any, Any, int] | None:
  """``(x, kernel, group_sizes, kernel group axis)`` for a handled form, else ``None``."""
  if len(invals) != 3 or eqn.params.get("group_offset") is not None:
    return None
  x, kernel, sizes = invals
  if is_special(x) or is_special(sizes) or not is_special(kernel):
    return None
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, _), (lb, rb) = rdn.dot_dimension_numbers
  ragged, groups = tuple(rdn.lhs_ragged_dimensions), tuple(rdn.rhs_group_dimensions)
  if lb or rb or len(ragged) != 1 or len(groups) != 1 or ragged[0] in lc:
    return None
  return x, kernel, sizes, groups[0]


def _probe(eqn: Any, form: tuple[Any, Probe, Any, int], ctx: Context) -> list[Any]:
  x, kernel, sizes, group = form
  (lc, rc), _ = eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers
  roles = {i: layouts.OUT for i in range(len(kernel.shape))}
  roles.update({i: layouts.IN for i in rc})
  roles[group] = layouts.STACKED
  ctx.record(kernel, roles, "ragged_dot_general")
  out = jax_compat.bind(eqn, [x, kernel.base, sizes])[0]
  free = [kernel.origin[i] for i in range(len(kernel.shape)) if i not in rc and i != group]
  origin = [()] * (x.ndim - len(lc)) + free
  return [Probe(out, tuple(origin), kernel.site, output=True)]


def _merged_is_cheaper(kernel: LoraValue, x: Any, rc: tuple[int, ...], group: int, ctx: Context) -> bool:
  if not ctx.may_merge():
    return False
  m = math.prod(kernel.shape[i] for i in rc)
  n = math.prod(kernel.shape) // max(m * kernel.shape[group], 1)
  tokens = math.prod(x.shape) // max(m, 1)
  merged = kernel.shape[group] * V.flops_merged(m, n, kernel.rank)
  return merged < V.flops_factorized(tokens, m, n, kernel.rank)


def ragged_dot(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """The ``ragged_dot_general`` rule (module doc): each expert's branch as two grouped products;
  ``None`` for other forms and DoRA experts (materialised)."""
  form = _form(eqn, invals)
  if form is None:
    return None
  x, kernel, sizes, group = form
  if isinstance(kernel, Probe):
    return _probe(eqn, form, ctx)
  if not isinstance(kernel, LoraValue) or kernel.g is not None:
    return None  # DoRA experts are materialised
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, rc), _ = rdn.dot_dimension_numbers
  free = [i for i in range(len(kernel.shape)) if i not in rc and i != group]
  # Each expert's adapter: the group axis in both factors, fan-in in A only, fan-out in B only.
  if sorted(kernel.a_axes) != sorted([group, *rc]) or sorted(kernel.b_axes) != sorted([group, *free]):
    return None
  if _merged_is_cheaper(kernel, x, tuple(rc), group, ctx):
    return jax_compat.bind(eqn, [x, kernel.dense(), sizes])
  opts = dict(precision=eqn.params["precision"], preferred_element_type=eqn.params["preferred_element_type"])
  rank_a, rank_b = len(kernel.a_axes), len(kernel.b_axes)
  a = jnp.transpose(kernel.a, [kernel.a_axes.index(group), *(kernel.a_axes.index(i) for i in rc), rank_a])
  b = jnp.transpose(kernel.b, [kernel.b_axes.index(group), rank_b, *(kernel.b_axes.index(i) for i in free)])
  base = jax_compat.bind(eqn, [x, kernel.base, sizes])[0]
  xd = dropout(x, ctx)
  into_a = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=((tuple(lc), tuple(range(1, 1 + len(rc)))), ((), ())),
    lhs_ragged_dimensions=tuple(rdn.lhs_ragged_dimensions),
    rhs_group_dimensions=(0,),
  )
  t = lax.ragged_dot_general(xd, a.astype(xd.dtype), sizes, into_a, **opts)  # (*x free, r)
  t = t * jnp.asarray(kernel.scale, t.dtype)
  row = rdn.lhs_ragged_dimensions[0]
  into_b = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((t.ndim - 1,), (1,)), ((), ())),
    lhs_ragged_dimensions=(row - sum(1 for c in lc if c < row),),
    rhs_group_dimensions=(0,),
  )
  lora = lax.ragged_dot_general(t, b.astype(t.dtype), sizes, into_b, **opts)  # (*x free, *fan-out)
  return [PendingSum(base, lora.astype(base.dtype))]
