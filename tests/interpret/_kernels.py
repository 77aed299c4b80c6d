"""Helpers for the interpreter's unit tests: an equation of a traced function, a random adapted
kernel view, and a context."""

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.interpret.context import Context
from jlora._src.interpret.rules import branch
from jlora._src.interpret.values import LoraValue

RNG = np.random.default_rng(0)


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def eqn_of(fn, *args, primitive: str):
  """The first equation of ``primitive`` in the jaxpr of ``fn(*args)`` (or in a body within it)."""
  return next(e for e in _eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == primitive)


IDX = jnp.array([[1, 7, 7], [0, 9, 3]])  # token ids into a vocabulary of 10


def gather_of(fn, table, idx):
  """The ``gather`` of ``fn(table, idx)`` (an embedding lookup) and its index operand as traced (jnp
  indexing adds a trailing axis to the ids)."""
  eqn = eqn_of(fn, table, idx, primitive="gather")
  return eqn, idx.reshape(eqn.invars[1].aval.shape)


def normal(*shape) -> jax.Array:
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def kernel(w: jax.Array, a_axes, b_axes, *, r: int = 3, scale: float = 0.5, g=None) -> LoraValue:
  """A `LoraValue` of ``w`` with random factors: ``a`` over ``a_axes``, ``b`` over ``b_axes``."""
  a = normal(*[w.shape[i] for i in a_axes], r)
  b = normal(*[w.shape[i] for i in b_axes], r)
  return LoraValue(w, a, b, tuple(a_axes), tuple(b_axes), scale, "k", g=g)


def context(strategy="factorized", differentiated=False, rate=0.0, key=None, **kw) -> Context:
  return Context(strategy, differentiated, rate, key, set(), **kw)


def dot_use(eqn, view: LoraValue, x: jax.Array) -> branch.DotUse:
  """``eqn`` (a ``dot_general`` of ``x`` and the kernel) seen as a use of the kernel view ``view``."""
  _, x, dot = branch.kernel_dot(eqn, [x, view])
  return branch.DotUse(eqn, view, x, dot, branch.branch_of(eqn, view, x, dot))


def close(got, want, tol=1e-5):
  """``got == want`` up to ``tol`` relative to each element and to ``want``'s largest magnitude."""
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(jnp.abs(want))))
