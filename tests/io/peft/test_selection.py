"""What the file's config selects and every tensor claimed (`jlora._src.io.peft.selection`), as PEFT
selects them."""

import warnings

import jax
import numpy as np
import pytest

import jlora
from tests import _peft as P


def test_bad_dtype_and_unknown_and_missing_keys(exported):
  d, tree = exported
  cfg, tensors = P.read(d)
  good = dict(tensors)
  key = f"{P.PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
  tensors[key] = tensors[key].astype(np.int32)
  P.rewrite(d, tensors)
  with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*dtype I32"):
    jlora.import_peft(d, tree)
  k_proj = f"{P.PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"
  P.rewrite(d, {**good, k_proj: np.zeros((3, 8), np.float32)})
  # The config does not select k_proj: PEFT ignores its tensor, and jlora says so.
  with pytest.warns(
    UserWarning, match=r"module\(s\) \['model.layers.0.self_attn.k_proj'\] that adapter_config"
  ):
    jlora.import_peft(d, tree)
  # Selected, but the tree has no such module: a wrong base model or name map.
  P.rewrite(d, config={**cfg, "target_modules": cfg["target_modules"] + ["model.layers.0.self_attn.k_proj"]})
  with pytest.raises(ValueError, match=r"no leaf of the given tree maps to tensor .*k_proj"):
    jlora.import_peft(d, tree)
  P.rewrite(d, good, cfg)
  missing = dict(good)
  del missing[f"{P.PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"]
  P.rewrite(d, missing)
  with pytest.raises(ValueError, match=r"not '.*q_proj\.lora_B\.weight'"):
    jlora.import_peft(d, tree)


@pytest.mark.parametrize(
  ("fields", "ignored"),
  [
    (
      {"target_modules": ["q_proj", "v_proj"]},
      r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.k_proj",
    ),
    ({"target_modules": ["q_proj"]}, r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.v_proj'\]"),
    ({"target_modules": list(P.PROJ), "layers_to_transform": [1]}, r"\['model.layers.0.self_attn.k_proj'"),
    (
      {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"},
      r"\['model.layers.0.self_attn.k_proj', .*layers.1.self_attn.k_proj'\]",
    ),
    (
      {"target_modules": list(P.PROJ), "exclude_modules": ["layers.0.self_attn.v_proj"]},
      r"\['model.layers.0.self_attn.v_proj'\]",
    ),
  ],
  ids=["extra_k", "extra_k_and_v", "layers_to_transform", "regex", "exclude_modules"],
)
@P.PEFT_WARNINGS
def test_import_applies_what_peft_selects(tmp_path, fields, ignored):
  tree = P.attn_tree()
  P.peft_file_of_every_module(tmp_path, tree)
  cfg, tensors = P.read(tmp_path)
  P.rewrite(tmp_path, tensors, {**cfg, **fields})
  with pytest.warns(UserWarning, match=rf"module\(s\) {ignored}.*does not select.*PEFT ignores them"):
    lora, jcfg = jlora.import_peft(tmp_path, tree)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT says nothing of the tensors it drops; other chatter is not ours
    theirs = P.peft_outputs(tmp_path, tree)
  ours = np.asarray(jlora.wrap(P.attn_apply, jcfg)(tree, lora, P.XS))
  assert np.abs(ours - P.attn_apply(tree, P.XS)).max() > 1e-2  # the adapter changes the outputs
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@P.PEFT_WARNINGS
def test_an_all_linear_file_adapts_the_linear_modules_as_peft_expands_it(tmp_path):
  tree = {**P.attn_tree(), "lm_head": {"kernel": jax.random.normal(jax.random.key(8), (P.D, 3))}}
  P.peft_file_of_every_module(tmp_path, tree)  # q, k and v of every layer
  cfg, tensors = P.read(tmp_path)
  P.rewrite(tmp_path, tensors, {**cfg, "target_modules": "all-linear"})
  lora, jcfg = jlora.import_peft(tmp_path, tree)  # no warning: every tensor is a linear module's
  assert "lm_head" not in lora and len(jax.tree_util.tree_leaves(lora)) == 2 * len(P.PROJ) * P.LAYERS
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = P.peft_outputs(tmp_path, tree)
  np.testing.assert_allclose(jlora.wrap(P.attn_apply, jcfg)(tree, lora, P.XS), theirs, atol=1e-5, rtol=0)
  # The output head is never a linear module of "all-linear" (PEFT excludes a model's output embeddings).
  head = {f"{P.PREFIX}lm_head.lora_A.weight": np.ones((2, P.D), np.float32)}
  head[f"{P.PREFIX}lm_head.lora_B.weight"] = np.ones((3, 2), np.float32)
  P.rewrite(tmp_path, {**tensors, **head}, {**cfg, "target_modules": "all-linear"})
  with pytest.warns(UserWarning, match=r"module\(s\) \['lm_head'\] that adapter_config.json does not select"):
    lora, _ = jlora.import_peft(tmp_path, tree)
  assert "lm_head" not in lora


@P.PEFT_WARNINGS
def test_a_regex_target_that_selects_nothing_is_an_error_as_in_peft(tmp_path):
  tree = P.attn_tree()
  P.peft_file_of_every_module(tmp_path, tree)
  cfg, tensors = P.read(tmp_path)
  P.rewrite(tmp_path, tensors, {**cfg, "target_modules": r".*\.o_proj"})
  with pytest.raises(ValueError, match=r"Target modules .*o_proj not found in the base model"):
    P.peft_outputs(tmp_path, tree)
  with pytest.raises(
    ValueError, match=r"`target_modules`='\.\*\\\\\.o_proj' select no module of the base model.*PEFT refuses"
  ):
    jlora.import_peft(tmp_path, tree)
  P.rewrite(tmp_path, tensors, {**cfg, "target_modules": r".*\.q_proj", "layers_to_transform": [1]})
  with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
    P.peft_outputs(tmp_path, tree)
  with pytest.raises(
    ValueError, match=r"`layers_to_transform`=\[1\] with a regex `target_modules`.*PEFT refuses"
  ):
    jlora.import_peft(tmp_path, tree)
