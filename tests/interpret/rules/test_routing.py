"""A bank routed per example (`jlora.wrap(apply, bank.config)(..., adapter_ids=)`): each example's output
equals the model run alone with its own adapter merged; gradients reach only the adapters used."""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jlora
from jlora._src.interpret.rules import routing as interpreter_routing
from tests import zoo
from tests._jaxpr import out_shapes

DESIGNS = ("gather", "ragged")
IDS = (0, 2, -1, 1)

# Per zoo model: three adapters' (r, alpha, rslora, targets): ranks, scales and targets all differ.
ADAPTERS = {
  "llama": [
    (4, 8.0, False, ("q_proj", "v_proj")),
    (2, 3.0, False, ("q_proj", "up_proj", "down_proj", "embed_tokens")),
    (3, 3.0, True, ("o_proj", "lm_head")),
  ],
  "llama_scan": [  # nn.scan-stacked layers (remat inside)
    (4, 8.0, False, ("q_proj", "v_proj")),
    (2, 3.0, False, ("q_proj", "gate_proj", "down_proj")),
    (3, 5.0, False, ("o_proj", "lm_head")),
  ],
  "gemma_style": [  # N-D einsums, fused kv, an embedding table used by lookup and as the tied head
    (2, 4.0, False, ("q_einsum", "kv_einsum")),
    (3, 2.0, False, ("attn_vec_einsum", "gating_einsum", "linear")),
    (4, 6.0, False, ("input_embedding", "q_einsum")),
  ],
  "mha_tied": [  # DenseGeneral (heads), nn.jit, an nn.Embed used by lookup and attend
    (2, 4.0, False, ("query", "value")),
    (3, 2.0, False, ("out", "mlp", "embed")),
    (4, 6.0, False, ("embed",)),
  ],
}


def _tokens():
  return jax.random.randint(jax.random.key(7), (len(IDS), zoo.SEQ), 0, zoo.VOCAB)


@functools.cache
def _setup(name):
  case = zoo.BUILDERS[name]()
  tokens = _tokens()
  pairs = []
  for i, (r, alpha, rslora, names) in enumerate(ADAPTERS[name]):
    cfg = jlora.LoraConfig(
      r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=names, init_lora_weights=False
    )
    key = jax.random.key(10 + i)
    lora = jlora.init(case.tree, cfg, key=key, apply_fn=case.apply_fn, example_args=(tokens,))
    pairs.append((lora, cfg))
  return case, tokens, pairs, jlora.stack(pairs, names=["a", "b", "c"])


# The references compiled whole (eagerly, every operation of the model would be a program of its own).
_jit = functools.cache(jax.jit)


def _alone(case, pairs, i, x):
  """The model run alone on ``x`` with adapter ``i`` merged (``-1``: the base)."""
  tree = case.tree if i < 0 else jlora.merge(case.tree, *pairs[i])
  return _jit(case.apply_fn)(tree, x)


def _close(got, want, rtol=1e-5):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))


def check_each_example_equals_its_adapter_alone(name, design):
  """Zoo model ``name``'s bank routed by ``design``: each example's output is its adapter's, merged, alone."""
  case, tokens, pairs, bank = _setup(name)
  apply = jax.jit(jlora.wrap(case.apply_fn, bank.config, routing=design))
  out = apply(case.tree, bank.lora, tokens, adapter_ids=jnp.array(IDS))
  for e, i in enumerate(IDS):
    want = _alone(case, pairs, i, tokens[e : e + 1])
    if i >= 0:  # the adapter changes this example's output: the comparison has teeth
      assert float(jnp.max(jnp.abs(want - _alone(case, pairs, -1, tokens[e : e + 1])))) > 1e-3
    _close(out[e : e + 1], want)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("name", ["llama", "mha_tied"])  # the other models: tests/e2e/test_zoo_sweeps.py
def test_each_example_equals_its_adapter_alone(name, design):
  check_each_example_equals_its_adapter_alone(name, design)


def test_new_ids_do_not_retrace_and_order_follows_ids():
  case, tokens, pairs, bank = _setup("llama")
  apply = jlora.wrap(case.apply_fn, bank.config)
  traced = chex.assert_max_traces(lambda t, lo, x, ids: apply(t, lo, x, adapter_ids=ids), n=1)
  fn = jax.jit(traced)
  for ids in ([0, 1, 2, -1], [2, 2, 2, 2], [-1, -1, 0, 0], [1, 0, 1, 0]):
    out = fn(case.tree, bank.lora, tokens, jnp.array(ids, jnp.int32))
    for e, i in enumerate(ids):
      _close(out[e : e + 1], _alone(case, pairs, i, tokens[e : e + 1]))


