"""The wrapped apply: factorized == merged for every supported op, forward and gradients.

Every case is a plain function of a params dict, so each op is exercised directly;
the zoo (test_zoo.py) covers the same ops through Flax Linen and NNX models.
"""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora._src.core import paths
from tests import zoo
from tests._jaxpr import out_shapes

K = jax.random.split(jax.random.key(0), 8)
X = jax.random.normal(K[0], (3, 5, 8))  # (batch, seq, d)


def _check(fn, params, targets, *args, rtol=1e-5, layout_pattern=None, infer=True):
  """fn(params, *args) computed by jlora.wrap == on merged params, forward and gradient."""
  cfg = jlora.LoraConfig(
    r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False, layout_pattern=layout_pattern
  )
  kw = dict(apply_fn=fn, example_args=args) if infer else {}
  lora = jlora.init(params, cfg, key=K[1], **kw)
  apply = jlora.wrap(fn, cfg, strategy="factorized")
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.MaterializationWarning)
    got = jax.jit(apply)(params, lora, *args)
  # The references compiled whole too (eagerly, every operation would be a program of its own).
  want = jax.jit(lambda lo: fn(jlora.merge(params, lo, cfg), *args))(lora)
  base = jax.jit(fn)(params, *args)
  assert float(jnp.max(jnp.abs(want - base))) > 1e-3
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)

  def loss(lo, f):
    return jnp.sum(jnp.sin(f(lo)))

  g = jax.jit(jax.grad(loss), static_argnums=1)(lora, lambda lo: apply(params, lo, *args))
  g_ref = jax.jit(jax.grad(loss), static_argnums=1)(lora, lambda lo: fn(jlora.merge(params, lo, cfg), *args))
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
    s = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=10 * rtol * s, err_msg=jax.tree_util.keystr(p))
  return cfg, lora


def _w(*shape, key=K[2]):
  return jax.random.normal(key, shape) / np.sqrt(shape[0])


# -- dot_general ----------------------------------------------------------------


def test_dense():
  _check(lambda p, x: x @ p["fc"]["kernel"], {"fc": {"kernel": _w(8, 6)}}, ("fc",), X)


def test_transposed_kernel_pytorch_layout():
  # An (out, in) kernel used as x @ W.T: the contraction lands on B's side; (x @ B^T) @ A^T is used.
  _check(lambda p, x: x @ p["fc"]["w"].T, {"fc": {"w": _w(6, 8)}}, ("fc",), X)


def test_dense_general_and_out_projection():
  def fn(p, x):
    q = jnp.einsum("btd,dnh->btnh", x, p["q"]["kernel"])
    return jnp.einsum("btnh,nhd->btd", q, p["o"]["kernel"])

  cfg, lora = _check(
    fn, {"q": {"kernel": _w(8, 2, 4)}, "o": {"kernel": _w(2, 4, 8, key=K[3])}}, ("q", "o"), X
  )
  assert lora["q"]["kernel"]["lora_A"].shape == (8, 3) and lora["o"]["kernel"]["lora_A"].shape == (2, 4, 3)


def test_kernel_reshaped_before_use():
  def fn(p, x):
    w = p["qkv"]["kernel"].reshape(8, 2, 4)  # fan-out axis split into (heads, head_dim)
    return jnp.einsum("btd,dnh->bnth", x, w)

  _check(fn, {"qkv": {"kernel": _w(8, 8)}}, ("qkv",), X)


def test_kernel_with_dot_batch_axis():
  def fn(p, x):  # one kernel per batch row: the batch axis is a stacked axis
    return jnp.einsum("bti,bio->bto", x, p["per"]["kernel"])

  cfg, lora = _check(fn, {"per": {"kernel": _w(3, 8, 6)}}, ("per",), X)
  assert lora["per"]["kernel"]["lora_A"].shape == (3, 8, 3)


