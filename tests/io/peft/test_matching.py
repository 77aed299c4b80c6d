"""Matching the file's PEFT modules to the tree's weights (`jlora._src.io.peft.matching`): layouts, shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import _peft as P


def test_bad_shape_names_key(exported):
  d, tree = exported
  cfg, tensors = P.read(d)
  key = f"{P.PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
  tensors[key] = np.zeros((5, 3), np.float32)
  P.rewrite(d, tensors)
  with pytest.raises(ValueError, match=r"v_proj\.lora_B\.weight.*shape \(5, 3\).*needs \(4, 3\)"):
    jlora.import_peft(d, tree)


def test_gpt2_conv1d_kernels_need_the_model_or_a_layout(tmp_path):
  # transformers' Flax GPT-2 stores Conv1D kernels (out, in); other code stores (in, out).
  tree = {"transformer": {"h": {"0": {"attn": {"c_attn": {"kernel": jnp.ones((12, 4))}}}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("c_attn",))
  with pytest.raises(
    ValueError, match=r"GPT-2 `Conv1D` weight.*apply_fn=.*'c_attn': 'oi'}` for transformers' FlaxGPT2"
  ):
    jlora.init(tree, cfg, key=jax.random.key(0))
  pinned = jlora.LoraConfig(
    r=2, target_modules=("c_attn",), layout_pattern={"c_attn": "oi"}, init_lora_weights=False
  )
  lora = jlora.init(tree, pinned, key=jax.random.key(0))
  assert lora["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["lora_A"].shape == (2, 4)  # (r, in)
  pcfg = jlora.export_peft(tmp_path, lora, pinned, base=tree)
  assert pcfg["fan_in_fan_out"] is True and pcfg["target_modules"] == ["c_attn"]
  with pytest.raises(
    ValueError, match=r"PEFT module 'transformer.h.0.attn.c_attn' adapts a kernel whose layout"
  ):
    jlora.import_peft(tmp_path, tree)
  lora2, cfg2 = jlora.import_peft(tmp_path, tree, layout_pattern={"c_attn": "oi"})
  chex.assert_trees_all_close(jlora.merge(tree, lora2, cfg2), jlora.merge(tree, lora, pinned))