def check_gradients_reach_only_the_adapters_used(name, design):
  """Zoo model ``name``'s bank routed by ``design``: unused adapters get no gradient, used ones their own."""
  case, tokens, pairs, bank = _setup(name)
  ids = (2, 1, 2, -1)  # adapter "a" (0) is unused; "b" adapts the embedding too
  apply = jlora.wrap(case.apply_fn, bank.config, routing=design)
  loss = lambda lo: jnp.sum(jnp.sin(apply(case.tree, lo, tokens, adapter_ids=jnp.array(ids))))  # noqa: E731
  grads = jax.jit(jax.grad(loss))(bank.lora)
  for leaf in jax.tree.leaves(grads):
    np.testing.assert_array_equal(leaf[0], 0.0)  # exactly zero, not merely small
  g_bank = jlora.Bank(grads, bank.config)
  for k in (1, 2):
    lora_k, cfg_k = pairs[k]
    mine = [e for e, i in enumerate(ids) if i == k]

    def ref_loss(lo, cfg_k=cfg_k, mine=mine):
      merged = jlora.merge(case.tree, lo, cfg_k)
      return sum(jnp.sum(jnp.sin(case.apply_fn(merged, tokens[e : e + 1]))) for e in mine)

    want = jax.jit(jax.grad(ref_loss))(lora_k)
    got, _ = g_bank.adapter(k)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      s = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * s, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("name", ["llama"])  # llama_scan: tests/e2e/test_zoo_sweeps.py
def test_gradients_reach_only_the_adapters_used(name, design):
  check_gradients_reach_only_the_adapters_used(name, design)


@pytest.mark.parametrize("design", DESIGNS)
def test_no_kernel_sized_value_forward_or_backward(design):
  case, tokens, pairs, bank = _setup("llama")
  apply = jlora.wrap(case.apply_fn, bank.config, routing=design)
  ids = jnp.array(IDS)
  kernel_like = {(zoo.D, zoo.D), (zoo.D, zoo.FF), (zoo.FF, zoo.D), (zoo.D, zoo.VOCAB), (zoo.VOCAB, zoo.D)}
  fwd = jax.make_jaxpr(lambda lo: apply(case.tree, lo, tokens, adapter_ids=ids))(bank.lora)
  bwd = jax.make_jaxpr(jax.grad(lambda lo: jnp.sum(apply(case.tree, lo, tokens, adapter_ids=ids))))(bank.lora)
  for jaxpr in (fwd.jaxpr, bwd.jaxpr):
    shapes = out_shapes(jaxpr)
    assert not [s for s in shapes if s[-2:] in kernel_like], "a merged (per-example) kernel was formed"


@pytest.mark.parametrize("design", DESIGNS)
def test_dropout_is_the_single_adapter_dropout_per_example(design):
  case, tokens, _, _ = _setup("llama")
  cfgs = [
    jlora.LoraConfig(r=r, lora_alpha=4.0, lora_dropout=0.3, target_modules=("q_proj", "down_proj"))
    for r in (2, 4)
  ]
  pairs = [
    (jax.tree.map(lambda x: x + 0.1, jlora.init(case.tree, c, key=jax.random.key(i))), c)
    for i, c in enumerate(cfgs)
  ]
  bank = jlora.stack(pairs)
  key = jax.random.key(3)
  ids = (1, 0, 0, 1)
  out = jax.jit(jlora.wrap(case.apply_fn, bank.config, routing=design))(
    case.tree, bank.lora, tokens, adapter_ids=jnp.array(ids), lora_dropout_key=key
  )
  singles = [
    jax.jit(jlora.wrap(case.apply_fn, c))(case.tree, lo, tokens, lora_dropout_key=key) for lo, c in pairs
  ]
  no_drop = jax.jit(jlora.wrap(case.apply_fn, bank.config))(
    case.tree, bank.lora, tokens, adapter_ids=jnp.array(ids)
  )
  assert float(jnp.max(jnp.abs(out - no_drop))) > 1e-3  # dropout did something
  for e, i in enumerate(ids):
    _close(out[e], singles[i][e])


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("bank_spec", [PartitionSpec("adapters"), PartitionSpec()], ids=["sharded", "copies"])
def test_bank_sharded_or_replicated_with_a_sharded_batch(design, bank_spec):
  case, tokens, pairs, _ = _setup("llama")
  bank = jlora.stack(pairs + [pairs[0]])  # four adapters over four devices
  mesh = jax.make_mesh((4, 2), ("adapters", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  lora = jax.device_put(bank.lora, NamedSharding(mesh, bank_spec))
  x = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("data")))
  ids = jax.device_put(jnp.array([3, 1, -1, 2]), NamedSharding(mesh, PartitionSpec("data")))
  got = jax.jit(jlora.wrap(case.apply_fn, bank.config, routing=design))(case.tree, lora, x, adapter_ids=ids)
  for e, i in enumerate([0, 1, -1, 2]):
    _close(got[e : e + 1], _alone(case, pairs, i, tokens[e : e + 1]))


