"""Kernels used inside ``shard_map`` bodies (tensor parallel, FSDP by hand) on 8 simulated devices:
the LoRA branch computed per shard, factorized; wrapped == merged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jlora
from jlora._src.interpret.rules import parallel as interpreter_parallel
from jlora._src.interpret.rules.parallel import factor_specs
from jlora._src.interpret.values import LoraValue
from tests._jaxpr import out_shapes

D, F, B = 16, 48, 24  # no activation (local or stacked over devices) has a kernel's shape
K = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(K[0], (B, D))
PARAMS = {
  "up": {"kernel": jax.random.normal(K[1], (D, F)) / np.sqrt(D)},  # (in, out)
  "down": {"kernel": jax.random.normal(K[2], (D, F)) / np.sqrt(F)},  # (out, in), used as h @ W.T
}


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py simulates them)")
  return jax.make_mesh((4, 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _tensor_parallel(mesh):
  """Column-parallel up-projection, row-parallel down-projection, one psum."""

  def body(x, up, down):
    return lax.psum(jax.nn.gelu(x @ up) @ down.T, "tp")

  specs = (P("dp", None), P(None, "tp"), P(None, "tp"))
  mlp = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("dp", None))
  return lambda p, x: mlp(x, p["up"]["kernel"], p["down"]["kernel"])


def _fsdp(mesh):
  """Each kernel sharded over its fan-in axis and all-gathered inside the body."""

  def body(x, up, down):
    up = lax.all_gather(up, "dp", axis=0, tiled=True)
    down = lax.all_gather(down, "dp", axis=0, tiled=True)
    return jax.nn.gelu(x @ up) @ down.T

  specs = (P("dp", None), P("dp", None), P("dp", None))
  mlp = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("dp", None), axis_names={"dp"})
  return lambda p, x: mlp(x, p["up"]["kernel"], p["down"]["kernel"])


def _check(fn):
  cfg = jlora.LoraConfig(r=3, lora_alpha=5, target_modules=("up", "down"), init_lora_weights=False)
  layouts = jlora.infer_layouts(fn, PARAMS, X)  # read inside the body
  assert {k[0]: str(v) for k, v in layouts.items()} == {"up": "io", "down": "oi"}
  lora = jlora.init(PARAMS, cfg, key=K[3], apply_fn=fn, example_args=(X,))
  apply = jlora.wrap(fn, cfg, strategy="factorized")
  got = jax.jit(apply)(PARAMS, lora, X)  # pytest turns a MaterializationWarning into an error
  want = fn(jlora.merge(PARAMS, lora, cfg), X)
  assert float(jnp.max(jnp.abs(want - fn(PARAMS, X)))) > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

  def loss(f):
    return lambda lo: jnp.sum(jnp.sin(f(lo)))

  g = jax.jit(jax.grad(loss(lambda lo: apply(PARAMS, lo, X))))(lora)
  g_ref = jax.grad(loss(lambda lo: fn(jlora.merge(PARAMS, lo, cfg), X)))(lora)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
    s = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * s, err_msg=jax.tree_util.keystr(p))
  return cfg, lora, apply


def _kernel_sized(jaxpr, shapes):
  return sum(s in shapes for s in out_shapes(jaxpr))


@pytest.mark.parametrize("build", [_tensor_parallel, _fsdp], ids=["tensor_parallel", "fsdp"])
def test_wrapped_equals_merged_and_forms_no_kernel_sized_value(mesh, build):
  fn = build(mesh)
  cfg, lora, apply = _check(fn)
  # Global kernels and their local shards (tp=2: (16, 24); dp=4: (4, 48)).
  shapes = {(D, F), (D, F // 2), (D // 4, F)}
  step = jax.grad(lambda lo: jnp.sum(apply(PARAMS, lo, X) ** 2))
  base = _kernel_sized(jax.make_jaxpr(fn)(PARAMS, X).jaxpr, shapes)  # the model's own (pvary, all_gather)
  assert _kernel_sized(jax.make_jaxpr(step)(lora).jaxpr, shapes) == base
  merged = jax.grad(lambda lo: jnp.sum(fn(jlora.merge(PARAMS, lo, cfg), X) ** 2))
  assert _kernel_sized(jax.make_jaxpr(merged)(lora).jaxpr, shapes) > base  # the check can fail


def test_dropout_inside_the_body(mesh):
  fn = _tensor_parallel(mesh)
  cfg = jlora.LoraConfig(r=3, target_modules=("up", "down"), lora_dropout=0.5, init_lora_weights=False)
  lora = jlora.init(PARAMS, cfg, key=K[3], apply_fn=fn, example_args=(X,))
  apply = jax.jit(jlora.wrap(fn, cfg))
  plain = apply(PARAMS, lora, X)
  dropped = apply(PARAMS, lora, X, lora_dropout_key=K[4])
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
  np.testing.assert_array_equal(dropped, apply(PARAMS, lora, X, lora_dropout_key=K[4]))
  np.testing.assert_allclose(plain, fn(jlora.merge(PARAMS, lora, cfg), X), rtol=1e-5, atol=1e-5)


def test_factor_specs_follow_the_kernel_spec():
  a, b = jnp.zeros((2, 16, 3)), jnp.zeros((2, 48, 3))
  kv = LoraValue(jnp.zeros((2, 16, 48)), a, b, (0, 1), (0, 2), 1.0, "w")
  assert factor_specs(kv, P("pp", None, "tp")) == (P("pp", None, None), P("pp", "tp", None))
  assert factor_specs(kv, P(None, ("dp", "fsdp"))) == (P(None, ("dp", "fsdp"), None), P(None, None, None))


def test_primitives_are_the_ones_shard_map_binds(mesh):
  fn = _fsdp(mesh)
  eqn = jax.make_jaxpr(fn)(PARAMS, X).eqns[0]
  assert eqn.primitive is interpreter_parallel.SHARD_MAP_P
  body = {e.primitive for e in eqn.params["jaxpr"].eqns}
  assert interpreter_parallel.ALL_GATHER_P in body
