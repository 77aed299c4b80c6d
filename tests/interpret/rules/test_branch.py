"""The LoRA branch's pieces (`jlora._src.interpret.rules.branch`), each against ``jnp`` written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jlora._src.interpret.rules import branch
from jlora._src.interpret.values import Probe
from tests.interpret._kernels import IDX, close, context, eqn_of, gather_of, kernel, normal

X, W = normal(3, 5, 8), normal(8, 6)
DOT = eqn_of(lambda x, w: x @ w, X, W, primitive="dot_general")


def test_kernel_dot_finds_the_kernel_operand_and_its_axes():
  view = kernel(W, (0,), (1,))
  got, x, dot = branch.kernel_dot(DOT, [X, view])
  assert got is view and x is X
  assert (dot.k_is_lhs, tuple(dot.kc), tuple(dot.xc), tuple(dot.kb), tuple(dot.xb)) == (
    False,
    (0,),
    (2,),
    (),
    (),
  )
  assert branch.kernel_dot(DOT, [X, W]) is None  # no kernel view
  assert branch.kernel_dot(DOT, [view, view]) is None  # two


def test_lora_branch_is_the_rank_r_product():
  view = kernel(W, (0,), (1,))
  _, x, dot = branch.kernel_dot(DOT, [X, view])
  br = branch.branch_of(DOT, view, x, dot)
  assert br.first_is_a
  want = 0.5 * jnp.einsum("bsi,ir,or->bso", X, view.a, view.b)
  np.testing.assert_allclose(branch.lora_branch(br, 0.5, X, view.a, view.b), want, rtol=1e-5, atol=1e-5)
  t = jnp.einsum("bsi,ir->bsr", X, view.a)  # a first product given: used, not recomputed
  close(branch.lora_branch(br, 0.5, X, view.a, view.b, t=2 * t), 2 * want)


def test_branch_of_a_tied_head_starts_with_b_and_refuses_a_product_over_both_factors():
  e = normal(6, 8)  # (vocab, d), used as x @ E.T: the contraction is over B's axis
  view = kernel(e, (0,), (1,))
  head = eqn_of(lambda x, e: lax.dot_general(x, e, (((2,), (1,)), ((), ()))), X, e, primitive="dot_general")
  br = branch.branch_of(head, view, *branch.kernel_dot(head, [X, view])[1:])
  assert not br.first_is_a
  want = 0.5 * jnp.einsum("bsd,vr,dr->bsv", X, view.a, view.b)
  np.testing.assert_allclose(branch.lora_branch(br, 0.5, X, view.a, view.b), want, rtol=1e-5, atol=1e-5)
  x = normal(3, 8, 6)
  both = eqn_of(lambda x, w: jnp.tensordot(x, w, 2), x, W, primitive="dot_general")  # over in and out
  view_w = kernel(W, (0,), (1,))
  assert branch.branch_of(both, view_w, *branch.kernel_dot(both, [x, view_w])[1:]) is None


def test_pending_sum_settles_to_the_sum():
  p = branch.PendingSum(jnp.ones(3), 2 * jnp.ones(3))
  np.testing.assert_array_equal(branch.settle(p), 3 * jnp.ones(3))
  assert branch.settle(W) is W


def test_dropout_keeps_and_rescales_with_the_scope_key():
  x = jnp.ones((400, 50))
  assert branch.dropout(x, context(rate=0.3)) is x  # no key: no dropout
  assert branch.dropout(x, context(rate=0.0, key=jax.random.key(1))) is x
  ctx = context(rate=0.3, key=jax.random.key(1))
  first, second = branch.dropout(x, ctx), branch.dropout(x, ctx)
  np.testing.assert_allclose(np.unique(np.asarray(first)), [0.0, 1 / 0.7], rtol=1e-6)
  assert abs(float(jnp.mean(first == 0)) - 0.3) < 0.02
  mask = jax.random.bernoulli(jax.random.fold_in(jax.random.key(1), 1), 0.7, x.shape)
  np.testing.assert_array_equal(first != 0, mask)  # the scope key folded with the branch's counter
  assert not np.array_equal(first, second)  # each branch its own mask


def test_merged_is_cheaper_only_when_allowed_and_fewer_flops():
  view = kernel(W, (0,), (1,), r=2)
  many, few = normal(64, 8), normal(1, 8)
  dot = branch.kernel_dot(DOT, [X, view])[2]
  assert branch.merged_is_cheaper(view, many, dot, context("auto"))
  assert not branch.merged_is_cheaper(view, few, dot, context("auto"))
  assert not branch.merged_is_cheaper(view, many, dot, context("factorized"))
  assert not branch.merged_is_cheaper(view, many, dot, context("auto", differentiated=True))


def test_b_branch_puts_the_fan_out_at_the_rank_axis():
  y, b = normal(2, 3, 4), normal(7, 3)  # rank at axis 1
  want = 0.5 * jnp.einsum("nrk,or->nok", y, b)
  np.testing.assert_allclose(branch.b_branch(y, b, 0.5, 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lookup", ["index", "take"])
def test_lookup_rows_gathers_rows_of_the_base_and_of_a(lookup):
  emb = normal(10, 4)  # (vocab, d): rows by token
  fn = (lambda e, i: e[i]) if lookup == "index" else (lambda e, i: jnp.take(e, i, axis=0))
  eqn, idx = gather_of(fn, emb, IDX)
  view = kernel(emb, (0,), (1,))
  base, rows, axis = branch.lookup_rows(eqn, view, idx)
  np.testing.assert_array_equal(base, emb[IDX])
  np.testing.assert_array_equal(jnp.moveaxis(rows, axis, -1), view.a[IDX])
  assert branch.full_axes(eqn, Probe(emb, ((0,), (1,)), "e")) == [1]
  assert branch.lookup_rows(eqn, kernel(emb, (1,), (0,)), idx) is None  # rows of A: not a lookup of B


def test_dot_use_base_binds_the_equation_on_the_given_kernel():
  view = kernel(W, (0,), (1,))
  _, x, dot = branch.kernel_dot(DOT, [X, view])
  use = branch.DotUse(DOT, view, x, dot, branch.branch_of(DOT, view, x, dot))
  np.testing.assert_allclose(use.base(2 * W, X), X @ (2 * W), rtol=1e-5)