def test_sliced_kernel():
  _check(lambda p, x: x @ p["fc"]["kernel"][:, 1:5], {"fc": {"kernel": _w(8, 6)}}, ("fc",), X)


def test_cast_to_bf16():
  def fn(p, x):
    return (x.astype(jnp.bfloat16) @ p["fc"]["kernel"].astype(jnp.bfloat16)).astype(jnp.float32)

  _check(fn, {"fc": {"kernel": _w(8, 6)}}, ("fc",), X, rtol=2e-2)


def test_tied_embedding_attend():
  def fn(p, x):
    return x @ p["embed"]["embedding"].T

  _check(fn, {"embed": {"embedding": _w(11, 8)}}, ("embed",), X)


# -- conv and gather ----------------------------------------------------------------


@pytest.mark.parametrize(
  "strides, padding, dilation",
  [((1, 1), "SAME", (1, 1)), ((2, 1), "VALID", (1, 2)), ((1, 2), ((1, 0), (2, 1)), (1, 1))],
)
def test_conv2d(strides, padding, dilation):
  imgs = jax.random.normal(K[4], (2, 9, 9, 3))

  def fn(p, x):
    return lax.conv_general_dilated(
      x,
      p["conv"]["kernel"],
      strides,
      padding,
      rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  cfg, lora = _check(fn, {"conv": {"kernel": _w(3, 3, 3, 5)}}, ("conv",), imgs)
  assert lora["conv"]["kernel"]["lora_A"].shape == (3, 3, 3, 3)


def test_conv_nchw_oihw_layout():
  imgs = jax.random.normal(K[4], (2, 3, 7, 7))

  def fn(p, x):  # kernel stored HWIO, transposed to OIHW for an NCHW conv
    w = jnp.transpose(p["conv"]["kernel"], (3, 2, 0, 1))
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))

  _check(fn, {"conv": {"kernel": _w(3, 3, 3, 4)}}, ("conv",), imgs)


def test_conv1d():
  seq = jax.random.normal(K[4], (2, 10, 4))

  def fn(p, x):
    return lax.conv_general_dilated(
      x, p["c"]["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )

  _check(fn, {"c": {"kernel": _w(3, 4, 6)}}, ("c",), seq)


@pytest.mark.parametrize("lookup", ["index", "take"])
def test_embedding_gather(lookup):
  ids = jnp.array([[0, 3, 10], [2, 2, 7]])

  def fn(p, ids):
    table = p["embed"]["embedding"]
    return table[ids] if lookup == "index" else jnp.take(table, ids, axis=0)

  _check(fn, {"embed": {"embedding": _w(11, 8)}}, ("embed",), ids)


# -- through transformations and control flow -------------------------------------


def test_inner_jit_remat_and_vmap():
  def fn(p, x):
    h = jax.jit(lambda x, w: x @ w)(x, p["a"]["kernel"])
    h = jax.checkpoint(lambda h: jnp.tanh(h @ p["b"]["kernel"]))(h)
    return jax.vmap(lambda row: row @ p["c"]["kernel"])(h)

  params = {
    "a": {"kernel": _w(8, 8)},
    "b": {"kernel": _w(8, 8, key=K[3])},
    "c": {"kernel": _w(8, 4, key=K[4])},
  }
  _check(fn, params, ("a", "b", "c"), X)


def test_custom_jvp_and_custom_vjp():
  @jax.custom_jvp
  def dense_jvp(x, w):
    return x @ w

  dense_jvp.defjvp(
    lambda primals, tangents: (dense_jvp(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1])
  )

  @jax.custom_vjp
  def dense_vjp(x, w):
    return x @ w

  dense_vjp.defvjp(
    lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, jnp.einsum("...i,...o->io", res[0], g))
  )

  def fn(p, x):
    return dense_vjp(jnp.tanh(dense_jvp(x, p["a"]["kernel"])), p["b"]["kernel"])

  _check(fn, {"a": {"kernel": _w(8, 8)}, "b": {"kernel": _w(8, 4, key=K[3])}}, ("a", "b"), X)


def test_scan_over_stacked_kernel():
  def fn(p, x):
    def body(h, w):
      return jnp.tanh(h @ w), None

    return lax.scan(body, x, p["layers"]["kernel"])[0]

  cfg, lora = _check(fn, {"layers": {"kernel": _w(4, 8, 8)}}, ("layers",), X)
  assert lora["layers"]["kernel"]["lora_A"].shape == (4, 8, 3)


def test_fori_loop_and_cond():
  def fn(p, x):
    w = p["fc"]["kernel"]
    stacked = p["st"]["kernel"]
    h = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w + h @ stacked[i]), x)
    return lax.cond(jnp.sum(x) > 0, lambda h: h @ w, lambda h: -(h @ w), h)

  params = {"fc": {"kernel": _w(8, 8)}, "st": {"kernel": _w(3, 8, 8, key=K[3])}}
  _check(fn, params, ("fc", "st"), X, layout_pattern={"st": (1, 1)})