def test_traced_ids_out_of_range_give_nan_for_that_example_only():
  case, tokens, pairs, bank = _setup("llama")
  for design in DESIGNS:
    apply = jax.jit(jlora.wrap(case.apply_fn, bank.config, routing=design))
    out = apply(case.tree, bank.lora, tokens, adapter_ids=jnp.array([0, 3, -2, 1]))
    assert bool(jnp.all(jnp.isnan(out[1]))) and bool(jnp.all(jnp.isnan(out[2])))
    _close(out[0:1], _alone(case, pairs, 0, tokens[0:1]))
    _close(out[3:4], _alone(case, pairs, 1, tokens[3:4]))


def test_bad_ids_and_configs_are_errors():
  case, tokens, pairs, bank = _setup("llama")
  apply = jlora.wrap(case.apply_fn, bank.config)
  call = lambda ids, lo=bank.lora, x=tokens: apply(case.tree, lo, x, adapter_ids=ids)  # noqa: E731
  with pytest.raises(ValueError, match=r"needs `adapter_ids=`"):
    apply(case.tree, bank.lora, tokens)
  with pytest.raises(ValueError, match=r"\[3, -2\] \(at examples \[1, 2\]\) are out of range .* 3 adapters"):
    call(jnp.array([0, 3, -2, 1]))
  with pytest.raises(TypeError, match="must be integers"):
    call(jnp.array([0.0, 1.0, 2.0, 0.0]))
  with pytest.raises(ValueError, match=r"must be 1-D.* shape \(2, 2\)"):
    call(jnp.array([[0, 1], [2, 0]]))
  with pytest.raises(ValueError, match=r"leading axis to be the example axis \(size len\(adapter_ids\) = 3"):
    call(jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match="every leaf needs a leading adapter axis of size 3"):
    call(jnp.array(IDS), lo=pairs[0][0])
  single = jlora.wrap(case.apply_fn, pairs[0][1])
  with pytest.raises(ValueError, match="wraps one adapter's LoraConfig"):
    single(case.tree, pairs[0][0], tokens, adapter_ids=jnp.array(IDS))
  with pytest.raises(ValueError, match="never merged"):
    jlora.wrap(case.apply_fn, bank.config, strategy="merged")
  with pytest.raises(ValueError, match="`routing` must be one of"):
    jlora.wrap(case.apply_fn, bank.config, routing="loop")


