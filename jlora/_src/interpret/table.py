"""The interpreter's rule table: one rule per primitive, each composition written where it is made.

A rule is ``rule(eqn, invals, ctx)`` (`jlora._src.interpret.context.Rule`) and
runs only for an equation that has a kernel view among its inputs (a plain
equation is bound as it is); it returns the outputs, or ``None`` to have the
interpreter materialise the kernel for that use (`jlora._src.interpret.materialize`).
`build` is the whole table; the primitives not in it materialise.

Compositions, outermost first:

* ``routing.routed(bank_rule, single)``: an equation with a bank's kernel
  (`jlora.stack`) goes to the bank's per-example rule (or is refused with
  ``routing.refuse``), any other to the single-adapter rule;
* ``fusion.fused(rule)``: a ``dot_general`` whose first product sibling fusion
  computed with its siblings' (`jlora._src.interpret.fusion.Siblings`, run by
  the evaluator per scope) gets it;
* inside the single-adapter product rules (`jlora._src.interpret.rules.products`),
  the named products in order: probe, DoRA (`jlora._src.interpret.rules.dora`),
  merged, factorized with LoRA dropout.

Before any rule, the evaluator prepares an equation's inputs
(`jlora._src.interpret.evaluator.eval_eqn`): a pending product is summed (a bias
joins its base product first), an output probe is unwrapped unless the
primitive is one of `jlora._src.interpret.rules.views.OUTPUT_VIEWS`, and a
quantized base is dequantized unless the primitive is in `KEEPS_QUANTIZED`.

To add a rule: write it in the module of its concept under ``rules/`` and add
its entry here, composed as its neighbours are.
"""

from __future__ import annotations

from typing import Any

from jax.extend import core as jex

from jlora._src.interpret import fusion
from jlora._src.interpret.context import Rule
from jlora._src.interpret.primitives import ALL_GATHER_P, PVARY_P, RAGGED_DOT_P, SHARD_MAP_P, UNSTACK_P
from jlora._src.interpret.rules import control, moe, parallel, products, routing, views

__all__ = ["KEEPS_QUANTIZED", "build"]

P = jex.primitives

# Primitives that take a quantized weight as it is (a scan slices it per step; the others pass it
# into their bodies); every other primitive gets it dequantized.
KEEPS_QUANTIZED = frozenset(
  {P.scan_p, P.jit_p, P.closed_call_p, P.remat_p, P.custom_jvp_call_p, P.custom_vjp_call_p}
)


def build(eval_jaxpr: control.EvalJaxpr) -> dict[Any, Rule]:
  """The rule of each primitive, given the interpreter's ``eval_jaxpr`` (for bodies)."""
  table = {
    # Views: the adapter factors follow the kernel (rules/views.py).
    P.transpose_p: views.transpose,
    P.reshape_p: views.reshape,
    P.squeeze_p: views.squeeze,
    P.broadcast_in_dim_p: views.broadcast_in_dim,
    P.convert_element_type_p: views.convert_element_type,
    P.copy_p: views.copy,
    P.sharding_constraint_p: views.sharding_constraint,
    P.slice_p: views.static_slice,
    P.dynamic_slice_p: views.dynamic_slice,
    P.rev_p: views.rev,
    UNSTACK_P: views.unstack,  # None (left out below) on a JAX without `lax.unstack`
    # Products: the LoRA branch factorized (rules/products.py, rules/dora.py, rules/moe.py); a bank's
    # kernel routed per example (rules/routing.py).
    P.dot_general_p: routing.routed(routing.dot_general, fusion.fused(products.dot_general)),
    P.gather_p: routing.routed(routing.gather, products.gather),
    P.conv_general_dilated_p: routing.routed(routing.refuse("a convolution"), products.conv),
    RAGGED_DOT_P: routing.routed(routing.refuse("a `ragged_dot` (expert kernels)"), moe.ragged_dot),
    # Parallelism: bodies per shard, collectives on the base kernel and its factors (rules/parallel.py).
    SHARD_MAP_P: parallel.shard_map_rule(eval_jaxpr),
    PVARY_P: parallel.pvary,
    ALL_GATHER_P: parallel.all_gather,
    # Control flow: bodies evaluated with the kernel views (rules/control.py).
    P.jit_p: control.inline("jaxpr", eval_jaxpr),
    P.closed_call_p: control.inline("call_jaxpr", eval_jaxpr),
    P.custom_jvp_call_p: control.inline("call_jaxpr", eval_jaxpr),
    P.custom_vjp_call_p: control.inline("call_jaxpr", eval_jaxpr),
    P.remat_p: control.remat(eval_jaxpr),
    P.scan_p: control.scan(eval_jaxpr),
    P.while_p: control.while_loop(eval_jaxpr),
    P.cond_p: control.cond(eval_jaxpr),
  }
  return {prim: rule for prim, rule in table.items() if prim is not None}