_NEEDS_UNSTACK = pytest.mark.skipif(not hasattr(lax, "unstack"), reason="this jax has no `lax.unstack`")


@_NEEDS_UNSTACK
def test_unstack_follows_the_kernel_view():
  # `lax.unstack` is what iterating over an array binds from jax 0.11 (`for w in kernel`; jax 0.10
  # sliced and squeezed): a stacked axis in the middle ("iso", read from the unstack), and a fan-out
  # axis that only B carries.
  def fn(p, x):
    h = x
    for w in lax.unstack(p["st"]["kernel"], axis=1):
      h = jnp.tanh(h @ w)
    a, b = lax.unstack(p["fo"]["kernel"], axis=2)
    return h @ a + jnp.sin(h @ b)

  params = {"st": {"kernel": _w(8, 2, 8)}, "fo": {"kernel": _w(8, 6, 2, key=K[3])}}
  cfg, lora = _check(fn, params, ("st", "fo"), X, layout_pattern={"fo": "ioo"})
  st = lora["st"]["kernel"]
  assert st["lora_A"].shape == (8, 2, 3) and st["lora_B"].shape == (3, 2, 8)  # "iso": one adapter per layer


@_NEEDS_UNSTACK
def test_unstacked_product_splits_a_fused_kernel():
  # gemma's `k, v = einsum(x, kv)` on jax 0.11: the product's fused axis, taken apart entry by
  # entry, is stacked (one adapter for k, one for v).
  def fn(p, x):
    k, v = lax.unstack(jnp.einsum("btd,cdh->cbth", x, p["kv"]["kernel"]))
    return k * jnp.tanh(v)

  _, lora = _check(fn, {"kv": {"kernel": _w(2, 8, 4)}}, ("kv",), X)
  kv = lora["kv"]["kernel"]
  assert kv["lora_A"].shape == (2, 8, 3) and kv["lora_B"].shape == (2, 3, 4)  # "sio"


# -- materialisation, strategies, dropout, tracing ------------------------------------


def test_unsupported_use_materialises_with_one_warning():
  def fn(p, x):
    w = p["fc"]["kernel"]
    return x @ w + jnp.sum(w * w) + jnp.max(w)

  params = {"fc": {"kernel": _w(8, 6)}}
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[1])
  apply = jlora.wrap(fn, cfg)
  with pytest.warns(jlora.MaterializationWarning, match=r"'fc/kernel' reaches primitive `mul`") as rec:
    got = apply(params, lora, X)
  assert len(rec) == 1
  np.testing.assert_allclose(got, fn(jlora.merge(params, lora, cfg), X), rtol=1e-5, atol=1e-5)


