"""Expert kernels used through ``ragged_dot``: the LoRA branch as grouped products, never (E, D, F)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora._src.core import paths
from jlora._src.interpret.rules import moe as interpreter_moe
from tests import zoo
from tests._jaxpr import out_shapes

E, D, F, M = 4, 8, 6, 12
K = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(K[0], (M, D))
GROUPS = jnp.array([3, 0, 5, 3], jnp.int32)  # an empty group, and one row past the groups (zeros)


def _dims(contract_x, contract_w, group):
  return lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=((contract_x, contract_w), ((), ())),
    lhs_ragged_dimensions=(1 if contract_x == (0,) else 0,),
    rhs_group_dimensions=(group,),
  )


# (name, kernel shape, fn(kernel, x, groups), expected layout)
FORMS = [
  ("ragged_dot", (E, D, F), lambda w, x, g: lax.ragged_dot(x, w, g), "sio"),
  (  # kernel stored (E, F, D), as PyTorch experts are
    "out_in",
    (E, F, D),
    lambda w, x, g: lax.ragged_dot_general(x, w, g, _dims((1,), (2,), 0)),
    "soi",
  ),
  (  # group axis last, input contracted on its first axis (rows second)
    "group_last_x_transposed",
    (D, F, E),
    lambda w, x, g: lax.ragged_dot_general(x.T, w, g, _dims((0,), (0,), 2)),
    "ios",
  ),
]


def _case(shape, fn):
  params = {"moe": {"experts": {"wi": jax.random.normal(K[1], shape) / np.sqrt(D)}}}
  return params, lambda p, x, g: fn(p["moe"]["experts"]["wi"], x, g)


@pytest.mark.parametrize("name,shape,fn,roles", FORMS, ids=[f[0] for f in FORMS])
def test_wrapped_equals_merged_forward_and_gradient(name, shape, fn, roles):
  params, apply_fn = _case(shape, fn)
  assert str(jlora.infer_layouts(apply_fn, params, X, GROUPS)[("moe", "experts", "wi")]) == roles
  cfg = jlora.LoraConfig(r=3, lora_alpha=5, target_modules=("experts/wi",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[2], apply_fn=apply_fn, example_args=(X, GROUPS))
  apply = jlora.wrap(apply_fn, cfg, strategy="factorized")
  got = jax.jit(apply)(params, lora, X, GROUPS)  # pytest turns a MaterializationWarning into an error
  want = apply_fn(jlora.merge(params, lora, cfg), X, GROUPS)
  assert float(jnp.max(jnp.abs(want - apply_fn(params, X, GROUPS)))) > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

  def loss(f):
    return lambda lo: jnp.sum(jnp.sin(f(lo)))

  g = jax.jit(jax.grad(loss(lambda lo: apply(params, lo, X, GROUPS))))(lora)
  g_ref = jax.grad(loss(lambda lo: apply_fn(jlora.merge(params, lo, cfg), X, GROUPS)))(lora)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
    s = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * s, err_msg=jax.tree_util.keystr(p))


def test_no_expert_sized_delta_or_gradient():
  params, apply_fn = _case((E, D, F), FORMS[0][2])
  cfg = jlora.LoraConfig(r=3, target_modules=("wi",), init_lora_weights=False)
  lora = jlora.init(params, cfg, key=K[2], apply_fn=apply_fn, example_args=(X, GROUPS))
  apply = jlora.wrap(apply_fn, cfg)
  step = jax.grad(lambda lo: jnp.sum(apply(params, lo, X, GROUPS) ** 2))
  assert (E, D, F) not in out_shapes(jax.make_jaxpr(step)(lora).jaxpr)
  assert (E, D, F) not in out_shapes(jax.make_jaxpr(apply)(params, lora, X[:2], GROUPS).jaxpr)
  # The check can fail: merging first forms it, and so does "auto" serving many tokens.
  merged = jax.grad(lambda lo: jnp.sum(apply_fn(jlora.merge(params, lo, cfg), X, GROUPS) ** 2))
  assert (E, D, F) in out_shapes(jax.make_jaxpr(merged)(lora).jaxpr)
  many = jnp.ones((4096, D))
  assert (E, D, F) in out_shapes(jax.make_jaxpr(apply)(params, lora, many, GROUPS * 300).jaxpr)


def test_a_form_it_does_not_cover_materialises_with_the_warning():
  dims = lax.RaggedDotDimensionNumbers(  # a dot batch axis: not a form the rule covers
    dot_dimension_numbers=(((2,), (2,)), ((0,), (0,))), lhs_ragged_dimensions=(1,), rhs_group_dimensions=(1,)
  )
  params, apply_fn = _case((2, E, D, F), lambda w, x, g: lax.ragged_dot_general(x, w, g, dims))
  x = jnp.stack([X, 2 * X])
  cfg = jlora.LoraConfig(r=3, target_modules=("wi",), init_lora_weights=False, layout_pattern={"wi": "ssio"})
  lora = jlora.init(params, cfg, key=K[2])
  with pytest.warns(jlora.MaterializationWarning, match="moe/experts/wi.*ragged_dot_general"):
    got = jlora.wrap(apply_fn, cfg, strategy="factorized")(params, lora, x, GROUPS)
  np.testing.assert_allclose(got, apply_fn(jlora.merge(params, lora, cfg), x, GROUPS), rtol=1e-5, atol=1e-5)


def test_primitive_is_the_one_ragged_dot_binds():
  jaxpr = jax.make_jaxpr(lax.ragged_dot)(X, jnp.ones((E, D, F)), GROUPS)
  assert jaxpr.eqns[0].primitive is interpreter_moe.RAGGED_DOT_P


# -- the zoo's MoE decoder: a scanned stack, experts (L, E, D, FF) ----------------------------------


@pytest.fixture(scope="module")
def moe():
  return zoo.BUILDERS["moe_scan"]()


def test_layers_to_transform_and_rank_pattern_on_experts(moe):
  cfg = jlora.LoraConfig(
    r=3,
    target_modules=("experts/wi", "experts/wo", "q_proj"),
    layers_to_transform=[1],
    rank_pattern={"experts/wo": 5},
    init_lora_weights=False,
  )
  lora = jlora.init(moe.tree, cfg, key=K[3], apply_fn=moe.apply_fn, example_args=(moe.inputs,))
  shapes = {paths.to_str(p): (n["lora_A"].shape, n["lora_B"].shape) for p, n in paths.adapter_items(lora)}
  L, FF = zoo.LAYERS, zoo.FF  # noqa: N806
  assert shapes["params/layers/experts/wi"] == ((1, zoo.EXPERTS, zoo.D, 3), (1, zoo.EXPERTS, 3, FF))
  assert shapes["params/layers/experts/wo"] == ((1, zoo.EXPERTS, FF, 5), (1, zoo.EXPERTS, 5, zoo.D))
  apply = jlora.wrap(moe.apply_fn, cfg, strategy="factorized")
  got = jax.jit(apply)(moe.tree, lora, moe.inputs)
  merged = jlora.merge(moe.tree, lora, cfg)
  np.testing.assert_array_equal(  # layer 0 of the experts is untouched
    merged["params"]["layers"]["experts"]["wi"][0], moe.tree["params"]["layers"]["experts"]["wi"][0]
  )
  want = moe.apply_fn(merged, moe.inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  assert L == 2


def test_zoo_moe_step_forms_no_expert_kernel(moe):
  lora = jlora.init(moe.tree, moe.config, key=K[4], apply_fn=moe.apply_fn, example_args=(moe.inputs,))
  apply = jlora.wrap(moe.apply_fn, moe.config)
  stacked = moe.tree["params"]["layers"]["experts"]
  kernel_shapes = {s for w in stacked.values() for s in (w.shape, w.shape[1:])}  # (L, E, D, F), (E, D, F)
  step = jax.grad(lambda lo: zoo.loss_fn(moe, apply(moe.tree, lo, moe.inputs)))
  assert not kernel_shapes & set(out_shapes(jax.make_jaxpr(step)(lora).jaxpr))
  merged = jax.grad(
    lambda lo: zoo.loss_fn(moe, moe.apply_fn(jlora.merge(moe.tree, lo, moe.config), moe.inputs))
  )
  assert kernel_shapes & set(out_shapes(jax.make_jaxpr(merged)(lora).jaxpr))
