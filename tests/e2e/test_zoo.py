"""Issue-4 model zoo: every model, adapter shapes/counts, exactness, round trips, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora._src.core import paths
from tests import zoo

CASES = list(zoo.BUILDERS)


@pytest.fixture(scope="module", params=CASES)
def setup(request):
  case = zoo.BUILDERS[request.param]()
  lora = jlora.init(
    case.tree, case.config, key=jax.random.key(7), apply_fn=case.apply_fn, example_args=(case.inputs,)
  )
  apply = jax.jit(jlora.wrap(case.apply_fn, case.config, strategy="factorized"))
  merged_apply = jax.jit(lambda t, lo, x: case.apply_fn(jlora.merge(t, lo, case.config), x))
  return case, lora, apply, merged_apply


def _flat_shapes(lora):
  return {
    paths.to_str(p): (tuple(n["lora_A"].shape), tuple(n["lora_B"].shape))
    for p, n in paths.adapter_items(lora)
  }


def test_adapter_shapes_and_peft_count(setup):
  case, lora, _, _ = setup
  assert _flat_shapes(lora) == case.expected_shapes
  assert jlora.count_params(lora) == case.peft_params


def test_forward_matches_merged(setup):
  case, lora, apply, merged_apply = setup
  got = apply(case.tree, lora, case.inputs)
  want = merged_apply(case.tree, lora, case.inputs)
  base = case.apply_fn(case.tree, case.inputs)
  assert float(jnp.max(jnp.abs(want - base))) > 1e-3, "adapter must change the output"
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_gradients_match_merged(setup):
  case, lora, _, _ = setup
  wrapped = jlora.wrap(case.apply_fn, case.config, strategy="factorized")
  g = jax.jit(jax.grad(lambda lo: zoo.loss_fn(case, wrapped(case.tree, lo, case.inputs))))(lora)
  g_ref = jax.jit(
    jax.grad(
      lambda lo: zoo.loss_fn(case, case.apply_fn(jlora.merge(case.tree, lo, case.config), case.inputs))
    )
  )(lora)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves(g_ref)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(p))


def test_merge_unmerge_round_trip(setup):
  case, lora, _, _ = setup
  merged = jlora.merge(case.tree, lora, case.config)
  back = jlora.unmerge(merged, lora, case.config)
  chex.assert_trees_all_close(back, case.tree, atol=1e-6, rtol=1e-6)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(case.tree)


def test_training_reduces_loss(setup):
  case, lora, _, _ = setup
  wrapped = jlora.wrap(case.apply_fn, case.config)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(lora, state):
    loss, g = jax.value_and_grad(lambda lo: zoo.loss_fn(case, wrapped(case.tree, lo, case.inputs)))(lora)
    updates, state = opt.update(g, state, lora)
    return optax.apply_updates(lora, updates), state, loss

  state = opt.init(lora)
  losses = []
  for _ in range(25):
    lora, state, loss = step(lora, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