def _dots(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _dots(sub)
  return out


def test_strategies():
  params = {"fc": {"kernel": _w(8, 6)}}
  fn = lambda p, x: x @ p["fc"]["kernel"]
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[1])
  want = fn(jlora.merge(params, lora, cfg), X)
  for strategy in ("auto", "factorized", "merged"):
    np.testing.assert_allclose(
      jlora.wrap(fn, cfg, strategy=strategy)(params, lora, X), want, rtol=1e-5, atol=1e-6
    )
  many = jnp.ones((64, 8))  # 64 tokens > 8*6/(8+6): merged costs fewer FLOPs for inference
  auto = jlora.wrap(fn, cfg, strategy="auto")
  assert (8, 6) in _dots(jax.make_jaxpr(auto)(params, lora, many).jaxpr)  # A @ B formed once
  few = jnp.ones((1, 8))
  assert (8, 6) not in _dots(jax.make_jaxpr(auto)(params, lora, few).jaxpr)
  # With gradients flowing into the adapter, auto is factorized whatever the token count.
  grad_jaxpr = jax.make_jaxpr(jax.grad(lambda lo: jnp.sum(auto(params, lo, many))))(lora).jaxpr
  assert (8, 6) not in _dots(grad_jaxpr)
  with pytest.raises(ValueError, match="`strategy` must be one of"):
    jlora.wrap(fn, cfg, strategy="fused")


def test_no_base_sized_gradient_in_train_step():
  case = zoo.BUILDERS["llama"]()
  cfg = jlora.LoraConfig(r=4, target_modules="all-linear")
  lora = jlora.init(case.tree, cfg, key=K[1])
  kernel_shapes = {
    tuple(n["lora_A"].shape[:-1] + n["lora_B"].shape[1:]) for _, n in paths.adapter_items(lora)
  }
  apply = jlora.wrap(case.apply_fn, cfg)
  step = jax.grad(lambda lo: zoo.loss_fn(case, apply(case.tree, lo, case.inputs)))
  shapes = set(_dots(jax.make_jaxpr(step)(lora).jaxpr))
  assert not shapes & kernel_shapes, shapes & kernel_shapes
  # The same check on a merge-then-apply step finds them: the test can fail.
  merged_step = jax.grad(
    lambda lo: zoo.loss_fn(case, case.apply_fn(jlora.merge(case.tree, lo, cfg), case.inputs))
  )
  assert set(_dots(jax.make_jaxpr(merged_step)(lora).jaxpr)) & kernel_shapes
  # And in the compiled HLO: no dot of a base kernel's shape in the backward pass.
  hlo = jax.jit(step).lower(lora).compile().as_text()
  for s in kernel_shapes:
    assert f"f32[{','.join(map(str, s))}]{{1,0}} dot(" not in hlo


def test_dropout():
  params = {"fc": {"kernel": _w(8, 6)}}
  fn = lambda p, x: x @ p["fc"]["kernel"]
  cfg = jlora.LoraConfig(r=4, target_modules=("fc",), init_lora_weights=False, lora_dropout=0.5)
  lora = jlora.init(params, cfg, key=K[1])
  apply = jax.jit(jlora.wrap(fn, cfg))
  evaluation = apply(params, lora, X)
  np.testing.assert_allclose(evaluation, fn(jlora.merge(params, lora, cfg), X), rtol=1e-5, atol=1e-6)
  a = apply(params, lora, X, lora_dropout_key=K[5])
  b = apply(params, lora, X, lora_dropout_key=K[5])
  c = apply(params, lora, X, lora_dropout_key=K[6])
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, evaluation)
  # Inverted dropout: the mean over keys is the evaluation output.
  keys = jax.random.split(K[7], 400)
  mean = jax.vmap(lambda k: apply(params, lora, X, lora_dropout_key=k))(keys).mean(0)
  lora_part = evaluation - fn(params, X)
  np.testing.assert_allclose(mean - fn(params, X), lora_part, atol=0.15 * float(jnp.max(jnp.abs(lora_part))))
  # Dropout touches only the LoRA branch: with B = 0 the output is the base model's.
  zero_b = jax.tree_util.tree_map(lambda x: x, lora)
  zero_b["fc"]["kernel"]["lora_B"] = jnp.zeros_like(lora["fc"]["kernel"]["lora_B"])
  np.testing.assert_array_equal(apply(params, zero_b, X, lora_dropout_key=K[5]), fn(params, X))
  with pytest.raises(ValueError, match="LoRA dropout needs the factorized path"):
    jlora.wrap(fn, cfg, strategy="merged")(params, lora, X, lora_dropout_key=K[5])


