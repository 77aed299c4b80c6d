"""The jaxpr interpreter behind `jlora.wrap`: factorized LoRA wherever a kernel is used.

The model is traced once to a jaxpr (``jax.make_jaxpr``); the interpreter then
re-evaluates it with each adapted kernel replaced by a `LoraValue`. An equation
with no kernel view among its inputs is bound as it is; any other goes to its
primitive's rule in the rule table (`jlora._src.interpret.table`, which lists
every rule and how rules compose):

* view primitives (reshape, transpose, casts, slices, squeeze) move the adapter
  factors along with the kernel (`jlora._src.interpret.rules.views`);
* the primitives that *use* a kernel compute the LoRA branch factorized:
  ``dot_general``, ``conv_general_dilated`` and ``gather``
  (`jlora._src.interpret.rules.products`), ``ragged_dot`` (`rules.moe`), with
  a bank's kernels routed per example (`rules.routing`);
* control flow and ``shard_map`` bodies are followed (`rules.control`,
  `rules.parallel`).

Any other use materialises ``W + scale * A @ B`` for that use only and warns
once, naming the parameter path (`jlora._src.interpret.materialize`).

Per scope (one `eval_jaxpr` call), sibling fusion computes the shared first
products of kernels that read one input (`jlora._src.interpret.fusion`).

The same walk, run on `Probe` values, reads how a model contracts each kernel
(`infer_layouts`). Primitives are re-bound through `jlora._src.core.jax_compat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jex

from jlora._src.core import jax_compat
from jlora._src.interpret import fusion, table
from jlora._src.interpret.context import Context
from jlora._src.interpret.materialize import MaterializationWarning, materialize, plain_outputs
from jlora._src.interpret.rules import views
from jlora._src.interpret.rules.branch import PendingSum, settle
from jlora._src.interpret.values import Probe, QuantView, is_special

__all__ = ["Context", "MaterializationWarning", "eval_eqn", "eval_jaxpr", "materialize", "plain_outputs"]

P = jex.primitives


def _bias_first(eqn: Any, invals: list[Any]) -> list[Any] | None:
  """``(x @ W + b) + lora`` for an ``add`` of a `PendingSum` and a plain value (a Dense bias): the
  bias joins the base product first; ``None`` for any other equation."""
  pending = [x for x in invals if isinstance(x, PendingSum)]
  if eqn.primitive is not P.add_p or len(pending) != 1 or any(is_special(x) for x in invals):
    return None
  p = pending[0]
  return [jax_compat.bind(eqn, [p.base if x is p else x for x in invals])[0] + p.lora]


def prepare_inputs(primitive: Any, invals: list[Any]) -> list[Any]:
  """An equation's inputs as its rule sees them: pending sums added up, output probes unwrapped
  (but where the primitive is a view an output probe follows, `views.OUTPUT_VIEWS`), quantized
  weights dequantized at their use (but where the primitive keeps them, `table.KEEPS_QUANTIZED`)."""
  invals = [settle(x) for x in invals]
  if primitive not in views.OUTPUT_VIEWS:
    invals = [x.w if isinstance(x, Probe) and x.output else x for x in invals]
  if primitive not in table.KEEPS_QUANTIZED:
    invals = [x.w.dequantize() if isinstance(x, QuantView) else x for x in invals]
  return invals


def eval_eqn(eqn: Any, invals: list[Any], ctx: Context) -> list[Any]:
  """One equation's outputs: bound as it is without kernel views among its (prepared) inputs,
  else by its rule, else on materialised kernels (with `MaterializationWarning`)."""
  outs = _bias_first(eqn, invals)
  if outs is not None:
    return outs
  invals = prepare_inputs(eqn.primitive, invals)
  if not any(is_special(x) for x in invals):
    return jax_compat.bind(eqn, invals)
  rule = RULES.get(eqn.primitive)
  outs = rule(eqn, invals, ctx) if rule is not None else None
  if outs is None:
    why = f"primitive `{eqn.primitive.name}`"
    outs = jax_compat.bind(eqn, [materialize(x, ctx, why) for x in invals])
  return outs


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
  """Evaluates ``jaxpr`` with `LoraValue`/`Probe` inputs, returning outputs as found."""
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  siblings = fusion.Siblings(jaxpr, env, ctx, eval_eqn)
  for i, eqn in enumerate(jaxpr.eqns):
    if siblings.done(i):
      continue
    with jax_compat.source_context(eqn):
      siblings.fuse_at(i)
      outs = eval_eqn(eqn, [read(v) for v in eqn.invars], ctx)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [settle(read(v)) for v in jaxpr.outvars]


RULES = table.build(eval_jaxpr)
"""The interpreter's rule table (`jlora._src.interpret.table.build`), made once with this module's
`eval_jaxpr` for the rules that evaluate bodies."""
