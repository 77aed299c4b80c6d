"""`jlora.stack`: the bank's layout, padding, scales and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora._src.adapters import spec as spec_lib

PARAMS = {
  "params": {
    "layers_0": {
      "q_proj": {"kernel": jnp.ones((8, 6))},
      "v_proj": {"kernel": jnp.ones((8, 6))},
    },
    "stacked": {"up": {"kernel": jnp.ones((3, 8, 5))}},
  }
}


def _adapter(key, **kw):
  cfg = jlora.LoraConfig(**{"init_lora_weights": "gaussian", **kw})
  lora = jlora.init(PARAMS, cfg, key=jax.random.key(key))
  # B starts at zero; make it non-zero so that padding mistakes would show.
  lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(key + 100), x.shape), lora)
  return lora, cfg


def _delta(lora, cfg, path):
  """scale * A @ B of one 2-D kernel, computed directly from the adapter tree."""
  node = lora
  for k in path:
    node = node[k]
  names = ("/".join(path[1:-1]), "/".join(path[1:]))
  return cfg.scale_for(names) * node["lora_A"] @ node["lora_B"]


def test_stack_pads_ranks_and_keeps_each_adapter_exactly():
  a = _adapter(0, r=2, lora_alpha=4.0, target_modules=("q_proj",))
  b = _adapter(1, r=4, lora_alpha=2.0, use_rslora=True, target_modules=("q_proj", "v_proj"))
  bank = jlora.stack([a, b], names=["a", "b"])
  q = bank.lora["params"]["layers_0"]["q_proj"]["kernel"]
  v = bank.lora["params"]["layers_0"]["v_proj"]["kernel"]
  assert q["lora_A"].shape == (2, 8, 4) and q["lora_B"].shape == (2, 4, 6)
  assert v["lora_A"].shape == (2, 8, 4)
  np.testing.assert_array_equal(v["lora_A"][0], 0.0)  # "a" does not adapt v_proj
  path = ("params", "layers_0", "q_proj", "kernel")
  entry = bank.config.entry(path)
  assert entry.ranks == (2, 4)
  np.testing.assert_allclose(entry.scales, (2.0, 1.0))  # 4/2, and 2/sqrt(4)
  # The padded factors of "a" give its own product.
  np.testing.assert_allclose(
    entry.scales[0] * q["lora_A"][0] @ q["lora_B"][0], _delta(a[0], a[1], path), rtol=1e-6
  )
  for k, (lora, cfg) in enumerate((a, b)):
    back, back_cfg = bank.adapter(bank.names[k])
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, lora)
  assert bank.config.entry(("params", "layers_0", "v_proj", "kernel")).ranks == (0, 4)


def test_stack_stacked_kernels_and_the_bank_config_plan():
  a = _adapter(2, r=2, target_modules=("up",), layout_pattern={"up": "sio"})
  b = _adapter(3, r=3, target_modules=("up", "q_proj"), layout_pattern={"up": "sio"})
  bank = jlora.stack([a, b])
  up = bank.lora["params"]["stacked"]["up"]["kernel"]
  assert up["lora_A"].shape == (2, 3, 8, 3) and up["lora_B"].shape == (2, 3, 3, 5)
  cfg = bank.config.lora_config
  specs = spec_lib.plan(PARAMS, cfg)
  assert {s.path: s.rank for s in specs} == {
    ("params", "layers_0", "q_proj", "kernel"): 3,
    ("params", "stacked", "up", "kernel"): 3,
  }
  assert all(s.scale == 1.0 for s in specs)
  # The bank's config describes the padded trees: slice 0 is a valid adapter tree for it.
  jlora.merge(PARAMS, jax.tree.map(lambda x: x[0], bank.lora), cfg)
  assert bank.names == ("adapter_0", "adapter_1") and len(bank) == 2


def test_bank_is_a_pytree_with_static_config():
  bank = jlora.stack([_adapter(0, r=2, target_modules=("q_proj",))])
  leaves, treedef = jax.tree.flatten(bank)
  assert len(leaves) == 2
  again = jax.tree.unflatten(treedef, leaves)
  assert again.config == bank.config
  doubled = jax.jit(lambda b: jax.tree.map(lambda x: 2 * x, b))(bank)
  np.testing.assert_allclose(jax.tree.leaves(doubled)[0], 2 * leaves[0])


def test_stack_errors():
  a = _adapter(0, r=2, target_modules=("q_proj",))
  with pytest.raises(ValueError, match="at least one"):
    jlora.stack([])
  with pytest.raises(ValueError, match="unique strings"):
    jlora.stack([a, a], names=["x", "x"])
  with pytest.raises(TypeError, match="LoraConfig"):
    jlora.stack([(a[0], {"r": 2})])
  other = {"params": {"layers_0": {"q_proj": {"kernel": jnp.ones((7, 6))}}}}
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  foreign = (jlora.init(other, cfg, key=jax.random.key(5)), cfg)
  with pytest.raises(ValueError, match="different bases"):
    jlora.stack([a, foreign])
  saved_cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("v_proj",))
  saved = (jlora.init(PARAMS, saved_cfg, key=jax.random.key(6)), saved_cfg)
  with pytest.raises(ValueError, match="trained copy"):
    jlora.stack([a, saved])
  dora_cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), use_dora=True)
  with pytest.raises(ValueError, match=r"q_proj/kernel/lora_magnitude' is DoRA's magnitude.*jlora.merge"):
    jlora.stack([a, (jlora.init(PARAMS, dora_cfg, key=jax.random.key(7)), dora_cfg)])
  with pytest.raises(ValueError, match="do not belong together"):
    jlora.stack([(a[0], jlora.LoraConfig(r=3, target_modules=("q_proj",)))])
  lay_a = _adapter(2, r=2, target_modules=("up",), layout_pattern={"up": "sio"})
  lay_b = (lay_a[0], jlora.LoraConfig(r=2, target_modules=("up",), layout_pattern={"up": "soi"}))
  with pytest.raises(ValueError, match="different layouts"):
    jlora.stack([lay_a, lay_b])
  bank = jlora.stack([a])
  with pytest.raises(KeyError, match="No adapter named"):
    bank.adapter("nope")
  with pytest.raises(IndexError, match="out of range"):
    bank.adapter(3)
