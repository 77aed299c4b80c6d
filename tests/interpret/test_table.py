"""The rule table (`jlora._src.interpret.table`): one rule per primitive, built in one place."""

import ast
import importlib
import inspect
import pkgutil

import jax.numpy as jnp
import pytest
from jax.extend import core as jex

import jlora._src.interpret as interpret_pkg
from jlora._src.interpret import evaluator, table
from jlora._src.interpret.context import Context
from jlora._src.interpret.primitives import UNSTACK_P
from jlora._src.interpret.rules import routing, views
from jlora._src.interpret.values import LoraValue


def _interpreter_modules():
  for info in pkgutil.walk_packages(interpret_pkg.__path__, interpret_pkg.__name__ + "."):
    yield importlib.import_module(info.name)


def _table_literal() -> ast.Dict:
  """The dict literal `table.build` makes its table from."""
  fn = next(n for n in ast.parse(inspect.getsource(table)).body if getattr(n, "name", None) == "build")
  (literal,) = [n for n in ast.walk(fn) if isinstance(n, ast.Dict)]
  return literal


def test_each_primitive_has_exactly_one_rule_written_once():
  literal = _table_literal()
  assert None not in literal.keys, "a `**` merge in the table: each rule must be written out"
  keys = [ast.unparse(k) for k in literal.keys]
  assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
  built = table.build(evaluator.eval_jaxpr)
  assert len(built) == len(keys) - (UNSTACK_P is None)  # distinct primitives, none lost
  assert all(isinstance(p, jex.Primitive) for p in built)
  assert built.keys() == evaluator.RULES.keys()


def test_no_other_module_level_rule_dict():
  """Only the evaluator holds a table of rules keyed by primitive: no module's entries can shadow
  another's by the order of a merge."""
  found = []
  for module in _interpreter_modules():
    for name, value in vars(module).items():
      if isinstance(value, dict) and value and all(isinstance(k, jex.Primitive) for k in value):
        found.append(f"{module.__name__}.{name}")
  assert found == ["jlora._src.interpret.evaluator.RULES"]


def test_every_view_primitive_has_its_view_rule():
  view_rules = {p for p, r in evaluator.RULES.items() if r.__module__ == views.__name__}
  assert view_rules == views.PRIMITIVES
  assert views.OUTPUT_VIEWS <= views.PRIMITIVES


def _routed_value():
  return LoraValue(
    jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones((2, 2)), (0,), (1,), 1.0, "w", routed=(1.0, 1.0)
  )


def test_routed_gives_a_bank_kernel_to_the_bank_rule_and_any_other_to_the_single_rule():
  calls = []
  rule = routing.routed(lambda *a: calls.append("bank") or ["b"], lambda *a: calls.append("single") or ["s"])
  ctx = Context("factorized", False, 0.0, None, set())
  assert rule(None, [1.0, _routed_value()], ctx) == ["b"]
  assert rule(None, [1.0, 2.0], ctx) == ["s"]
  assert calls == ["bank", "single"]


def test_refuse_names_the_kernel_and_the_use():
  rule = routing.routed(routing.refuse("a convolution"), lambda *a: ["single"])
  ctx = Context("factorized", False, 0.0, None, set())
  with pytest.raises(ValueError, match=r"bank's kernel 'w' reaches a convolution, which cannot be routed"):
    rule(None, [1.0, _routed_value()], ctx)
  assert rule(None, [1.0, 2.0], ctx) == ["single"]


def test_keeps_quantized_only_primitives_with_bodies_or_steps():
  assert table.KEEPS_QUANTIZED <= set(evaluator.RULES)
  assert jex.primitives.dot_general_p not in table.KEEPS_QUANTIZED
