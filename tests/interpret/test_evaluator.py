"""The evaluator's walk (`jlora._src.interpret.evaluator`): how an equation's inputs are prepared, and
when a rule, a plain bind or a materialisation computes it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex

from jlora._src.adapters.quantize import quantize_array
from jlora._src.interpret import evaluator
from jlora._src.interpret.materialize import MaterializationWarning
from jlora._src.interpret.rules.branch import PendingSum
from jlora._src.interpret.values import Probe, QuantView
from tests.interpret._kernels import context, eqn_of, kernel, normal

P = jex.primitives
W = normal(8, 6)


def test_a_bias_joins_the_base_product_before_the_branch():
  base, lora, bias = normal(6), normal(6), normal(6)
  add = eqn_of(jnp.add, base, bias, primitive="add")
  traced = jax.make_jaxpr(lambda b, lo, c: evaluator.eval_eqn(add, [PendingSum(b, lo), c], context())[0])
  jaxpr = traced(base, lora, bias).jaxpr
  first, second = jaxpr.eqns
  assert first.primitive.name == second.primitive.name == "add"
  assert first.invars == [jaxpr.invars[0], jaxpr.invars[2]]  # base + bias
  assert second.invars == [first.outvars[0], jaxpr.invars[1]]  # then + lora
  (out,) = evaluator.eval_eqn(add, [PendingSum(base, lora), bias], context())
  np.testing.assert_allclose(out, (base + bias) + lora, rtol=1e-6)
  mul = eqn_of(jnp.multiply, base, bias, primitive="mul")  # any other use adds the sum up first
  (prod,) = evaluator.eval_eqn(mul, [PendingSum(base, lora), bias], context())
  np.testing.assert_allclose(prod, (base + lora) * bias, rtol=1e-6)


def test_prepare_inputs_unwraps_output_probes_except_for_the_views_they_follow():
  probe = Probe(W, ((1,), (1,)), "w", output=True)
  assert evaluator.prepare_inputs(P.sin_p, [probe])[0] is W
  assert evaluator.prepare_inputs(P.reshape_p, [probe])[0] is probe


def test_prepare_inputs_dequantizes_except_where_the_primitive_keeps_quantized_weights():
  q = QuantView(quantize_array(W, qtype="int8", block_size=None))
  (dense,) = evaluator.prepare_inputs(P.dot_general_p, [q])
  np.testing.assert_allclose(dense, W, atol=0.05)
  assert evaluator.prepare_inputs(P.scan_p, [q])[0] is q


def test_a_plain_equation_is_bound_and_an_uncovered_use_materialises_once_with_a_warning():
  sin = eqn_of(jnp.sin, W, primitive="sin")
  np.testing.assert_allclose(evaluator.eval_eqn(sin, [W], context())[0], jnp.sin(W))
  view = kernel(W, (0,), (1,))
  ctx = context()
  with pytest.warns(MaterializationWarning, match=r"'k' reaches primitive `sin`"):
    (out,) = evaluator.eval_eqn(sin, [view], ctx)
  np.testing.assert_allclose(out, jnp.sin(view.dense()), rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    evaluator.eval_eqn(sin, [view], ctx)  # once per kernel


def test_eval_jaxpr_follows_a_kernel_through_a_view_into_its_product():
  x = normal(3, 8)
  closed = jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w.T.T))(x, W)
  view = kernel(W, (0,), (1,))
  with warnings.catch_warnings():
    warnings.simplefilter("error", MaterializationWarning)
    (out,) = evaluator.eval_jaxpr(closed.jaxpr, closed.consts, [x, view], context())
  np.testing.assert_allclose(out, jnp.tanh(x @ view.dense()), rtol=1e-5, atol=1e-6)
