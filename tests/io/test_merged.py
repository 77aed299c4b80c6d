"""Tests for `save_merged`: the merged model as a plain orbax or safetensors checkpoint."""

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import jlora


def _tree():
  k = jax.random.split(jax.random.key(0), 3)
  layers = {f"layers_{i}": {"q_proj": {"kernel": jax.random.normal(k[i], (16, 32))}} for i in range(2)}
  return {"params": {"layers": layers, "head": {"kernel": jax.random.normal(k[2], (32, 8))}}}


def test_save_merged_orbax_and_safetensors(tmp_path):
  tree = _tree()
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",), init_lora_weights=False)
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  expected = jlora.merge(tree, lora, cfg)
  out = jlora.save_merged(tmp_path / "merged", tree, lora, cfg)
  with ocp.StandardCheckpointer() as ckptr:  # plain orbax, no jlora
    restored = ckptr.restore(out, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, expected))
  chex.assert_trees_all_equal(restored, expected)
  st = jlora.save_merged(tmp_path / "st", tree, lora, cfg, format="safetensors")
  assert st == str(tmp_path / "st" / "model.safetensors")
  flat = safetensors.numpy.load_file(st)
  assert len(flat) == 3
  np.testing.assert_array_equal(
    flat["params/layers/layers_1/q_proj/kernel"],
    np.asarray(expected["params"]["layers"]["layers_1"]["q_proj"]["kernel"]),
  )
  assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["model.safetensors"]  # no temporaries
  with pytest.raises(FileExistsError, match="already exists"):
    jlora.save_merged(tmp_path / "merged", tree, lora, cfg)
  with pytest.raises(FileExistsError, match=r"model.safetensors' already exists"):
    jlora.save_merged(tmp_path / "st", tree, lora, cfg, format="safetensors")
  with pytest.raises(ValueError, match=r"`format` must be 'orbax' or 'safetensors'; got 'npz'"):
    jlora.save_merged(tmp_path / "x", tree, lora, cfg, format="npz")
