"""QLoRA end to end: LoRA on a quantized base (`jlora.quantize`) across the zoo.

Reference: the model applied to ``merge(dequantize(qparams), lora)`` (fp32, rtol 1e-5). Each quantized
weight must be dequantized where it is used: inside a ``scan`` over stacked layers, one layer at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora._src.core import paths
from jlora._src.core.qarray import is_quantized
from tests import zoo

CASES = ["llama", "llama_scan", "gemma_style", "gpt2_style", "mha_tied", "nnx", "convnet", "plain"]


@pytest.fixture(scope="module", params=CASES)
def qcase(request):
  case = zoo.BUILDERS[request.param]()
  block = {"convnet": None, "plain": 4}.get(request.param, 8)  # None: per-channel scales
  qparams = jlora.quantize(case.tree, qtype="nf4", block_size=block)
  lora = jlora.init(
    qparams, case.config, key=jax.random.key(7), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  return case, qparams, lora


def _reference(case, qparams):
  dense = jlora.dequantize(qparams)
  return lambda lo: case.apply_fn(jlora.merge(dense, lo, case.config), case.inputs)


def test_wrapped_quantized_base_equals_the_dequantized_merged_model(qcase):
  case, qparams, lora = qcase
  assert any(is_quantized(x) for _, x in paths.leaves_with_paths(qparams))
  wrapped = jlora.wrap(case.apply_fn, case.config)
  got = jax.jit(wrapped)(qparams, lora, case.inputs)
  want = _reference(case, qparams)(lora)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  g = jax.jit(jax.grad(lambda lo: zoo.loss_fn(case, wrapped(qparams, lo, case.inputs))))(lora)
  g_ref = jax.grad(lambda lo: zoo.loss_fn(case, _reference(case, qparams)(lo)))(lora)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-8, err_msg=str(p))


def _float_shapes(jaxpr):
  return {
    tuple(v.aval.shape)
    for eqn in jaxpr.eqns
    for v in eqn.outvars
    if jnp.issubdtype(v.aval.dtype, jnp.floating)
  }


def test_a_scanned_quantized_kernel_is_dequantized_one_layer_at_a_time():
  case = zoo.BUILDERS["llama_scan"]()
  qparams = jlora.quantize(case.tree, qtype="nf4", block_size=8)
  lora = jlora.init(
    qparams, case.config, key=jax.random.key(1), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  wrapped = jlora.wrap(case.apply_fn, case.config)
  step = jax.grad(lambda lo: zoo.loss_fn(case, wrapped(qparams, lo, case.inputs)))
  top = _float_shapes(jax.make_jaxpr(step)(lora).jaxpr)  # the jaxpr outside the scan bodies
  stacked = {(zoo.LAYERS, zoo.D, zoo.D), (zoo.LAYERS, zoo.D, zoo.FF), (zoo.LAYERS, zoo.FF, zoo.D)}
  assert not top & stacked, top & stacked
  # The dequantized base, merged outside: the whole stacked kernels appear.
  merged_step = jax.grad(lambda lo: zoo.loss_fn(case, _reference(case, qparams)(lo)))
  assert _float_shapes(jax.make_jaxpr(merged_step)(lora).jaxpr) & stacked


def test_training_on_a_quantized_base_lowers_the_loss(qcase):
  case, qparams, lora = qcase
  wrapped = jlora.wrap(case.apply_fn, case.config)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(lo, state):
    loss, g = jax.value_and_grad(lambda lo: zoo.loss_fn(case, wrapped(qparams, lo, case.inputs)))(lo)
    updates, state = opt.update(g, state, lo)
    return optax.apply_updates(lo, updates), state, loss

  state, losses = opt.init(lora), []
  for _ in range(25):
    lora, state, loss = step(lora, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses


def test_quantized_base_checkpoints_and_adapter_fingerprint(tmp_path):
  case = zoo.BUILDERS["llama"]()
  qparams = jlora.quantize(case.tree, qtype="nf4", block_size=8, double_quant=True)
  # The quantized base itself saves and restores with orbax.
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "base", qparams)
    ckpt.wait_until_finished()
    target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), qparams
    )
    back = ckpt.restore(tmp_path / "base", target)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, qparams)
  lora = jlora.init(qparams, case.config, key=jax.random.key(2))
  jlora.save_adapter(tmp_path / "adapter", lora, case.config, base=qparams)
  jlora.load_adapter(tmp_path / "adapter", base=qparams)  # the same quantized base
  jlora.load_adapter(tmp_path / "adapter", base=case.tree)  # its full-precision original
  other = jlora.quantize(case.tree, qtype="int8", block_size=8)
  with pytest.raises(ValueError, match=r"quantized as 'nf4/8/dq', but the given base holds it as 'int8/8'"):
    jlora.load_adapter(tmp_path / "adapter", base=other)


def test_dropout_and_export_on_a_quantized_base(tmp_path):
  case = zoo.BUILDERS["llama"]()
  qparams = jlora.quantize(case.tree, qtype="int4", block_size=8)
  cfg = jlora.LoraConfig(**{**case.config.to_dict(), "lora_dropout": 0.5})
  lora = jlora.init(qparams, cfg, key=jax.random.key(3))
  wrapped = jlora.wrap(case.apply_fn, cfg)
  a = wrapped(qparams, lora, case.inputs, lora_dropout_key=jax.random.key(4))
  b = wrapped(qparams, lora, case.inputs)
  assert float(jnp.abs(a - b).max()) > 1e-4  # dropout on the LoRA branch only when a key is given
  pcfg = jlora.export_peft(tmp_path, lora, cfg, base=qparams)  # QLoRA adapters are plain LoRA files
  back, cfg2 = jlora.import_peft(tmp_path, qparams)
  np.testing.assert_allclose(
    jlora.wrap(case.apply_fn, cfg2)(qparams, back, case.inputs), b, rtol=1e-5, atol=1e-5
  )
  assert pcfg["r"] == cfg.r


def test_adapter_specs_follow_a_sharded_quantized_base():
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"blk": {"q_proj": {"kernel": jnp.ones((64, 128))}}}
  qparams = jlora.quantize(params, qtype="nf4", block_size=32)
  placed = jax.device_put(qparams, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tp")))
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(placed, cfg, key=jax.random.key(0), shardings=mesh)
  a = lora["blk"]["q_proj"]["kernel"]["lora_A"]
  assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert lora["blk"]["q_proj"]["kernel"]["lora_B"].sharding.spec == jax.sharding.PartitionSpec(None, "tp")


def test_a_quantized_embedding_and_tied_head_adapt_factorized():
  case = zoo.BUILDERS["mha_tied"]()  # targets the embedding, which the tied head reuses
  qparams = jlora.quantize(case.tree, qtype="int8", block_size=8, targets=".*")
  assert is_quantized(qparams["params"]["embed"]["embedding"])
  lora = jlora.init(
    qparams, case.config, key=jax.random.key(5), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  got = jlora.wrap(case.apply_fn, case.config)(qparams, lora, case.inputs)
  want = _reference(case, qparams)(lora)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
