"""The fallback (`jlora._src.interpret.materialize`): a kernel view as a plain array, with one warning
per kernel; a bank's kernel is never materialised."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jlora._src.interpret.materialize import MaterializationWarning, materialize, plain_outputs
from jlora._src.interpret.values import LoraValue, Probe
from tests.interpret._kernels import context, kernel, normal

W = normal(4, 3)


def test_materialize_warns_once_per_kernel_and_gives_the_dense_kernel():
  view, ctx = kernel(W, (0,), (1,)), context()
  with pytest.warns(MaterializationWarning, match=r"'k' reaches a test use.*W \+ scale\*A@B is materialised"):
    got = materialize(view, ctx, "a test use")
  np.testing.assert_allclose(got, W + view.scale * view.a @ view.b.T, rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    materialize(view, ctx, "a test use")
    assert plain_outputs([W, Probe(W, ((0,), (1,)), "p")], ctx, "") == [W, W]


def test_a_bank_kernel_is_refused():
  bank = LoraValue(W, jnp.ones((4, 4)), jnp.ones((3, 4)), (0,), (1,), 1.0, "bank/w", routed=(1.0, 2.0))
  with pytest.raises(ValueError, match=r"'bank/w' reaches an output, which cannot be routed per example"):
    materialize(bank, context(), "an output")