def test_dropout_inside_scan_differs_per_layer():
  # Two identical layers, each applied to the same input: their outputs differ only if each layer
  # draws its own dropout mask.
  def fn(p, x):
    return lax.scan(lambda h, w: (h, x @ w), x, p["layers"]["kernel"])[1]

  w = _w(8, 8)
  params = {"layers": {"kernel": jnp.stack([w, w])}}
  cfg = jlora.LoraConfig(
    r=4,
    target_modules=("layers",),
    lora_dropout=0.3,
    init_lora_weights=False,
    layout_pattern={"layers": (1, 1)},
  )
  lora = jlora.init(params, cfg, key=K[1])
  lora = jax.tree_util.tree_map(lambda f: jnp.stack([f[0], f[0]]), lora)  # same adapter in both layers
  apply = jlora.wrap(fn, cfg)
  evaluation = apply(params, lora, X)
  np.testing.assert_array_equal(evaluation[0], evaluation[1])  # without dropout the layers agree
  out = apply(params, lora, X, lora_dropout_key=K[5])
  assert out.shape == (2, *X.shape)
  for layer in (0, 1):  # dropout reaches each layer's LoRA branch...
    assert not np.allclose(out[layer], evaluation[layer], atol=1e-4)
  assert not np.allclose(out[0], out[1], atol=1e-4)  # ...with a mask of its own


def test_init_is_exactly_the_base_model():
  case = zoo.BUILDERS["llama"]()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
  lora = jlora.init(case.tree, cfg, key=K[1])
  got = jax.jit(jlora.wrap(case.apply_fn, cfg))(case.tree, lora, case.inputs)
  np.testing.assert_array_equal(got, jax.jit(case.apply_fn)(case.tree, case.inputs))


def test_no_retrace_across_steps():
  case = zoo.BUILDERS["llama"]()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj", "v_proj"))
  lora = jlora.init(case.tree, cfg, key=K[1])
  apply = jlora.wrap(case.apply_fn, cfg)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(lo):
    g = jax.grad(lambda lo: zoo.loss_fn(case, apply(case.tree, lo, case.inputs)))(lo)
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, lo, g)

  for _ in range(4):
    lora = step(lora)
  # Eager calls reuse the traced jaxpr too: the model is traced once, at the first.
  traces = []

  def counted(tree, x):
    traces.append(x.shape)
    return case.apply_fn(tree, x)

  eager = jlora.wrap(counted, cfg)
  first = eager(case.tree, lora, case.inputs)
  assert len(traces) == 1
  np.testing.assert_array_equal(eager(case.tree, lora, case.inputs), first)
  assert len(traces) == 1


def test_embedding_update_is_never_materialised():
  table = {"embed": {"embedding": _w(50, 8)}}
  fn = lambda p, ids: p["embed"]["embedding"][ids]
  cfg = jlora.LoraConfig(r=2, target_modules=("embed",), init_lora_weights=False)
  lora = jlora.init(table, cfg, key=K[1])
  apply = jlora.wrap(fn, cfg, strategy="factorized")
  ids = jnp.array([[1, 2, 3]])
  step = jax.grad(lambda lo: jnp.sum(apply(table, lo, ids) ** 2))
  for jaxpr in (jax.make_jaxpr(apply)(table, lora, ids).jaxpr, jax.make_jaxpr(step)(lora).jaxpr):
    assert (50, 8) not in out_shapes(jaxpr)


