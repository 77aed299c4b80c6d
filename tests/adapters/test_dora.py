"""DoRA (``use_dora=True``): the factorized forward and gradient against the merged kernel and
against the formula written out by hand; the norms never form a kernel-sized update; init, merge,
checkpoints, sharding specs and the error paths. PEFT parity (files both ways, logits and
parameter counts): `tests/e2e/test_peft_families.py`; the zoo checks on the larger zoo models, and DoRA on
the MoE decoder's experts: `tests/e2e/test_zoo_sweeps.py`."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora._src.adapters import dora
from jlora._src.interpret.values import LoraValue
from tests import zoo
from tests._jaxpr import out_shapes

K = jax.random.split(jax.random.key(0), 8)


def _dora_formula(w, a, b, m, scale):
  """m * V / ||V|| for a 2-D (in, out) kernel, V = W + scale * A @ B, in numpy float64."""
  v = np.asarray(w, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return np.asarray(m, np.float64) * v / np.linalg.norm(v, axis=0)


# -- the zoo: wrapped == merged, forward and gradient ---------------------------------------------


def check_wrapped_equals_the_merged_dora_kernel(name):
  """DoRA on zoo model ``name``: the factorized forward and gradient equal the merged kernel's."""
  case = zoo.BUILDERS[name]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  x = case.inputs
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(x,))
  lora = zoo.trained(lora, K[2])
  apply = jlora.wrap(case.apply_fn, cfg, strategy="factorized")

  def merged_loss(lo):
    return zoo.loss_fn(case, case.apply_fn(jlora.merge(case.tree, lo, cfg), x))

  # Each side compiled whole: eagerly, every primitive of the model would be a program of its own.
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.MaterializationWarning)
    got = jax.jit(apply)(case.tree, lora, x)
    grads = jax.jit(jax.grad(lambda lo: zoo.loss_fn(case, apply(case.tree, lo, x))))(lora)
  want = jax.jit(lambda lo: case.apply_fn(jlora.merge(case.tree, lo, cfg), x))(lora)
  lora_only = jlora.wrap(case.apply_fn, dataclasses.replace(cfg, use_dora=False))
  plain = jax.tree_util.tree_map(lambda n: n, lora)
  for _, node in _adapters(plain):
    del node["lora_magnitude"]
  lora_out = jax.jit(lora_only)(case.tree, plain, x)
  assert float(jnp.max(jnp.abs(want - lora_out))) > 1e-3, "DoRA must differ from LoRA"
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
  want_grads = jax.jit(jax.grad(merged_loss))(lora)
  for (kp, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(
      g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))), err_msg=jax.tree_util.keystr(kp)
    )


@pytest.mark.parametrize("name", ["plain", "mha_tied"])  # the other zoo models: tests/e2e/test_zoo_sweeps.py
def test_wrapped_equals_the_merged_dora_kernel(name):
  check_wrapped_equals_the_merged_dora_kernel(name)


def _adapters(tree, prefix=()):
  if isinstance(tree, dict) and "lora_A" in tree:
    yield prefix, tree
  elif isinstance(tree, dict):
    for k, v in tree.items():
      yield from _adapters(v, prefix + (k,))


# -- the formula, written out ---------------------------------------------------------------------


def _dense_case(bias: bool):
  w = jax.random.normal(K[0], (12, 7))
  params = {"fc": {"kernel": w, "bias": jax.random.normal(K[1], (7,))}}

  def apply_fn(p, x):
    y = x @ p["fc"]["kernel"]
    return y + p["fc"]["bias"] if bias else y

  return params, apply_fn


