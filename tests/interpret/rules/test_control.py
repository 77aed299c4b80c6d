"""Control-flow rules (`jlora._src.interpret.rules.control`): bodies evaluated with kernel views, each
against the same function on the merged kernel."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jlora._src.interpret import evaluator
from jlora._src.interpret.materialize import MaterializationWarning
from jlora._src.interpret.rules import control
from jlora._src.interpret.values import LoraValue
from tests.interpret._kernels import context, kernel, normal

X = normal(3, 8)
STACK = normal(2, 8, 8)  # two layers' (in, out) kernels


def _layers(view: LoraValue) -> jax.Array:
  return jnp.stack([view.dense()[i] for i in range(view.shape[0])])


@pytest.mark.parametrize("b_axes", [(0, 2), (2,)])  # B per layer, or one B shared by the layers
def test_split_scanned_rebuilds_each_layer(b_axes):
  view = kernel(STACK, (0, 1), b_axes)
  xs, inv, rebuild = control.split_scanned(view)
  for i in range(2):
    step = rebuild(jax.tree_util.tree_map(lambda s, i=i: None if s is None else s[i], xs), inv)
    assert step.shape == (8, 8) and step.a_axes == (0,) and step.b_axes == (1,)
    np.testing.assert_allclose(step.dense(), view.dense()[i], rtol=1e-5, atol=1e-5)


def _evaluate(fn, view, *args, **ctx):
  closed = jax.make_jaxpr(fn)(view.w, *args)
  with warnings.catch_warnings():
    warnings.simplefilter("error", MaterializationWarning)
    return evaluator.eval_jaxpr(closed.jaxpr, closed.consts, [view, *args], context(**ctx))


def test_scan_slices_a_stacked_kernel_per_step():
  fn = lambda ws, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]  # noqa: E731
  view = kernel(STACK, (0, 1), (0, 2))
  (got,) = _evaluate(fn, view, X)
  np.testing.assert_allclose(got, fn(_layers(view), X), rtol=1e-5, atol=1e-5)


def test_while_cond_jit_and_remat_close_over_the_kernel():
  def fn(w, x):
    x = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ w), x)
    x = lax.cond(x.sum() > 0, lambda h: h @ w, lambda h: -(h @ w), x)
    return jax.checkpoint(jax.jit(lambda h: h @ w))(x)

  view = kernel(normal(8, 8), (0,), (1,))
  (got,) = _evaluate(fn, view, X)
  np.testing.assert_allclose(got, fn(view.dense(), X), rtol=1e-5, atol=1e-5)


def test_scan_draws_a_dropout_key_per_step():
  fn = lambda ws, x: lax.scan(lambda h, w: (h, x @ w), x, ws)[1]  # noqa: E731
  same = jnp.stack([STACK[0], STACK[0]])
  view = kernel(same, (0, 1), (2,))
  view = LoraValue(
    view.w, jnp.stack([view.a[0], view.a[0]]), view.b, view.a_axes, view.b_axes, view.scale, view.site
  )
  (plain,) = _evaluate(fn, view, X)
  np.testing.assert_allclose(plain[0], plain[1], rtol=1e-6)  # the same layer twice
  (dropped,) = _evaluate(fn, view, X, rate=0.5, key=jax.random.key(0))
  assert not np.allclose(dropped[0], dropped[1])  # each step its own mask
