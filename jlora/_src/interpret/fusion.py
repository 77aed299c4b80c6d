"""Sibling fusion: the LoRA branches of kernels that read one input share their first product.

q/k/v projections, gate/up projections, or any ``dot_general`` equations whose
non-kernel operand is one jaxpr variable, each compute ``x @ A_i`` first. Where
those contractions agree on ``x`` (same axes contracted and batched, same
factor shapes but for the rank), the interpreter computes them as one product
``x @ concat(A_1, ..., A_n)`` along the rank axis and hands each sibling its
slice: one ``dot`` instead of ``n`` forward, and (by autodiff of the
concatenation) one ``dot`` for all the ``A`` gradients. The second product,
``t_i @ B_i``, stays per sibling. The result is the unfused one up to float
rounding (a column of a wider product may be summed in another order).

Fusion is skipped where it would change what is computed or recorded: with
LoRA dropout (each branch draws its own mask, so the inputs differ), on probes
(layout reading), and for a use ``strategy="auto"`` merges. A sibling whose
kernel view is formed between the first sibling and itself (a ``reshape`` or
cast of the kernel) has that view computed early: view primitives are pure.

Two parts: `Siblings`, the pass of one `eval_jaxpr` scope that computes the
fused first products where the first sibling is reached (into the context's
``first_products``), and `fused`, which wraps the ``dot_general`` rule in the
rule table (`jlora._src.interpret.table`) to hand each sibling its product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from jlora._src.core import jax_compat
from jlora._src.interpret.context import Context, Rule
from jlora._src.interpret.rules import views
from jlora._src.interpret.rules.branch import (
  Branch,
  branch_of,
  first_product,
  kernel_dot,
  merged_is_cheaper,
  settle,
)
from jlora._src.interpret.values import LoraValue, is_special

__all__ = ["Siblings", "fused"]

P = jex.primitives

_MAX_VIEW_CHAIN = 8  # view equations computed early for one sibling's kernel, at most


@dataclasses.dataclass(frozen=True)
class _Member:
  index: int  # the equation's index in the jaxpr
  operand: int  # which operand of the equation is the shared input


def _candidates(jaxpr: Any) -> dict[int, list[list[_Member]]]:
  """``dot_general`` equations sharing an operand variable, keyed by the first one's index."""
  by_var: dict[Any, list[_Member]] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive is P.dot_general_p:
      for pos, v in enumerate(eqn.invars):
        if not isinstance(v, jex.Literal):
          by_var.setdefault(v, []).append(_Member(i, pos))
  groups: dict[int, list[list[_Member]]] = {}
  for members in by_var.values():
    if len(members) > 1:
      groups.setdefault(members[0].index, []).append(members)
  return groups


def _signature(br: Branch, first: jax.Array, operand: int) -> tuple[Any, ...]:
  """What must agree for two first products to be one: the labels up to renaming, the factor's
  shape but for the rank, its dtype, the dot's options and the input's operand position."""
  names: dict[str, int] = {}
  for c in br.x_lab + br.first_lab + br.t_lab:
    names.setdefault(c, len(names))
  canon = tuple(tuple(names[c] for c in lab) for lab in (br.x_lab, br.first_lab, br.t_lab))
  return (canon, first.shape[:-1], first.dtype, br.opts, operand)


def fused(rule: Rule) -> Rule:
  """The ``dot_general`` rule ``rule`` (which takes a fourth argument, ``first``), given the
  equation's first product where `Siblings` computed it with its siblings'."""

  def fused_rule(eqn: Any, invals: list[Any], ctx: Context) -> list[Any] | None:
    return rule(eqn, invals, ctx, ctx.first_products.pop(eqn, None))

  return fused_rule


