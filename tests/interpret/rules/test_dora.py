"""DoRA's product rules (`jlora._src.interpret.rules.dora`): each against ``g * (x @ (W + s A @ B))``
written out in ``jnp`` (PEFT's ``DoraLinearLayer`` formula under dropout)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jlora._src.interpret.rules import branch, dora
from tests.interpret._kernels import IDX, close, context, dot_use, eqn_of, gather_of, kernel, normal

X, W = normal(3, 5, 8), normal(8, 6)
G = jnp.abs(normal(6)) + 0.5  # the scale m / ||V|| per output feature
DOT = eqn_of(lambda x, w: x @ w, X, W, primitive="dot_general")


def test_combine_is_peft_forward_with_and_without_dropout():
  g, base, lora, dropped = (normal(4) for _ in range(4))
  close(dora.combine(g, base, lora, None), g * (base + lora))
  close(dora.combine(g, base, lora, dropped), base + (g - 1) * dropped + g * lora)


def test_scale_placement_on_an_axis_and_on_labelled_outputs():
  g = normal(5)
  assert dora.on_axis(g, 3, 1).shape == (1, 5, 1)
  g2 = normal(5, 4)  # over labels "ij", output "bji"
  np.testing.assert_array_equal(dora.on_output(g2, "ij", "bji"), g2.T[None])
  assert dora.on_output(g2, "ij", "bj") is None  # the product contracts axis i


@pytest.mark.parametrize("recompute", [False, True])
def test_dot_general_is_the_scaled_merged_product(recompute):
  view = kernel(W, (0,), (1,), g=G)
  (got,) = dora.dot_general(dot_use(DOT, view, X), context(dora_recompute=recompute))
  close(got, X @ (W + view.scale * view.a @ view.b.T) * G)

  def loss(a, b, g, fn):
    return jnp.sum(jnp.sin(fn(dataclasses.replace(view, a=a, b=b, g=g))))

  factored = lambda v: dora.dot_general(dot_use(DOT, v, X), context(dora_recompute=recompute))[0]  # noqa: E731
  written = lambda v: X @ (W + v.scale * v.a @ v.b.T) * v.g  # noqa: E731
  for got_g, want_g in zip(
    jax.grad(loss, argnums=(0, 1, 2))(view.a, view.b, G, factored),
    jax.grad(loss, argnums=(0, 1, 2))(view.a, view.b, G, written),
  ):
    close(got_g, want_g, 1e-4)


def test_dot_general_takes_a_fused_first_product():
  view = kernel(W, (0,), (1,), g=G)
  first = jnp.einsum("bsi,ir->bsr", X, view.a)
  (got,) = dora.dot_general(dot_use(DOT, view, X), context(), first=first)
  close(got, X @ (W + view.scale * view.a @ view.b.T) * G)


def test_dot_general_under_dropout_rescales_the_dropped_base_as_peft_does():
  view = kernel(W, (0,), (1,), g=G)
  key = jax.random.key(2)
  (got,) = dora.dot_general(dot_use(DOT, view, X), context(rate=0.5, key=key))
  xd = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, X.shape), X / 0.5, 0.0)
  want = X @ W + (G - 1) * (xd @ W) + G * (xd @ (view.scale * view.a @ view.b.T))
  close(got, want)


def test_tied_head_scales_the_input():
  e = normal(6, 8)  # (vocab, d), used as x @ E.T: the scaled axis d is contracted
  g = jnp.abs(normal(8)) + 0.5
  view = kernel(e, (0,), (1,), g=g)
  head = eqn_of(lambda x, e: lax.dot_general(x, e, (((2,), (1,)), ((), ()))), X, e, primitive="dot_general")
  use = dot_use(head, view, X)
  (got,) = dora.dot_general(use, context())  # g is not on the output: the tied form
  want = X @ ((e + view.scale * view.a @ view.b.T) * g).T
  close(branch.settle(got), want)
  (direct,) = dora.tied_dot(use, context())
  close(branch.settle(direct), want)


def test_conv_scales_each_output_channel():
  x, w = normal(2, 6, 6, 3), normal(3, 3, 3, 4)
  conv = lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )  # noqa: E731
  g = jnp.abs(normal(4)) + 0.5
  view = kernel(w, (0, 1, 2), (3,), g=g)
  eqn = eqn_of(conv, x, w, primitive="conv_general_dilated")
  (got,) = dora.conv(eqn, view, x, context())
  merged = w + view.scale * jnp.einsum("hwir,or->hwio", view.a, view.b)
  close(got, conv(x, merged) * g, 1e-4)


@pytest.mark.parametrize("recompute", [False, True])
def test_gather_scales_each_feature(recompute):
  emb = normal(10, 4)
  g = jnp.abs(normal(4)) + 0.5
  view = kernel(emb, (0,), (1,), g=g)
  eqn, idx = gather_of(lambda e, i: e[i], emb, IDX)
  (got,) = dora.gather(eqn, view, idx, context(dora_recompute=recompute))
  close(got, ((emb + view.scale * view.a @ view.b.T) * g)[IDX])
  assert dora.gather(eqn, kernel(emb, (1,), (0,), g=jnp.ones(10)), idx, context()) is None  # not rows


def test_recompute_differentiates_the_product_again():
  calls = []

  def fn(w, v):
    calls.append(1)
    return w * v["x"]

  w, x = normal(3), normal(3)
  grad = jax.grad(lambda x: jnp.sum(dora.product(True, fn, w, dict(x=x)) ** 2))(x)
  close(grad, 2 * w * w * x)
  assert len(calls) == 2  # once forward, once again in the backward pass
  calls.clear()
  jax.grad(lambda x: jnp.sum(dora.product(False, fn, w, dict(x=x)) ** 2))(x)
  assert len(calls) == 1
