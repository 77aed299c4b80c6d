"""Sibling fusion: kernels that read one input share one rank-r product (interpreter_fusion)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.interpret import evaluator, fusion
from tests import zoo
from tests.interpret._kernels import context, kernel

K = jax.random.split(jax.random.key(3), 8)
D = 8


def _dots(jaxpr) -> int:
  """``dot_general`` equations in ``jaxpr`` and the jaxprs in its equations' params."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _dots(sub)
  return n


def _w(*shape, key=K[0]):
  return jax.random.normal(key, shape) / np.sqrt(shape[0])


def _qkv(p, x):
  """A Llama-like block: q/k/v read ``h``, gate/up read ``g``; v's kernel is stored (out, in)."""
  h = jnp.tanh(x)
  q, k, v = h @ p["q"]["w"], h @ p["k"]["w"], h @ p["v"]["w"].T
  g = jnp.tanh(q * k + v)
  gate, up = g @ p["gate"]["w"], g @ p["up"]["w"]
  return (jax.nn.silu(gate) * up) @ p["down"]["w"]


PARAMS = {
  "q": {"w": _w(D, D, key=K[0])},
  "k": {"w": _w(D, D, key=K[1])},
  "v": {"w": _w(D, D, key=K[2])},
  "gate": {"w": _w(D, 16, key=K[3])},
  "up": {"w": _w(D, 16, key=K[4])},
  "down": {"w": _w(16, D, key=K[5])},
}
X = jax.random.normal(K[6], (2, 5, D))
CFG = jlora.LoraConfig(
  r=2,
  lora_alpha=4,
  target_modules=("q", "k", "v", "gate", "up", "down"),
  rank_pattern={"k": 3, "up": 4},  # siblings of different ranks fuse too
  alpha_pattern={"v": 1.0},  # and of different scales
  layout_pattern={"v": "oi"},  # v is used as h @ W.T: the same contraction on h
  init_lora_weights=False,
)


def _apply(fuse: bool):
  return jlora.wrap(_qkv, CFG, strategy="factorized", fuse_siblings=fuse)


def _loss(apply, lora, x=X, **kw):
  return jnp.sum(jnp.sin(apply(PARAMS, lora, x, **kw)))


@pytest.fixture(scope="module")
def lora():
  return jlora.init(PARAMS, CFG, key=K[7])


def test_llama_block_dot_counts(lora):
  """q/k/v: 3 first products -> 1; gate/up: 2 -> 1, forward; the A gradients likewise."""
  fwd = {f: _dots(jax.make_jaxpr(_apply(f))(PARAMS, lora, X).jaxpr) for f in (True, False)}
  # unfused: 6 base + 6 x@A + 6 t@B; fused: 6 base + 3 + 6
  assert fwd == {True: 15, False: 18}
  grad = {
    f: _dots(jax.make_jaxpr(jax.grad(lambda lo, f=f: _loss(_apply(f), lo)))(lora).jaxpr)
    for f in (True, False)
  }
  # saved: 3 forward, 3 A gradients (x^T @ dt_i -> one), and gate/up's input cotangent through A
  # (dt_i @ A_i^T -> one); q/k/v's input h depends on no adapter, so it has no cotangent
  assert grad == {True: 35, False: 42}
  hlo = {
    f: jax.jit(_apply(f)).lower(PARAMS, lora, X).as_text().count("stablehlo.dot_general")
    for f in (True, False)
  }
  assert hlo == {True: 15, False: 18}


def test_llama_block_matches_unfused_and_merged(lora):
  fused, unfused = _apply(True), _apply(False)
  want = _qkv(jlora.merge(PARAMS, lora, CFG), X)
  got = jax.jit(fused)(PARAMS, lora, X)
  np.testing.assert_allclose(got, jax.jit(unfused)(PARAMS, lora, X), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(lambda lo: _loss(fused, lo)))(lora)
  g0 = jax.jit(jax.grad(lambda lo: _loss(unfused, lo)))(lora)
  chex.assert_trees_all_close(g, g0, rtol=1e-5, atol=1e-6)