def test_scanned_base_is_not_copied_or_restacked():
  case = zoo.BUILDERS["llama_scan"]()
  cfg = jlora.LoraConfig(r=4, target_modules="all-linear")
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  apply = jlora.wrap(case.apply_fn, cfg)
  stacked = {tuple(x.shape) for x in jax.tree_util.tree_leaves(case.tree["params"]["layers"]) if x.ndim == 3}
  step = jax.grad(lambda lo: zoo.loss_fn(case, apply(case.tree, lo, case.inputs)))
  assert not stacked & set(out_shapes(jax.make_jaxpr(step)(lora).jaxpr))


def test_bias_joins_the_base_product_before_the_lora_branch():
  # (x @ W + b) + lora, as a hand-written LoRA layer associates it: XLA then keeps one
  # pre-activation residual instead of two (benchmarks/lora_step.py measures the temp bytes).
  model = nn.Dense(6)
  params = model.init(K[2], X)
  cfg = jlora.LoraConfig(r=2, target_modules=r".*", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[1])
  jaxpr = jax.make_jaxpr(jlora.wrap(model.apply, cfg, strategy="factorized"))(params, lora, X).jaxpr
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  last = producer[jaxpr.outvars[0]]
  assert last.primitive.name == "add"
  first, second = (producer.get(v) for v in last.invars)
  if second.primitive.name == "custom_jvp_call":  # the rank-r product (jlora._src.interpret.contractions)
    second = second.params["call_jaxpr"].jaxpr.eqns[-1]
  assert first.primitive.name == "add" and second.primitive.name == "dot_general"  # (base + b) + lora
  assert producer[first.invars[0]].primitive.name == "dot_general"
  np.testing.assert_allclose(
    jlora.wrap(model.apply, cfg)(params, lora, X),
    model.apply(jlora.merge(params, lora, cfg), X),
    rtol=1e-5,
    atol=1e-5,
  )


def test_hlo_keeps_the_model_module_names():
  # Profiles of a wrapped model read like the model's own: ops, the LoRA branch included, keep their
  # Flax module scope in the HLO metadata.
  case = zoo.BUILDERS["llama"]()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(case.tree, cfg, key=K[1])
  text = jax.jit(jlora.wrap(case.apply_fn, cfg)).lower(case.tree, lora, case.inputs).as_text(debug_info=True)
  assert "Llama/layers_0/q_proj/" in text and "Llama/layers_1/q_proj/" in text


def test_signature_inserts_lora_and_the_dropout_key():
  import inspect  # noqa: PLC0415

  def fn(params, x, *, train: bool = False, **kwargs):
    return x

  got = inspect.signature(jlora.wrap(fn, jlora.LoraConfig(target_modules=("q",))))
  assert list(got.parameters) == ["params", "lora", "x", "train", "lora_dropout_key", "kwargs"]
  assert got.parameters["lora"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
  assert got.parameters["lora_dropout_key"].kind is inspect.Parameter.KEYWORD_ONLY
  assert got.parameters["lora_dropout_key"].default is None
  model = nn.Dense(3)
  names = list(inspect.signature(jlora.wrap(model.apply, jlora.LoraConfig(target_modules=("q",)))).parameters)
  assert names[:3] == ["variables", "lora", "args"] and names[-2:] == ["lora_dropout_key", "kwargs"]
  positional_only = inspect.signature(jlora.wrap(lambda p, /, x: x, jlora.LoraConfig(target_modules=("q",))))
  assert positional_only.parameters["lora"].kind is inspect.Parameter.POSITIONAL_ONLY
  # A signature that cannot be extended (no first positional parameter): the wrapper's own.
  plain = inspect.signature(jlora.wrap(lambda *a: a, jlora.LoraConfig(target_modules=("q",))))
  assert list(plain.parameters) == ["tree", "lora", "args", "lora_dropout_key", "kwargs"]


def test_all_linear_requires_the_linear_weights_of_this_call_only():
  params = {"enc": {"kernel": jnp.ones((8, 4)) * 0.1, "w": jnp.ones((4, 4)) * 0.2}}
  full = lambda p, x: (x @ p["enc"]["kernel"]) @ p["enc"]["w"]  # noqa: E731
  half = lambda p, x: x @ p["enc"]["kernel"]  # noqa: E731
  x = X[0]
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[1], apply_fn=full, example_args=(x,))
  assert set(lora["enc"]) == {"kernel", "w"}  # `w` is found by its use
  for fn in (full, half):  # an adapter on a weight this call does not use is allowed
    np.testing.assert_allclose(
      jlora.wrap(fn, cfg)(params, lora, x), fn(jlora.merge(params, lora, cfg), x), rtol=1e-5, atol=1e-6
    )
  without_w = {"enc": {"kernel": lora["enc"]["kernel"]}}
  np.testing.assert_allclose(
    jlora.wrap(half, cfg)(params, without_w, x), half(jlora.merge(params, lora, cfg), x), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match=r"no adapter for \['enc/w'\].*given the model"):
    jlora.wrap(full, cfg)(params, without_w, x)
  # Under jit the check runs at trace time, once.
  jitted = jax.jit(chex.assert_max_traces(jlora.wrap(full, cfg), n=1))
  jitted(params, lora, x)
  jitted(params, lora, x + 1.0)