def test_dense_dora_is_the_weight_decomposed_kernel_plus_bias():
  params, apply_fn = _dense_case(bias=True)
  cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("fc",), init_lora_weights=False, use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
  node = lora["fc"]["kernel"]
  x = jax.random.normal(K[4], (5, 12))
  got = jlora.wrap(apply_fn, cfg)(params, lora, x)
  kernel = _dora_formula(params["fc"]["kernel"], node["lora_A"], node["lora_B"], node["lora_magnitude"], 2.0)
  want = np.asarray(x, np.float64) @ kernel + np.asarray(params["fc"]["bias"])  # the bias is not rescaled
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_rescales_the_dropped_input_as_peft_does():
  # PEFT under dropout: x @ W + (g - 1) * (drop(x) @ W) + g * scale * drop(x) @ A @ B.
  params, apply_fn = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.5, target_modules=("fc",), use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
  node, w = lora["fc"]["kernel"], np.asarray(params["fc"]["kernel"], np.float64)
  x = jax.random.normal(K[4], (5, 12))
  key = jax.random.key(7)
  got = jlora.wrap(apply_fn, cfg)(params, lora, x, lora_dropout_key=key)
  keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, x.shape)  # the first branch's key
  xd = np.where(keep, np.asarray(x) / 0.5, 0.0)
  a, b = np.asarray(node["lora_A"], np.float64), np.asarray(node["lora_B"], np.float64)
  g = np.asarray(node["lora_magnitude"], np.float64) / np.linalg.norm(w + 2.0 * a @ b, axis=0)
  want = np.asarray(x) @ w + (g - 1) * (xd @ w) + g * 2.0 * (xd @ a @ b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(want - np.asarray(x) @ _dora_formula(w, a, b, node["lora_magnitude"], 2.0))) > 1e-2


def test_conv_dora_norms_each_output_channel_over_its_window():
  case = zoo.BUILDERS["convnet"]()
  cfg = dataclasses.replace(case.config, use_dora=True, target_modules=("conv1",))
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  lora = zoo.trained(lora, K[2])
  node = lora["params"]["conv1"]["kernel"]
  w = np.asarray(case.tree["params"]["conv1"]["kernel"], np.float64)  # (3, 3, cin, cout)
  v = w + cfg.scale_for("conv1") * np.einsum("hwir,ro->hwio", node["lora_A"], node["lora_B"])
  kernel = np.asarray(node["lora_magnitude"]) * v / np.sqrt(np.sum(v * v, axis=(0, 1, 2)))
  assert node["lora_magnitude"].shape == (8,)
  tree = jax.tree_util.tree_map(lambda t: t, case.tree)
  tree["params"]["conv1"]["kernel"] = jnp.asarray(kernel, jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.MaterializationWarning)
    got = jlora.wrap(case.apply_fn, cfg)(case.tree, lora, case.inputs)
  np.testing.assert_allclose(got, case.apply_fn(tree, case.inputs), rtol=1e-5, atol=1e-6)


def test_embedding_dora_scales_each_feature_as_peft_does():
  table = jax.random.normal(K[0], (11, 6))
  params = {"embed": {"embedding": table}}
  ids = jnp.array([[1, 4, 10], [0, 0, 7]])
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("embed",), init_lora_weights=False, use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[1]), K[2])
  node = lora["embed"]["embedding"]
  assert node["lora_magnitude"].shape == (6,)  # PEFT's: one per embedding feature
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.MaterializationWarning)
    got = jlora.wrap(lambda p, i: p["embed"]["embedding"][i], cfg)(params, lora, ids)
  kernel = _dora_formula(table, node["lora_A"], node["lora_B"], node["lora_magnitude"], 2.0)
  np.testing.assert_allclose(got, kernel[np.asarray(ids)], rtol=1e-5, atol=1e-6)


def test_column_norm_is_the_norm_of_the_merged_view():
  # An N-D view with a stacked axis in both factors: (L, d, heads, dh), fan-in d.
  w = jax.random.normal(K[0], (3, 5, 2, 4))
  a = jax.random.normal(K[1], (3, 5, 2))
  b = jax.random.normal(K[2], (3, 2, 4, 2))
  kv = LoraValue(w, a, b, a_axes=(0, 1), b_axes=(0, 2, 3), scale=0.7, site="x")
  v = np.asarray(w, np.float64) + 0.7 * np.einsum("ldr,lhkr->ldhk", a, b)
  np.testing.assert_allclose(dora.column_norm(kv), np.sqrt(np.sum(v * v, axis=1)), rtol=1e-6)


# -- the cost: no kernel-sized update ------------------------------------------------------------