def test_dropout_is_not_fused_and_matches_unfused(lora):
  """Each branch draws its own dropout mask, so with dropout nothing is fused: bit-identical."""
  cfg = jlora.LoraConfig(**{**CFG.__dict__, "lora_dropout": 0.5})
  key = jax.random.key(11)
  outs = [
    jax.jit(jlora.wrap(_qkv, cfg, strategy="factorized", fuse_siblings=f))(
      PARAMS, lora, X, lora_dropout_key=key
    )
    for f in (True, False)
  ]
  np.testing.assert_array_equal(outs[0], outs[1])
  apply = jlora.wrap(_qkv, cfg, strategy="factorized")
  n = _dots(jax.make_jaxpr(lambda lo: apply(PARAMS, lo, X, lora_dropout_key=key))(lora).jaxpr)
  assert n == 18


def test_auto_merged_uses_are_not_fused(lora):
  """Under ``strategy="auto"`` without a gradient, many tokens merge each kernel: no branch to fuse."""
  x = jax.random.normal(K[6], (64, D))
  outs = [jax.jit(jlora.wrap(_qkv, CFG, fuse_siblings=f))(PARAMS, lora, x) for f in (True, False)]
  np.testing.assert_array_equal(outs[0], outs[1])


def test_fuse_siblings_must_be_bool():
  with pytest.raises(TypeError, match="`fuse_siblings` must be True or False"):
    jlora.wrap(_qkv, CFG, fuse_siblings="yes")


def check_zoo_fused_matches_unfused(name):
  """Fused == unfused forward and gradients on zoo model ``name``, with fewer dots."""
  case = zoo.BUILDERS[name]()
  lora = jlora.init(case.tree, case.config, key=K[7], apply_fn=case.apply_fn, example_args=(case.inputs,))
  ys, gs, dots = {}, {}, {}
  for fuse in (True, False):
    apply = jlora.wrap(case.apply_fn, case.config, strategy="factorized", fuse_siblings=fuse)
    loss = lambda lo, apply=apply: zoo.loss_fn(case, apply(case.tree, lo, case.inputs))  # noqa: E731
    ys[fuse] = jax.jit(apply)(case.tree, lora, case.inputs)
    gs[fuse] = jax.jit(jax.grad(loss))(lora)
    dots[fuse] = _dots(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)
  assert dots[True] < dots[False]
  scale = float(jnp.max(jnp.abs(ys[False])))
  np.testing.assert_allclose(ys[True], ys[False], rtol=1e-5, atol=1e-6 * scale)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(gs[True]), jax.tree_util.tree_leaves(gs[False])):
    s = float(jnp.max(jnp.abs(b))) + 1e-12
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * s, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("name", ["mha_tied", "nnx"])  # the other zoo models: tests/e2e/test_zoo_sweeps.py
def test_zoo_fused_matches_unfused(name):
  check_zoo_fused_matches_unfused(name)


def test_siblings_put_each_first_product_for_its_equation_and_fused_hands_it_over():
  """The pass computes ``x @ concat(A_q, A_k)`` at the first sibling, split per equation; `fused`
  gives each equation's rule its own part, once."""
  x = jax.random.normal(K[6], (5, D))
  closed = jax.make_jaxpr(lambda x, wq, wk: (x @ wq, x @ wk))(x, PARAMS["q"]["w"], PARAMS["k"]["w"])
  q, k = kernel(PARAMS["q"]["w"], (0,), (1,), r=2), kernel(PARAMS["k"]["w"], (0,), (1,), r=3)
  ctx = context()
  env = dict(zip(closed.jaxpr.invars, [x, q, k]))
  siblings = fusion.Siblings(closed.jaxpr, env, ctx, evaluator.eval_eqn)
  siblings.fuse_at(0)
  dot_q, dot_k = closed.jaxpr.eqns
  np.testing.assert_allclose(ctx.first_products[dot_q], x @ q.a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ctx.first_products[dot_k], x @ k.a, rtol=1e-5, atol=1e-5)
  seen = []
  rule = fusion.fused(lambda eqn, invals, ctx, first: seen.append(first) or ["out"])
  assert rule(dot_q, [x, q], ctx) == ["out"] and seen[-1] is not None
  assert rule(dot_q, [x, q], ctx) == ["out"] and seen[-1] is None  # taken once
  off = context(fuse_siblings=False)
  fusion.Siblings(closed.jaxpr, env, off, evaluator.eval_eqn).fuse_at(0)
  assert not off.first_products