class Siblings:
  """The fusion pass of one `eval_jaxpr` call.

  Args:
    jaxpr: the jaxpr being evaluated.
    env: the evaluation's environment (variable -> value); kernel views computed early go in it.
    ctx: the interpretation's context (fusion is off with dropout, probes or ``fuse_siblings=False``).
    eval_eqn: the interpreter's ``eval_eqn(eqn, invals, ctx) -> outs``.
  """

  def __init__(
    self,
    jaxpr: Any,
    env: dict[Any, Any],
    ctx: Context,
    eval_eqn: Callable[[Any, list[Any], Context], list[Any]],
  ):
    self._on = ctx.fuse_siblings and ctx.key is None and ctx.roles is None
    self._groups = _candidates(jaxpr) if self._on else {}
    self._jaxpr, self._env, self._ctx, self._eval_eqn = jaxpr, env, ctx, eval_eqn
    self._producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars} if self._groups else {}
    self._early: set[int] = set()

  def done(self, i: int) -> bool:
    """Whether equation ``i`` was evaluated early (a sibling's kernel view)."""
    return i in self._early

  def fuse_at(self, i: int) -> None:
    """Where equation ``i`` is the first of a group of siblings, their fused first products, into
    the context's ``first_products`` (each sibling's rule takes its own, `fused`)."""
    for group in self._groups.pop(i, ()):
      self._fuse(group)

  def _fuse(self, group: list[_Member]) -> None:
    shared = self._jaxpr.eqns[group[0].index].invars[group[0].operand]
    x = settle(self._env[shared])
    if is_special(x):
      return
    by_sig: dict[tuple[Any, ...], list[tuple[int, Branch, jax.Array]]] = {}
    for m in group:
      found = self._sibling(m, x)
      if found is not None:
        br, first = found
        by_sig.setdefault(_signature(br, first, m.operand), []).append((m.index, br, first))
    for members in by_sig.values():
      if len(members) > 1:
        self._first_products(x, members)

  def _sibling(self, m: _Member, x: Any) -> tuple[Branch, jax.Array] | None:
    """The branch and first factor of member ``m`` if its kernel is a factorized `LoraValue`."""
    eqn = self._jaxpr.eqns[m.index]
    kernel_var = eqn.invars[1 - m.operand]
    if isinstance(kernel_var, jex.Literal) or not self._ready(kernel_var, _MAX_VIEW_CHAIN):
      return None
    kernel = self._env[kernel_var]
    if not isinstance(kernel, LoraValue) or kernel.routed is not None:  # a bank's: routed per example
      return None
    invals = [x, kernel] if m.operand == 0 else [kernel, x]
    _, _, dot = kernel_dot(eqn, invals)
    if merged_is_cheaper(kernel, x, dot, self._ctx):
      return None
    br = branch_of(eqn, kernel, x, dot)
    if br is None:
      return None
    return br, kernel.a if br.first_is_a else kernel.b

  def _ready(self, v: Any, budget: int) -> bool:
    """Whether ``v`` has a value, computing its producing view equations early if need be."""
    if v in self._env:
      return True
    i = self._producer.get(v)
    if i is None or budget == 0:
      return False
    eqn = self._jaxpr.eqns[i]
    if eqn.primitive not in views.PRIMITIVES:
      return False
    if not all(isinstance(u, jex.Literal) or self._ready(u, budget - 1) for u in eqn.invars):
      return False
    read = lambda u: u.val if isinstance(u, jex.Literal) else self._env[u]  # noqa: E731
    with jax_compat.source_context(eqn):
      outs = self._eval_eqn(eqn, [read(u) for u in eqn.invars], self._ctx)
    for out, val in zip(eqn.outvars, outs):
      if not isinstance(out, jex.DropVar):
        self._env[out] = val
    self._early.add(i)
    return True

  def _first_products(self, x: jax.Array, members: list[tuple[int, Branch, jax.Array]]) -> None:
    """One ``x @ concat(first factors)``, split per sibling."""
    _, br, _ = members[0]
    factors = [f.astype(x.dtype) for _, _, f in members]
    t = first_product(x, jnp.concatenate(factors, axis=-1), br)
    axis = br.t_lab.index(br.first_lab[-1])
    # `lax.split`, not slices: its transpose is one concatenate of the siblings' cotangents, where
    # a slice's is a zero pad per sibling and their sum.
    parts = jax.lax.split(t, [f.shape[-1] for f in factors], axis=axis)
    for (i, _, _), part in zip(members, parts):
      self._ctx.first_products[self._jaxpr.eqns[i]] = part