def test_the_step_never_forms_a_kernel_sized_value():
  w = jax.random.normal(K[0], (24, 40))  # in != out, neither equal to r or the tokens
  params = {"fc": {"kernel": w}}

  def apply_fn(p, x):
    return jnp.tanh(x @ p["fc"]["kernel"])

  cfg = jlora.LoraConfig(r=4, target_modules=("fc",), init_lora_weights=False, use_dora=True)
  lora = jlora.init(params, cfg, key=K[1])
  x = jax.random.normal(K[2], (6, 24))
  apply = jlora.wrap(apply_fn, cfg)
  step = jax.grad(lambda lo: jnp.sum(apply(params, lo, x) ** 2))
  assert (24, 40) not in out_shapes(jax.make_jaxpr(step)(lora).jaxpr)
  again = jlora.wrap(apply_fn, cfg, dora_recompute=True)  # its backward gives the base no cotangent
  step_again = jax.grad(lambda lo: jnp.sum(again(params, lo, x) ** 2))
  assert (24, 40) not in out_shapes(jax.make_jaxpr(step_again)(lora).jaxpr)
  assert (24, 40) not in out_shapes(jax.make_jaxpr(apply)(params, lora, jnp.ones((4096, 24))).jaxpr)
  # The check can fail: the materialising DoRA (merge, then apply) forms it.
  merged = jax.grad(lambda lo: jnp.sum(apply_fn(jlora.merge(params, lo, cfg), x) ** 2))
  assert (24, 40) in out_shapes(jax.make_jaxpr(merged)(lora).jaxpr)


# -- dora_recompute: the same step without keeping each product's output -------------------------


def check_recompute_gives_the_same_values_and_gradients(name):
  """``dora_recompute=True`` on zoo model ``name``: the same loss and gradients, by the recomputing rule."""
  case = zoo.BUILDERS[name]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  x = case.inputs
  lora = zoo.trained(jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(x,)), K[2])
  kept = jlora.wrap(case.apply_fn, cfg, strategy="factorized")
  again = jlora.wrap(case.apply_fn, cfg, strategy="factorized", dora_recompute=True)

  def grads(apply):
    return jax.jit(jax.value_and_grad(lambda lo: zoo.loss_fn(case, apply(case.tree, lo, x))))(lora)

  (loss, want), (got_loss, got) = grads(kept), grads(again)
  # The recomputing rule is the one taken (equal gradients alone would not show it).
  assert "custom_vjp_call" in str(jax.make_jaxpr(again)(case.tree, lora, x))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(kept)(case.tree, lora, x))
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
  for (kp, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(
      g, w, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(w))), err_msg=jax.tree_util.keystr(kp)
    )


@pytest.mark.parametrize("name", ["convnet"])  # the other zoo models: tests/e2e/test_zoo_sweeps.py
def test_recompute_gives_the_same_values_and_gradients(name):
  check_recompute_gives_the_same_values_and_gradients(name)


def test_recompute_covers_dropout_and_embeddings():
  table = jax.random.normal(K[0], (11, 24))
  params = {"embed": {"embedding": table}, "fc": {"kernel": jax.random.normal(K[1], (24, 7))}}

  def apply_fn(p, ids):
    return jnp.tanh(p["embed"]["embedding"][ids] @ p["fc"]["kernel"])

  cfg = jlora.LoraConfig(r=2, lora_dropout=0.3, target_modules=("embed", "fc"), use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
  ids, key = jnp.array([[1, 4, 10], [0, 0, 7]]), jax.random.key(5)

  def grads(**kw):
    apply = jlora.wrap(apply_fn, cfg, **kw)
    return jax.grad(lambda lo: jnp.sum(apply(params, lo, ids, lora_dropout_key=key) ** 2))(lora)

  close = lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)  # noqa: E731
  again = jlora.wrap(apply_fn, cfg, dora_recompute=True)
  jaxpr = str(jax.make_jaxpr(lambda lo: again(params, lo, ids, lora_dropout_key=key))(lora))
  assert jaxpr.count("custom_vjp_call") == 2  # the embedding's and the Dense's products
  jax.tree.map(close, grads(dora_recompute=True), grads())


def _mlp_steps(n_layers: int, d: int, tokens: int):
  """Compiled AdamW-free grad steps of an MLP stack: DoRA kept, DoRA recomputed, LoRA."""
  keys = jax.random.split(K[5], n_layers)
  params = {f"fc{i}": {"kernel": jax.random.normal(k, (d, d)) / d**0.5} for i, k in enumerate(keys)}

  def apply_fn(p, x):
    for i in range(n_layers):
      x = jnp.tanh(x @ p[f"fc{i}"]["kernel"])
    return x

  x = jax.random.normal(K[6], (tokens, d))
  cfg = jlora.LoraConfig(r=4, target_modules=tuple(params), use_dora=True)
  out = {}
  for name, c, kw in [
    ("kept", cfg, {}),
    ("recomputed", cfg, {"dora_recompute": True}),
    ("lora", dataclasses.replace(cfg, use_dora=False), {}),
  ]:
    lora = jlora.init(params, c, key=K[7])
    apply = jlora.wrap(apply_fn, c, **kw)
    step = jax.jit(jax.grad(lambda lo, apply=apply: jnp.sum(apply(params, lo, x) ** 2)))
    out[name] = step.lower(lora).compile()
  return out