def test_a_model_that_flattens_examples_is_an_error():
  params = {"proj": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
  fn = lambda p, x: (x.reshape(-1, 4) @ p["proj"]["kernel"]).reshape(x.shape[0], -1, 3)  # noqa: E731
  cfgs = [jlora.LoraConfig(r=r, target_modules=("proj",)) for r in (1, 2)]
  bank = jlora.stack([(jlora.init(params, c, key=jax.random.key(r)), c) for r, c in enumerate(cfgs)])
  x = jnp.ones((2, 5, 4))
  with pytest.raises(ValueError, match=r"'proj/kernel' is used in a product whose input has shape \(10, 4\)"):
    jlora.wrap(fn, bank.config)(params, bank.lora, x, adapter_ids=jnp.array([0, 1]))


def check_unroutable_uses_are_errors(name):
  """Zoo model ``name`` uses an adapted kernel in a way no bank routes per example: an error."""
  case = zoo.BUILDERS[name]()
  cfg = case.config
  key = jax.random.key(0)
  lora = jlora.init(case.tree, cfg, key=key, apply_fn=case.apply_fn, example_args=(case.inputs,))
  bank = jlora.stack([(lora, cfg), (lora, cfg)])
  ids = jnp.zeros((case.inputs.shape[0],), jnp.int32)
  with pytest.raises(ValueError, match=r"cannot be routed per example|leading axis to be the example axis"):
    jlora.wrap(case.apply_fn, bank.config)(case.tree, bank.lora, case.inputs, adapter_ids=ids)


@pytest.mark.parametrize("name", ["convnet"])  # moe_scan: tests/e2e/test_zoo_sweeps.py
def test_unroutable_uses_are_errors(name):
  check_unroutable_uses_are_errors(name)


def test_a_bank_for_another_base_is_an_error():
  case, tokens, _, bank = _setup("mha_tied")
  other = zoo.BUILDERS["llama"]()
  with pytest.raises(ValueError, match="matches no module of the tree"):
    jlora.wrap(other.apply_fn, bank.config)(other.tree, bank.lora, tokens, adapter_ids=jnp.array(IDS))


def test_signature_has_adapter_ids_for_a_bank_only():
  _, _, pairs, bank = _setup("llama")
  fn = lambda params, x, **kw: x  # noqa: E731
  assert list(inspect.signature(jlora.wrap(fn, bank.config)).parameters) == [
    "params",
    "lora",
    "x",
    "lora_dropout_key",
    "adapter_ids",
    "kw",
  ]
  assert "adapter_ids" not in inspect.signature(jlora.wrap(fn, pairs[0][1])).parameters
  assert "adapter_ids" not in inspect.signature(jlora.wrap(lambda *a: a, pairs[0][1])).parameters


def test_routing_index_arithmetic():
  route = interpreter_routing.routing(3, jnp.array([0, 2, -1, 1]), "gather", (0.1, 0.0, 0.5))
  np.testing.assert_array_equal(route.slots(), [0, 2, 3, 1])  # -1: slot N, no adapter
  np.testing.assert_allclose(route.per_example((2.0, 3.0, 4.0), jnp.float32), [2.0, 4.0, 0.0, 3.0])
  # Traced ids cannot be checked: out of range gives no adapter and a NaN scale.
  traced = jax.jit(
    lambda ids: interpreter_routing.routing(3, ids, "gather", (0.0,) * 3).per_example((1.0,) * 3, jnp.float32)
  )
  got = traced(jnp.array([3, -2, 0]))
  assert bool(jnp.isnan(got[0])) and bool(jnp.isnan(got[1])) and float(got[2]) == 1.0
  # The folded rank axis (adapter-major) comes apart as (N, ..., r).
  folded = jnp.arange(2 * 6).reshape(2, 6)  # (fan-in 2, N=3 adapters x r=2)
  np.testing.assert_array_equal(interpreter_routing._unfold(folded, 3)[1], [[2, 3], [8, 9]])


_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@pytest.mark.parametrize("dtype", _INT_DTYPES)
def test_traced_ids_of_every_integer_dtype_are_checked_before_any_cast(dtype):
  # Under jit the range check is in the ids' own dtype: an id that would wrap into [-1, N) when cast to
  # int32 (uint32 2**32 - 1 -> -1, int64 2**32 + 1 -> 1) gets no adapter and a NaN scale.
  n = 3
  info = np.iinfo(dtype)
  edges = [0, n - 1, n, int(info.max)] + ([-1, -2, int(info.min)] if info.min < 0 else [])
  edges += [e for e in (2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 2, -(2**32)) if info.min <= e <= info.max]
  want_slot = [e if 0 <= e < n else n for e in edges]
  bad = [not -1 <= e < n for e in edges]
  with jax.enable_x64(True):  # the 64-bit dtypes exist only with x64 on
    ids = np.array(edges, dtype)

    def per_example(ids):
      route = interpreter_routing.routing(n, ids, "gather", (0.0,) * n)
      return route.slots(), route.per_example((1.0, 2.0, 3.0), jnp.float32)

    slots, scale = jax.jit(per_example)(ids)
    np.testing.assert_array_equal(slots, want_slot)
    np.testing.assert_array_equal(np.isnan(scale), bad)
    np.testing.assert_array_equal(
      np.where(bad, 0.0, scale), [0.0 if b or e < 0 else e + 1.0 for e, b in zip(edges, bad)]
    )
    with pytest.raises(ValueError, match=r"out of range for a bank of 3 adapters"):  # concrete: an error
      interpreter_routing.routing(n, ids, "gather", (0.0,) * n)


def test_wrapped_uint32_max_and_int64_ids_that_wrap_give_nan_not_an_adapter():
  case, tokens, pairs, bank = _setup("llama")
  apply = jax.jit(jlora.wrap(case.apply_fn, bank.config))
  out = apply(case.tree, bank.lora, tokens, adapter_ids=np.array([0, 2**32 - 1, 1, 2], np.uint32))
  assert bool(jnp.all(jnp.isnan(out[1]))) and not bool(jnp.any(jnp.isnan(out[0::2])))
  _close(out[2:3], _alone(case, pairs, 1, tokens[2:3]))
  with jax.enable_x64(True):
    ids = np.array([2**32 + 1, 2**32, -(2**32), 0], np.int64)
    out = apply(case.tree, bank.lora, tokens, adapter_ids=ids)
  assert bool(jnp.all(jnp.isnan(out[:3])))
  _close(out[3:4], _alone(case, pairs, 0, tokens[3:4]))
