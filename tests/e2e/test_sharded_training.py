"""Sharded LoRA training on 8 simulated CPU devices: two steps of a 2-layer scanned Llama on an fsdp x tp
mesh and on a pure data-parallel one, each compiled once, against the same two steps on one device.

The sharded step matches the one-device step, all-gathers no more of the base than the base model's own
forward/backward does, and its adapter's checkpoint restores onto another mesh. The specs themselves:
`tests/adapters/test_sharding.py`.
"""

from __future__ import annotations

import collections
import math
import re

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import jlora
from tests import _sharding_models
from tests._sharding_models import DP_RULES, FSDP_TP_RULES, next_token_loss

# fp32 throughout; the sharded step reduces in another order than the one-device step.
# Values are O(0.1): rtol 1e-5 with an absolute floor of 1e-6 for entries near zero.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def small():
  return _sharding_models.small()


OPT = optax.sgd(0.1, momentum=0.9)


def _step_fn(model, cfg):
  apply = jlora.wrap(model.apply, cfg)

  def loss_fn(lora, params, tokens):
    return next_token_loss(apply(params, lora, tokens), tokens)

  def step(lora, opt_state, params, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens)
    updates, opt_state = OPT.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss, grads

  return step


@pytest.fixture(scope="module")
def one_device(small):
  """Two steps on one device: the reference."""
  step = jax.jit(_step_fn(small["model"], small["cfg"]))
  lora, state = small["lora"], OPT.init(small["lora"])
  out = []
  for _ in range(2):
    lora, state, loss, grads = step(lora, state, small["params"], small["tokens"])
    out.append((lora, loss, grads))
  return out


_MESHES = {
  "fsdp2xtp4": ((2, 4), ("fsdp", "tp"), FSDP_TP_RULES),
  "dp8": ((8,), ("data",), DP_RULES),
}


@pytest.fixture(scope="module", params=sorted(_MESHES))
def sharded(request, small):
  shape, names, rules = _MESHES[request.param]
  mesh = _sharding_models.mesh(shape, names)
  param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(small["boxed"]), mesh, rules)
  lora_sh = jlora.adapter_specs(small["params"], small["lora"], small["cfg"], specs=param_sh)
  batch_sh = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), rules))
  params = jax.device_put(small["params"], param_sh)
  tokens = jax.device_put(small["tokens"], batch_sh)
  lora = jax.device_put(small["lora"], lora_sh)
  state = jax.jit(OPT.init, out_shardings=None)(lora)
  step = jax.jit(_step_fn(small["model"], small["cfg"]), donate_argnums=())
  compiled = step.lower(lora, state, params, tokens).compile()
  out = []
  for _ in range(2):
    lora, state, loss, grads = compiled(lora, state, params, tokens)
    out.append((lora, loss, grads))
  return dict(
    name=request.param,
    mesh=mesh,
    params=params,
    tokens=tokens,
    param_sh=param_sh,
    lora_sh=lora_sh,
    compiled=compiled,
    out=out,
  )


def test_sharded_step_matches_one_device(sharded, one_device, small):
  for (lora, loss, grads), (lora1, loss1, grads1) in zip(sharded["out"], one_device):
    np.testing.assert_allclose(loss, loss1, rtol=RTOL)
    chex.assert_trees_all_close(grads, grads1, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(lora, lora1, rtol=RTOL, atol=ATOL)
  # The adapter stays where `adapter_specs` put it; the base is untouched and still sharded.
  final = sharded["out"][-1][0]
  for got, want in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(sharded["lora_sh"])):
    assert got.sharding.is_equivalent_to(want, got.ndim)
  for got, want in zip(
    jax.tree_util.tree_leaves(sharded["params"]), jax.tree_util.tree_leaves(sharded["param_sh"])
  ):
    assert got.sharding == want


_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(")


def _all_gathers(hlo: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _ALL_GATHER.findall(hlo)]


def test_lora_step_gathers_no_more_base_weight_than_the_base_forward_backward(sharded, small):
  """All-gathers of the LoRA step vs. the base model's own forward + backward to its input
  embeddings (gradient w.r.t. the embedding table only): the same whole-kernel-shaped gathers at
  most, and no more gathered bytes than that plus the whole adapter."""
  model = small["model"]
  params = sharded["params"]["params"]
  rest = {k: v for k, v in params.items() if k != "embed_tokens"}

  def base_loss(emb, rest, tokens):
    logits = model.apply({"params": {**rest, "embed_tokens": emb}}, tokens)
    return next_token_loss(logits, tokens)

  ref = (
    jax.jit(jax.value_and_grad(base_loss)).lower(params["embed_tokens"], rest, sharded["tokens"]).compile()
  )
  lora_ag, ref_ag = _all_gathers(sharded["compiled"].as_text()), _all_gathers(ref.as_text())
  kernels = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2}
  kernels |= {s[1:] for s in kernels if len(s) >= 3}  # one layer of a scanned kernel
  whole = lambda gathers: collections.Counter(s for s in gathers if s in kernels)  # noqa: E731
  assert whole(lora_ag) <= whole(ref_ag), (whole(lora_ag), whole(ref_ag))
  adapter_elems = sum(x.size for x in jax.tree_util.tree_leaves(small["lora"]))
  assert sum(map(math.prod, lora_ag)) <= sum(map(math.prod, ref_ag)) + adapter_elems


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_restores_onto_another_mesh(sharded, small, tmp_path):
  """Saved from the training mesh with `jlora.save_adapter`, loaded onto a (4, 2) fsdp x tp mesh."""
  lora, cfg = sharded["out"][-1][0], small["cfg"]
  jlora.save_adapter(tmp_path / "adapter", lora, cfg, base=sharded["params"])
  mesh = _sharding_models.mesh((4, 2), ("fsdp", "tp"))
  target_sh = jlora.adapter_specs(small["boxed"], lora, cfg, rules=FSDP_TP_RULES, mesh=mesh)
  restored, restored_cfg = jlora.load_adapter(tmp_path / "adapter", base=small["params"], shardings=target_sh)
  assert restored_cfg == cfg
  chex.assert_trees_all_equal(restored, jax.device_get(lora))
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target_sh)):
    assert got.sharding == want