def test_recompute_keeps_no_product_output_for_the_backward_pass():
  # MLPs of 64 x 64 layers at 2048 tokens: each kept product is 512 KiB, 32 x the kernel. What is kept
  # grows with depth; the few products live while one layer is differentiated do not (their number
  # is the compiler's: 2-4 here, by XLA version).
  product = 2048 * 64 * 4
  temp, flops = {}, {}
  for layers in (8, 16):
    for name, step in _mlp_steps(layers, 64, 2048).items():
      temp[layers, name] = step.memory_analysis().temp_size_in_bytes
      flops[layers, name] = step.cost_analysis()["flops"]
  excess = lambda layers, name: (temp[layers, name] - temp[layers, "lora"]) / product  # noqa: E731
  assert excess(16, "kept") - excess(8, "kept") >= 7  # one product a layer: what the option is for
  assert excess(16, "recomputed") - excess(8, "recomputed") <= 0.5
  assert excess(16, "recomputed") <= 5
  assert flops[16, "recomputed"] > flops[16, "kept"] + 15 * 2 * 2048 * 64 * 64  # x @ W again per layer


def test_recompute_needs_a_dora_config():
  params, apply_fn = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, target_modules=("fc",))
  with pytest.raises(ValueError, match=r"`dora_recompute=True` applies to a DoRA adapter.*use_dora=True"):
    jlora.wrap(apply_fn, cfg, dora_recompute=True)
  with pytest.raises(ValueError, match=r"strategy='merged' forms the DoRA kernels"):
    jlora.wrap(apply_fn, dataclasses.replace(cfg, use_dora=True), strategy="merged", dora_recompute=True)
  with pytest.raises(TypeError, match="`dora_recompute` must be True or False"):
    jlora.wrap(apply_fn, dataclasses.replace(cfg, use_dora=True), dora_recompute="yes")


# -- init, merge, checkpoints, sharding, LoRA+ ---------------------------------------------------


@pytest.mark.parametrize("layers", [None, (1,)])
def test_init_starts_at_the_kernel_norm_and_changes_nothing(layers):
  case = zoo.BUILDERS["llama_scan"]()
  cfg = dataclasses.replace(case.config, init_lora_weights=True, use_dora=True, layers_to_transform=layers)
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  node = lora["params"]["layers"]["q_proj"]["kernel"]
  w = np.asarray(case.tree["params"]["layers"]["q_proj"]["kernel"])  # (L, in, out)
  norms = np.linalg.norm(w, axis=1)
  want = norms if layers is None else norms[list(layers)]
  np.testing.assert_allclose(node["lora_magnitude"], want, rtol=1e-6)
  np.testing.assert_allclose(
    jlora.wrap(case.apply_fn, cfg)(case.tree, lora, case.inputs),
    case.apply_fn(case.tree, case.inputs),
    rtol=1e-5,
    atol=1e-5,
  )
  if layers is not None:  # layers left out keep their kernels exactly
    trained = zoo.trained(lora, K[2])
    merged = jlora.merge(case.tree, trained, cfg)["params"]["layers"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(merged[0], w[0])


def test_merge_is_the_formula_and_unmerge_refuses():
  params, _ = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("fc",), init_lora_weights=False, use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
  node = lora["fc"]["kernel"]
  merged = jlora.merge(params, lora, cfg)
  want = _dora_formula(params["fc"]["kernel"], node["lora_A"], node["lora_B"], node["lora_magnitude"], 2.0)
  np.testing.assert_allclose(merged["fc"]["kernel"], want, rtol=1e-5, atol=1e-6)
  # Each merged output feature has the magnitude as its norm.
  np.testing.assert_allclose(
    np.linalg.norm(merged["fc"]["kernel"], axis=0), node["lora_magnitude"], rtol=1e-5
  )
  with pytest.raises(ValueError, match="cannot undo a DoRA merge"):
    jlora.unmerge(merged, lora, cfg)


def test_checkpoint_round_trip_keeps_the_magnitude(tmp_path):
  params, _ = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, target_modules=("fc",), init_lora_weights=False, use_dora=True)
  lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
  jlora.save_adapter(tmp_path / "a", lora, cfg, base=params)
  back, cfg2 = jlora.load_adapter(tmp_path / "a", base=params)
  assert cfg2 == cfg and cfg2.use_dora
  jax.tree.map(np.testing.assert_array_equal, back, lora)


