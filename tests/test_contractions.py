"""Two-operand contractions and the rank-r products' factor gradients (contractions)."""

import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora._src.contractions import contract, factor_product

K = jax.random.split(jax.random.key(11), 6)


class Case(NamedTuple):
  act_lab: str
  act_shape: tuple[int, ...]
  f_lab: str
  f_shape: tuple[int, ...]
  out_lab: str
  rule: bool  # whether the labels allow the rule (else the product is `contract`)

  def product(self, act, f):
    return factor_product(act, self.act_lab, f, self.f_lab, self.out_lab)

  def einsum(self, act, f):
    return jnp.einsum(f"{self.act_lab},{self.f_lab}->{self.out_lab}", act, f)

  def operands(self):
    return jax.random.normal(K[0], self.act_shape), jax.random.normal(K[1], self.f_shape)


CASES = [
  Case("bsd", (2, 4, 5), "dr", (5, 3), "bsr", True),  # x @ A, tokens on two axes
  Case("bsr", (2, 4, 3), "ro", (3, 7), "bso", True),  # t @ B
  Case("bsr", (2, 4, 3), "rnh", (3, 2, 4), "bsnh", True),  # an einsum kernel's B (N, H)
  Case("bsnh", (2, 4, 2, 3), "nhr", (2, 3, 5), "bsr", True),  # an o-projection's A (N, H)
  Case("bcsd", (2, 2, 3, 5), "dr", (5, 3), "bcsr", True),  # three token axes
  Case("td", (6, 5), "dr", (5, 3), "tr", False),  # one token axis: nothing to merge
  Case("bsr", (2, 4, 3), "ro", (3, 7), "sbo", False),  # tokens in another order in the output
  Case("dbs", (5, 2, 4), "dr", (5, 3), "bsr", False),  # tokens trailing in the input
  Case("bsd", (2, 4, 5), "bdr", (2, 5, 3), "bsr", False),  # a batched factor
]


def _id(c: Case) -> str:
  return f"{c.act_lab},{c.f_lab}->{c.out_lab}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_factor_product_matches_einsum_values_and_gradients(case):
  act, f = case.operands()
  fp, ein = case.product, case.einsum
  chex.assert_trees_all_close(fp(act, f), ein(act, f), atol=1e-5, rtol=1e-5)
  ct = jax.random.normal(K[2], ein(act, f).shape)
  loss = lambda g: lambda a, w: jnp.sum(g(a, w) * ct)  # noqa: E731
  chex.assert_trees_all_close(
    jax.grad(loss(fp), (0, 1))(act, f), jax.grad(loss(ein), (0, 1))(act, f), atol=1e-5, rtol=1e-5
  )
  # Forward mode and forward-over-reverse (a Hessian-vector product) go through the rule too.
  tangents = (jax.random.normal(K[3], act.shape), jax.random.normal(K[4], f.shape))
  chex.assert_trees_all_close(
    jax.jvp(fp, (act, f), tangents), jax.jvp(ein, (act, f), tangents), atol=1e-5, rtol=1e-5
  )
  sq = lambda g: lambda a, w: jnp.sum(g(a, w) ** 2)  # noqa: E731
  hvp = lambda g: jax.jvp(jax.grad(sq(g), (0, 1)), (act, f), tangents)[1]  # noqa: E731
  chex.assert_trees_all_close(hvp(fp), hvp(ein), atol=1e-4, rtol=1e-5)
  # vmap over a leading adapter axis of the factor.
  fs = jnp.stack([f, 2 * f])
  chex.assert_trees_all_close(
    jax.vmap(jax.grad(loss(fp), 1), (None, 0))(act, fs),
    jax.vmap(jax.grad(loss(ein), 1), (None, 0))(act, fs),
    atol=1e-5,
    rtol=1e-5,
  )
  # The rule is taken exactly where the labels allow it; elsewhere the product is `contract`.
  assert ("custom_jvp_call" in str(jax.make_jaxpr(fp)(act, f))) == case.rule


def _n_tokens(case: Case) -> int:
  return int(np.prod([n for c, n in zip(case.act_lab, case.act_shape) if c not in case.f_lab]))


def _factor_grad_dots(case: Case) -> list:
  """The ``dot_general``s of the factor's gradient, as (lhs shape, rhs shape, dimension numbers)."""
  act, f = case.operands()
  ct = jax.random.normal(K[2], case.einsum(act, f).shape)

  def loss(w):
    return jnp.sum(case.product(act, w) * ct)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(f).jaxpr
  dots = []
  stack = [jaxpr]
  while stack:
    j = stack.pop()
    for eqn in j.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["dimension_numbers"]))
      stack += jax.extend.core.jaxprs_in_params(eqn.params)
  return dots


@pytest.mark.parametrize("case", [c for c in CASES if c.rule], ids=_id)
def test_factor_gradient_contracts_the_tokens_as_one_leading_axis(case):
  # The gradient's token contraction is one dot over one axis of each operand, the first: the
  # tokens merged (a reshape of leading axes), each operand read in place.
  n_tok = _n_tokens(case)
  grads = [d for d in _factor_grad_dots(case) if n_tok in d[0] and n_tok in d[1]]
  assert len(grads) == 1, grads
  lhs, rhs, ((lc, rc), (lb, rb)) = grads[0]
  assert (lhs[0], rhs[0], tuple(lc), tuple(rc), lb, rb) == (n_tok, n_tok, (0,), (0,), (), ())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's lowering of the token contraction")
def test_factor_gradient_compiles_without_transposing_a_token_sized_array():
  # The measured trap (module docstring): an activation's backward feeding `t^T g`. With autodiff's
  # dot XLA:CPU transposes the tokens x features cotangent; with the rule nothing that size moves.
  b_, s_, d, o, r = 2, 64, 32, 128, 4
  x = jax.random.normal(K[0], (b_, s_, d))
  w, a, b = jax.random.normal(K[1], (d, o)), jax.random.normal(K[2], (d, r)), jax.random.normal(K[3], (r, o))

  def step(product):
    def loss(ab):
      a, b = ab
      h = jnp.tanh(x @ w + product(product(x, "bsd", a, "dr", "bsr"), "bsr", b, "ro", "bso"))
      return jnp.sum(jax.nn.gelu(h) ** 2)

    return jax.jit(jax.grad(loss)).lower((a, b)).compile().as_text()

  big = re.compile(rf"= f32\[{o},{b_},{s_}\]\{{[0-9,]+\}} transpose\(")
  assert big.search(step(contract)), "the trap this rule avoids no longer shows: re-measure the benchmark"
  assert not big.search(step(factor_product))