# -- "auto" never forms a kernel-sized gradient or a per-adapter kernel --------------------------------


def _auto_case(tokens):
  params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (16, 24))}}
  fn = lambda p, x: jnp.tanh(x @ p["w"]["kernel"])  # noqa: E731
  cfg = jlora.LoraConfig(r=2, target_modules=("w",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (tokens, 16))
  return params, fn, cfg, lora, x


def _close(got, want):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_grad_of_a_jitted_auto_apply_has_factorized_gradients():
  params, fn, cfg, lora, x = _auto_case(512)  # many tokens: the jitted forward merges
  jitted = jax.jit(jlora.wrap(fn, cfg))
  step = jax.grad(lambda lo: jnp.sum(jitted(params, lo, x) ** 2))
  forward = out_shapes(jax.make_jaxpr(jitted)(params, lora, x).jaxpr).count((16, 24))
  assert forward >= 1  # the merged kernel of the forward
  assert out_shapes(jax.make_jaxpr(step)(lora).jaxpr).count((16, 24)) == forward  # no kernel-sized cotangent
  _close(step(lora), jax.grad(lambda lo: jnp.sum(fn(jlora.merge(params, lo, cfg), x) ** 2))(lora))


def test_vmap_over_adapters_forms_no_per_adapter_kernel():
  params, fn, cfg, lora, x = _auto_case(512)
  bank = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, -a]), lora)
  run = jax.vmap(lambda lo: jlora.wrap(fn, cfg)(params, lo, x))
  assert (3, 16, 24) not in out_shapes(jax.make_jaxpr(run)(bank).jaxpr)
  got = run(bank)
  for k in range(3):
    one = jax.tree_util.tree_map(lambda a: a[k], bank)  # noqa: B023
    np.testing.assert_allclose(got[k], fn(jlora.merge(params, one, cfg), x), rtol=1e-5, atol=1e-5)


def test_scan_over_micro_batches_under_grad_is_factorized():
  params, fn, cfg, lora, x = _auto_case(512)
  apply = jlora.wrap(fn, cfg)

  def loss(lo):
    def micro(total, xb):
      return total + jnp.sum(apply(params, lo, xb) ** 2), None

    return jax.lax.scan(micro, 0.0, x.reshape(4, 128, 16))[0]

  assert (16, 24) not in out_shapes(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)
  _close(jax.grad(loss)(lora), jax.grad(lambda lo: jnp.sum(fn(jlora.merge(params, lo, cfg), x) ** 2))(lora))