def test_sharding_places_the_magnitude_as_lora_b_without_its_rank():
  case = zoo.BUILDERS["llama_scan"]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  specs = jax.tree_util.tree_map(lambda x: P(*([None] * (x.ndim - 1)), "tp"), case.tree)
  out = jlora.adapter_specs(case.tree, lora, cfg, specs=specs)["params"]["layers"]["q_proj"]["kernel"]
  assert out["lora_B"] == P(None, None, "tp") and out["lora_magnitude"] == P(None, "tp")


def test_sharded_init_reads_the_kernel_norms():
  params, _ = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, target_modules=("fc",), use_dora=True)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
  lora = jlora.init(params, cfg, key=K[2], shardings=mesh)
  np.testing.assert_allclose(
    lora["fc"]["kernel"]["lora_magnitude"], np.linalg.norm(params["fc"]["kernel"], axis=0), rtol=1e-6
  )


def test_loraplus_puts_the_magnitude_in_group_b():
  case = zoo.BUILDERS["llama_scan"]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  labels = jlora.loraplus_labels(lora)["params"]["layers"]["q_proj"]["kernel"]
  assert labels == {"lora_A": "a", "lora_B": "b", "lora_magnitude": "b"}


def test_summary_counts_the_magnitude():
  params, _ = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, target_modules=("fc",), use_dora=True)
  lora = jlora.init(params, cfg, key=K[2])
  trainable = 3 * (12 + 7) + 7
  total = 12 * 7 + 7 + trainable
  assert jlora.summary(params, lora) == (
    f"trainable params: {trainable} || all params: {total} || trainable%: {100 * trainable / total:.4f}"
  )


# -- errors -------------------------------------------------------------------------------------


def test_magnitude_and_config_must_agree():
  params, apply_fn = _dense_case(bias=False)
  cfg = jlora.LoraConfig(r=3, target_modules=("fc",), use_dora=True)
  lora = jlora.init(params, cfg, key=K[2])
  plain_cfg = dataclasses.replace(cfg, use_dora=False)
  with pytest.raises(ValueError, match=r"'fc/kernel' has DoRA's 'lora_magnitude'.*set `use_dora=True`"):
    jlora.wrap(apply_fn, plain_cfg)(params, lora, jnp.ones((2, 12)))
  plain = jlora.init(params, plain_cfg, key=K[2])
  with pytest.raises(ValueError, match=r"'fc/kernel' lacks DoRA's 'lora_magnitude'"):
    jlora.merge(params, plain, cfg)
  bad = {"fc": {"kernel": {**lora["fc"]["kernel"], "lora_magnitude": jnp.ones((12,))}}}
  with pytest.raises(ValueError, match=r"lora_magnitude of shape \(12,\).*call for \(7,\)"):
    jlora.merge(params, bad, cfg)
  with pytest.raises(TypeError, match="`use_dora` must be a bool"):
    jlora.LoraConfig(r=3, target_modules=("fc",), use_dora=1)


def test_magnitude_shape_is_lora_b_without_its_rank():
  case = zoo.BUILDERS["gemma_style"]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  lora = jlora.init(case.tree, cfg, key=K[1], apply_fn=case.apply_fn, example_args=(case.inputs,))
  attn, dh = lora["params"]["layer_0"]["attn"], zoo.D // zoo.HEADS
  assert attn["kv_einsum"]["w"]["lora_B"].shape == (2, zoo.KV_HEADS, 2, dh)  # "soio"
  assert attn["kv_einsum"]["w"]["lora_magnitude"].shape == (2, zoo.KV_HEADS, dh)
  assert attn["q_einsum"]["w"]["lora_B"].shape == (zoo.HEADS, 2, dh)  # "oio"
  assert attn["q_einsum"]["w"]["lora_magnitude"].shape == (zoo.HEADS, dh)
  assert attn["attn_vec_einsum"]["w"]["lora_magnitude"].shape == (zoo.D,)  # "iio"


# -- edge cases: zero features, fp16 range, float64 ------------------------------------------------


