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

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from jlora._src.core import jax_compat, layouts
from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.rules.products import PendingSum, dropout
from jlora._src.interpret.values import LoraValue, Probe, is_special


def _find_primitive(jaxpr: Any, name: str) -> jex.Primitive | None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return eqn.primitive
    for sub in jex.jaxprs_in_params(eqn.params):
      found = _find_primitive(sub, name)
      if found is not None:
        return found
  return None


def traced_primitive(name: str, fn: Any, *avals: Any) -> jex.Primitive:
  """The primitive called ``name`` that tracing ``fn(*avals)`` binds (public API only: JAX does not
  export every primitive object, and the interpreter's rules are keyed by them)."""
  found = _find_primitive(jax.make_jaxpr(fn)(*avals).jaxpr, name)
  if found is None:  # pragma: no cover - a JAX that renamed it
    raise ImportError(
      f"jlora: this JAX ({jax.__version__}) binds no `{name}` primitive where jlora expects one; "
      f"jlora supports {jax_compat.SUPPORTED_JAX}."
    )
  return found


_f32, _i32 = jax.ShapeDtypeStruct((2, 2), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
RAGGED_DOT_P = traced_primitive(
  "ragged_dot_general", lax.ragged_dot, _f32, jax.ShapeDtypeStruct((1, 2, 2), jnp.float32), _i32
)


def _form(eqn: Any, invals: list[Any]) -> tuple[Any, Any, Any, int] | None:
  """``(x, kernel, group_sizes, kernel group axis)`` for a handled form, else ``None``."""
  if len(invals) != 3 or eqn.params.get("group_offset") is not None:
    return None
  x, kv, sizes = invals
  if is_special(x) or is_special(sizes) or not is_special(kv):
    return None
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, _), (lb, rb) = rdn.dot_dimension_numbers
  ragged, groups = tuple(rdn.lhs_ragged_dimensions), tuple(rdn.rhs_group_dimensions)
  if lb or rb or len(ragged) != 1 or len(groups) != 1 or ragged[0] in lc:
    return None
  return x, kv, sizes, groups[0]


def _probe(eqn: Any, form: tuple[Any, Probe, Any, int], ctx: Context) -> list[Any]:
  x, kv, sizes, group = form
  (lc, rc), _ = eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers
  roles = {i: layouts.OUT for i in range(len(kv.shape))}
  roles.update({i: layouts.IN for i in rc})
  roles[group] = layouts.STACKED
  ctx.record(kv, roles, "ragged_dot_general")
  out = jax_compat.bind(eqn, [x, kv.base, sizes])[0]
  free = [kv.origin[i] for i in range(len(kv.shape)) if i not in rc and i != group]
  origin = [()] * (x.ndim - len(lc)) + free
  return [Probe(out, tuple(origin), kv.site, output=True)]


def _merged_is_cheaper(kv: LoraValue, x: Any, rc: tuple[int, ...], group: int, ctx: Context) -> bool:
  if not ctx.may_merge():
    return False
  m = math.prod(kv.shape[i] for i in rc)
  n = math.prod(kv.shape) // max(m * kv.shape[group], 1)
  tokens = math.prod(x.shape) // max(m, 1)
  return kv.shape[group] * V.flops_merged(m, n, kv.rank) < V.flops_factorized(tokens, m, n, kv.rank)


def _ragged_dot(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  form = _form(eqn, invals)
  if form is None:
    return None
  x, kv, sizes, group = form
  if isinstance(kv, Probe):
    return _probe(eqn, form, ctx)
  if not isinstance(kv, LoraValue) or kv.g is not None:
    return None  # DoRA experts are materialised
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, rc), _ = rdn.dot_dimension_numbers
  free = [i for i in range(len(kv.shape)) if i not in rc and i != group]
  # Each expert's adapter: the group axis in both factors, fan-in in A only, fan-out in B only.
  if sorted(kv.a_axes) != sorted([group, *rc]) or sorted(kv.b_axes) != sorted([group, *free]):
    return None
  if _merged_is_cheaper(kv, x, tuple(rc), group, ctx):
    return jax_compat.bind(eqn, [x, kv.dense(), sizes])
  opts = dict(precision=eqn.params["precision"], preferred_element_type=eqn.params["preferred_element_type"])
  rank_a, rank_b = len(kv.a_axes), len(kv.b_axes)
  a = jnp.transpose(kv.a, [kv.a_axes.index(group), *(kv.a_axes.index(i) for i in rc), rank_a])
  b = jnp.transpose(kv.b, [kv.b_axes.index(group), rank_b, *(kv.b_axes.index(i) for i in free)])
  base = jax_compat.bind(eqn, [x, kv.base, sizes])[0]
  xd = dropout(x, ctx)
  into_a = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=((tuple(lc), tuple(range(1, 1 + len(rc)))), ((), ())),
    lhs_ragged_dimensions=tuple(rdn.lhs_ragged_dimensions),
    rhs_group_dimensions=(0,),
  )
  t = lax.ragged_dot_general(xd, a.astype(xd.dtype), sizes, into_a, **opts)  # (*x free, r)
  t = t * jnp.asarray(kv.scale, t.dtype)
  row = rdn.lhs_ragged_dimensions[0]
  into_b = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((t.ndim - 1,), (1,)), ((), ())),
    lhs_ragged_dimensions=(row - sum(1 for c in lc if c < row),),
    rhs_group_dimensions=(0,),
  )
  lora = lax.ragged_dot_general(t, b.astype(t.dtype), sizes, into_b, **opts)  # (*x free, *fan-out)
  return [PendingSum(base, lora.astype(base.dtype))]


RULES = {RAGGED_DOT_P: _ragged_dot}
