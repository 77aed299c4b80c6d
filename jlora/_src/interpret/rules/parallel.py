"""Interpreter rules for ``shard_map``: the body runs with the LoRA branch factorized, per shard.

A ``shard_map`` that takes an adapted kernel is bound again with the adapter
factors as extra operands, each placed as the kernel's ``in_spec`` places the
kernel: a factor axis that is a kernel axis takes that axis's mesh axes and the
rank axis is replicated (for a kernel spec ``P(s_in, s_out)``, ``A`` ``(in, r)``
gets ``P(s_in, None)`` and ``B`` ``(r, out)`` ``P(None, s_out)``, the rule of
`jlora.adapter_specs`). Inside, the interpreter follows the body on the local
kernel shard and its local factors, so a column-parallel layer computes
``x @ W_j + scale * (x @ A) @ B_j`` and a row-parallel one
``x_j @ W_j + scale * (x_j @ A_j) @ B`` before the body's own ``psum``: the
collectives and ``out_specs`` are the model's, unchanged, and no local
``W_j``-sized delta or gradient is formed. In probe mode the body is followed
too, so layouts are read from the uses inside it.

Inside a body, ``pvary`` (an operand made device-varying) applies to the base
kernel only (JAX inserts the factors' own on their first use), and a tiled
``all_gather`` of a kernel (FSDP written by hand) gathers the factors that carry
the gathered axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jlora._src.core import jax_compat
from jlora._src.interpret.context import Context, Rule
from jlora._src.interpret.materialize import plain_outputs
from jlora._src.interpret.primitives import ALL_GATHER_P, PVARY_P, SHARD_MAP_P
from jlora._src.interpret.values import LoraValue, Probe, is_special

__all__ = ["ALL_GATHER_P", "PVARY_P", "SHARD_MAP_P", "all_gather", "factor_specs", "pvary", "shard_map_rule"]


def factor_specs(x: LoraValue, spec: PartitionSpec) -> tuple[PartitionSpec, PartitionSpec]:
  """The specs of ``x``'s factors (rank axis last, replicated) for a kernel view placed by ``spec``."""
  entries = list(spec) + [None] * (len(x.shape) - len(spec))
  return (
    PartitionSpec(*(entries[i] for i in x.a_axes), None),
    PartitionSpec(*(entries[i] for i in x.b_axes), None),
  )


@dataclasses.dataclass(frozen=True)
class _Operand:
  """One operand of the re-bound ``shard_map``: its arrays, their specs, and the body-side value."""

  arrays: tuple[Any, ...]
  specs: tuple[PartitionSpec, ...]
  rebuild: Callable[..., Any]


def _operand(x: Any, spec: PartitionSpec) -> _Operand:
  if isinstance(x, LoraValue):
    a_spec, b_spec = factor_specs(x, spec)
    if x.g is not None:  # DoRA's scale: placed as B without its rank axis

      def rebuild_dora(w, a, b, g):
        return dataclasses.replace(x, w=w, a=a, b=b, g=g)

      return _Operand(
        (x.base, x.a, x.b, x.g), (spec, a_spec, b_spec, PartitionSpec(*b_spec[:-1])), rebuild_dora
      )

    def rebuild(w, a, b):
      return dataclasses.replace(x, w=w, a=a, b=b)

    return _Operand((x.base, x.a, x.b), (spec, a_spec, b_spec), rebuild)
  if isinstance(x, Probe):
    return _Operand((x.w,), (spec,), lambda w: dataclasses.replace(x, w=w))
  return _Operand((x,), (spec,), lambda v: v)


def shard_map_rule(eval_jaxpr: Callable[..., list[Any]]) -> Rule:
  """The ``shard_map`` rule, given the interpreter's ``eval_jaxpr`` (for the body)."""

  def rule(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
    if not all(isinstance(x, (LoraValue, Probe)) or not is_special(x) for x in invals):
      return None
    p = eqn.params
    body_jaxpr = p["jaxpr"]
    consts = getattr(body_jaxpr, "consts", ())
    body_jaxpr = getattr(body_jaxpr, "jaxpr", body_jaxpr)
    ops = [_operand(x, s) for x, s in zip(invals, p["in_specs"])]
    key = ctx.next_key()
    arrays = [a for op in ops for a in op.arrays]
    specs = [s for op in ops for s in op.specs]

    def body(*flat: Any) -> tuple[Any, ...]:
      *flat, k = flat
      vals, i = [], 0
      for op in ops:
        vals.append(op.rebuild(*flat[i : i + len(op.arrays)]))
        i += len(op.arrays)
      outs = eval_jaxpr(body_jaxpr, consts, vals, ctx.child(k))
      return tuple(plain_outputs(outs, ctx, "a `shard_map` output"))

    fn = jax.shard_map(
      body,
      mesh=p["mesh"],
      in_specs=(*specs, PartitionSpec()),
      out_specs=tuple(p["out_specs"]),
      axis_names=set(jax_compat.shard_map_manual_axes(p)),
      check_vma=p["check_vma"],
    )
    return list(fn(*arrays, key))

  return rule


def pvary(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """``pvary`` of a kernel view: the base kernel made device-varying (the factors are on first use)."""
  if len(invals) != 1 or not isinstance(invals[0], (LoraValue, Probe)):
    return None
  x = invals[0]
  return [dataclasses.replace(x, w=jax_compat.bind(eqn, [x.base])[0])]


def all_gather(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
  """A tiled ``all_gather`` of a kernel view: the base and each factor carrying the gathered axis."""
  if len(invals) != 1 or not isinstance(invals[0], (LoraValue, Probe)) or not eqn.params["tiled"]:
    return None
  x = invals[0]
  w = jax_compat.bind(eqn, [x.base])[0]
  if isinstance(x, Probe):
    return [dataclasses.replace(x, w=w)]
  axis = eqn.params["all_gather_dimension"]
  out = x.map_axis(axis, lambda f, d: jax_compat.bind(eqn, [f], all_gather_dimension=d)[0])
  return [dataclasses.replace(out, w=w)]