def test_an_all_zero_output_feature_is_an_error_at_init_naming_kernel_and_feature():
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",), use_dora=True)
  dense = {"fc": {"kernel": jax.random.normal(K[0], (5, 4)).at[:, 2].set(0.0)}}
  with pytest.raises(ValueError, match=r"output feature \(2,\) of kernel 'fc/kernel' is all zeros .* 0 / 0"):
    jlora.init(dense, cfg, key=K[1])
  embed = {"fc": {"embedding": jax.random.normal(K[0], (6, 3)).at[:, 1].set(0.0)}}  # feature 1, every token
  with pytest.raises(ValueError, match=r"output feature \(1,\) of kernel 'fc/embedding' is all zeros"):
    jlora.init(embed, cfg, key=K[1])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))  # traced init: checked on its result
  with pytest.raises(ValueError, match=r"output feature \(2,\) of kernel 'fc/kernel' is all zeros"):
    jlora.init(dense, cfg, key=K[1], shardings=mesh)
  # With B non-zero at init the column of V = W + scale * A @ B is not zero: no error, finite output.
  lora = jlora.init(dense, dataclasses.replace(cfg, init_lora_weights=False), key=K[1])
  assert bool(jnp.all(lora["fc"]["kernel"]["lora_magnitude"] > 0))


def test_a_float16_norm_past_its_range_is_an_error_and_a_float32_adapter_keeps_it():
  w = jnp.full((4, 3), 4.0e4, jnp.float16).at[:, 0].set(1.0)  # feature 1's norm: 8e4 > 65504
  params = {"fc": {"kernel": w}}
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",), use_dora=True)
  with pytest.raises(
    ValueError,
    match=r"norm of output feature \(1,\) of kernel 'fc/kernel' is 80000, past .*"
    r"float16 \(65504\).*dtype='float32'",
  ):
    jlora.init(params, cfg, key=K[1])
  cfg32 = dataclasses.replace(cfg, dtype="float32")
  m = jlora.init(params, cfg32, key=K[1])["fc"]["kernel"]["lora_magnitude"]
  assert m.dtype == jnp.float32
  np.testing.assert_allclose(m, np.linalg.norm(np.asarray(w, np.float64), axis=0), rtol=1e-6)


def test_float64_inputs_are_computed_in_float64():
  with jax.enable_x64(True):
    w = jax.random.normal(K[0], (12, 7), jnp.float64)
    params = {"fc": {"kernel": w}}
    cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=("fc",), init_lora_weights=False, use_dora=True)
    lora = zoo.trained(jlora.init(params, cfg, key=K[2]), K[3])
    node = lora["fc"]["kernel"]
    assert node["lora_magnitude"].dtype == jnp.float64
    want = _dora_formula(w, node["lora_A"], node["lora_B"], node["lora_magnitude"], 2.0)
    merged = jlora.merge(params, lora, cfg)["fc"]["kernel"]
    assert merged.dtype == jnp.float64
    np.testing.assert_allclose(merged, want, rtol=1e-12, atol=1e-12)  # float32 inside gave ~1e-7
    x = jax.random.normal(K[4], (2, 12), jnp.float64)
    got = jlora.wrap(lambda p, x: x @ p["fc"]["kernel"], cfg)(params, lora, x)
    np.testing.assert_allclose(got, np.asarray(x) @ want, rtol=1e-12, atol=1e-12)


def test_safe_merge_names_a_zero_feature_not_an_overflow():
  params = {"fc": {"kernel": jax.random.normal(K[0], (5, 4))}}
  cfg = jlora.LoraConfig(r=2, target_modules=("fc",), use_dora=True)
  lora = jlora.init(params, cfg, key=K[1])  # B = 0: V = W
  zero = {"fc": {"kernel": params["fc"]["kernel"].at[:, 3].set(0.0)}}  # a base whose feature 3 is zero
  with pytest.raises(ValueError, match=r"'fc/kernel'.* output feature \(3,\) .* is all zeros: m / 0"):
    jlora.merge(zero, lora, cfg, safe_merge=True)
  bad = jax.tree.map(lambda x: x, lora)
  bad["fc"]["kernel"]["lora_magnitude"] = lora["fc"]["kernel"]["lora_magnitude"].at[0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"lora_magnitude of the adapter at 'fc/kernel' contains NaN or Inf"):
    jlora.merge(params, bad, cfg, safe_merge=True)
