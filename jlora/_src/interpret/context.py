"""The per-call state the interpreter's rules share, and the rules' type (see
`jlora._src.interpret.table`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jlora._src.interpret import values as V


@dataclasses.dataclass
class Context:
  """Per-call state of one interpretation.

  Attributes:
    strategy: ``"auto"`` (merged where cheaper and no gradient or dropout) or
      ``"factorized"``.
    differentiated: whether gradients flow into the adapter in this trace.
    batched: whether the adapter is batched (``vmap`` over adapter trees): a
      merged kernel would be formed per example, so nothing merges.
    dropout_rate: LoRA dropout rate, applied where ``key`` is given.
    key: this scope's dropout key; each LoRA branch folds in a fresh counter.
    warned: kernel paths already warned about (shared across calls).
    roles: probe mode: ``{kernel path: [(primitive, {kernel axis: role})]}``.
    counter: the dropout counter of this scope.
    fuse_siblings: whether kernels that read one input share one first product
      (`jlora._src.interpret.fusion`).
    routing: a bank's per-example adapter ids (`jlora._src.interpret.rules.routing.Routing`);
      ``None`` for a single adapter.
    dora_recompute: whether DoRA products are computed again in the backward
      pass instead of kept (`jlora._src.interpret.rules.dora.product`).
    first_products: sibling fusion's first products ``x @ A``, by the
      ``dot_general`` equation each belongs to: put by
      `jlora._src.interpret.fusion.Siblings`, taken by the rule
      `jlora._src.interpret.fusion.fused` (shared by nested scopes).
  """

  strategy: str
  differentiated: bool
  dropout_rate: float
  key: jax.Array | None
  warned: set[str]
  roles: dict[str, list[tuple[str, dict[int, str]]]] | None = None
  counter: int = 0
  batched: bool = False
  fuse_siblings: bool = True
  routing: Any = None
  dora_recompute: bool = False
  first_products: dict[Any, jax.Array] = dataclasses.field(default_factory=dict)

  def may_merge(self) -> bool:
    """Whether ``strategy="auto"`` may merge a kernel for one use (where that costs fewer FLOPs):
    not when gradients flow into the adapter, dropout is on, or the adapter is batched."""
    return self.strategy == "auto" and not self.differentiated and not self.batched and self.key is None

  def child(self, key: jax.Array | None) -> Context:
    """The context of a nested scope (a loop step, a branch) with its own dropout key."""
    return dataclasses.replace(self, key=key, counter=0)

  def next_key(self) -> jax.Array | None:
    """A fresh dropout key for one LoRA branch (``None`` without dropout)."""
    if self.key is None:
      return None
    self.counter += 1
    return jax.random.fold_in(self.key, self.counter)

  def record(self, probe: V.Probe, view_roles: dict[int, str], op: str) -> None:
    """Probe mode: notes that primitive ``op`` gives the probed view's axes these roles."""
    if self.roles is None:  # pragma: no cover - probes only run with roles
      raise ValueError("A `Probe` reached the interpreter without `roles` to record into.")
    self.roles.setdefault(probe.site, []).append((op, V.axis_roles(probe.origin, view_roles)))


Rule = Callable[[Any, list[Any], Context], "list[Any] | None"]
"""An interpreter rule: ``rule(eqn, invals, ctx)`` gives the equation's outputs, or ``None`` to have
the interpreter materialise the kernel views among ``invals`` for this use."""
