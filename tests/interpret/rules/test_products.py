"""The single-adapter product rules (`jlora._src.interpret.rules.products`): each named product
against the product with the merged kernel written out in ``jnp``."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora._src.core import layouts
from jlora._src.interpret.rules import branch, products
from jlora._src.interpret.values import LoraValue, Probe
from tests.interpret._kernels import IDX, close, context, dot_use, eqn_of, gather_of, kernel, normal

X, W = normal(3, 5, 8), normal(8, 6)
DOT = eqn_of(lambda x, w: x @ w, X, W, primitive="dot_general")


def _merged(view):
  return view.w + view.scale * view.a @ view.b.T


def test_factorized_dot_is_the_base_product_plus_the_branch():
  view = kernel(W, (0,), (1,))
  out = products.factorized_dot(dot_use(DOT, view, X), context())
  assert isinstance(out, branch.PendingSum)
  close(out.base, X @ W)
  close(branch.settle(out), X @ _merged(view))


def test_factorized_dot_takes_a_fused_first_product():
  view = kernel(W, (0,), (1,))
  first = jnp.einsum("bsi,ir->bsr", X, view.a)  # what sibling fusion hands over
  close(
    branch.settle(products.factorized_dot(dot_use(DOT, view, X), context(), first=first)), X @ _merged(view)
  )
  zero = products.factorized_dot(dot_use(DOT, view, X), context(), first=jnp.zeros_like(first))
  close(branch.settle(zero), X @ W)  # the product given is the one used


def test_factorized_dot_drops_out_the_branch_input_only():
  view = kernel(W, (0,), (1,))
  key = jax.random.key(4)
  out = products.factorized_dot(dot_use(DOT, view, X), context(rate=0.5, key=key))
  keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, X.shape)
  xd = jnp.where(keep, X / 0.5, 0.0)
  close(out.base, X @ W)
  close(out.lora, xd @ (view.scale * view.a @ view.b.T))


def test_merged_dot_forward_is_the_merged_kernel_and_its_gradients_are_factorized():
  view = kernel(W, (0,), (1,))
  close(products.merged_dot(dot_use(DOT, view, X)), X @ _merged(view))

  def loss(a, b, w):
    return jnp.sum(jnp.sin(products.merged_dot(dot_use(DOT, dataclasses.replace(view, a=a, b=b, w=w), X))))

  def want(a, b):
    return jnp.sum(jnp.sin(X @ (W + view.scale * a @ b.T)))

  ga, gb, gw = jax.grad(loss, argnums=(0, 1, 2))(view.a, view.b, W)
  wa, wb = jax.grad(want, argnums=(0, 1))(view.a, view.b)
  close(ga, wa, 1e-4)
  close(gb, wb, 1e-4)
  np.testing.assert_array_equal(gw, jnp.zeros_like(W))  # the frozen base gets no cotangent


def test_dot_general_chooses_merged_only_under_auto_without_gradients():
  view = kernel(W, (0,), (1,), r=2)
  many = normal(64, 8)
  eqn = eqn_of(lambda x, w: x @ w, many, W, primitive="dot_general")
  (merged,) = products.dot_general(eqn, [many, view], context("auto"))
  assert not isinstance(merged, branch.PendingSum)
  (factored,) = products.dot_general(eqn, [many, view], context("auto", differentiated=True))
  assert isinstance(factored, branch.PendingSum)
  close(merged, many @ _merged(view))
  close(branch.settle(factored), many @ _merged(view))
  (fused,) = products.dot_general(eqn, [many, view], context("auto"), jnp.zeros((64, 2)))
  assert isinstance(fused, branch.PendingSum)  # a fused first product is never merged


def test_probe_dot_records_fan_in_fan_out_and_stacked_axes():
  ctx = context(roles={})
  stacked = normal(2, 8, 6)
  eqn = eqn_of(
    lambda x, w: jnp.einsum("lbi,lio->lbo", x, w), normal(2, 3, 8), stacked, primitive="dot_general"
  )
  probe = Probe(stacked, ((0,), (1,), (2,)), "w")
  (out,) = products.dot_general(eqn, [normal(2, 3, 8), probe], ctx)
  assert ctx.roles == {"w": [("dot_general", {0: layouts.STACKED, 1: layouts.IN, 2: layouts.OUT})]}
  assert out.output and sorted(ax for o in out.origin for ax in o) == [0, 2]  # the product's kernel axes


def test_conv_is_the_convolution_with_the_merged_kernel():
  x, w = normal(2, 7, 7, 3), normal(3, 3, 3, 5)  # NHWC, HWIO
  conv = lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )  # noqa: E731
  view = kernel(w, (0, 1, 2), (3,))
  (got,) = products.conv(eqn_of(conv, x, w, primitive="conv_general_dilated"), [x, view], context())
  close(got, conv(x, view.dense()), 1e-4)
  grouped = lambda x, w: lax.conv_general_dilated(  # noqa: E731
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3
  )
  w_g = normal(3, 3, 1, 6)
  eqn = eqn_of(grouped, x, w_g, primitive="conv_general_dilated")
  assert products.conv(eqn, [x, kernel(w_g, (0, 1, 2), (3,))], context()) is None  # ungrouped factors


def test_grouped_conv_is_peft_s_ungrouped_a_then_grouped_1x1_b():
  # Conv(groups=2), kernel (3, 3, 2, 6): A over all 4 input channels to r=4, B (6, r/2) a grouped 1x1 map
  x, w = normal(2, 7, 7, 4), normal(3, 3, 2, 6)
  conv = lambda x, w, g: lax.conv_general_dilated(  # noqa: E731
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g
  )
  a, b = normal(3, 3, 4, 4), normal(6, 2)
  view = LoraValue(w, a, b, (0, 1, 2), (3,), 0.5, "k", groups=2)
  eqn = eqn_of(lambda x, w: conv(x, w, 2), x, w, primitive="conv_general_dilated")
  (got,) = products.conv(eqn, [x, view], context())
  want = conv(x, w, 2) + 0.5 * conv(conv(x, a, 1), b.T.reshape(1, 1, 2, 6), 2)  # lax's own grouped conv
  close(got, want, 1e-4)
  with pytest.raises(ValueError, match=r"'k' adapts a grouped convolution.*cannot be merged"):
    view.dense()
  ctx = context(roles={})
  products.conv(eqn, [x, Probe(w, ((0,), (1,), (2,), (3,)), "k")], ctx)
  assert ctx.roles == {"k": [("conv_general_dilated", {0: "i", 1: "i", 2: f"{layouts.GROUPED}2", 3: "o"})]}


def test_gather_is_the_lookup_of_the_merged_table():
  emb = normal(10, 4)
  view = kernel(emb, (0,), (1,))
  eqn, idx = gather_of(lambda e, i: e[i], emb, IDX)
  (got,) = products.gather(eqn, [view, idx], context())
  close(got, view.dense()[IDX])


def test_scanned_grouped_conv_is_each_layer_s_grouped_branch():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return nn.Conv(8, (3, 3), padding="SAME", feature_group_count=2, name="conv")(c), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      return blocks(name="blocks")(x, None)[0]

  model, x = Scanned(), normal(1, 5, 5, 8)
  variables = model.init(jax.random.key(0), x)
  cfg = jlora.LoraConfig(r=2, target_modules=("conv",), init_lora_weights=False)
  lora = jlora.init(variables, cfg, key=jax.random.key(1), apply_fn=model.apply, example_args=(x,))
  p, f = variables["params"]["blocks"]["conv"], lora["params"]["blocks"]["conv"]["kernel"]
  assert f["lora_A"].shape == (2, 3, 3, 8, 2) and f["lora_B"].shape == (2, 1, 8)
  conv = lambda x, w, g: lax.conv_general_dilated(  # noqa: E731
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g
  )
  want = x
  for i in range(2):
    lora_i = conv(conv(want, f["lora_A"][i], 1), f["lora_B"][i].reshape(1, 1, 1, 8), 2)
    want = conv(want, p["kernel"][i], 2) + p["bias"][i] + cfg.lora_alpha / 2 * lora_i
  close(jlora.wrap(model.apply, cfg)(variables, lora, x), want, 1e-5)
