"""PyTorch module names of jlora weights (`jlora._src.io.peft.names`)."""

import pytest

import jlora
from jlora._src.io.peft.names import default_name_map, hf_tree_map


def test_default_name_map():
  assert jlora.peft_module_name(("params", "model", "layers_0", "self_attn", "q_proj", "kernel")) == (
    "model.layers.0.self_attn.q_proj"
  )
  assert (
    jlora.peft_module_name(("model", "layers", 2, "mlp", "up_proj", "kernel")) == "model.layers.2.mlp.up_proj"
  )
  assert jlora.peft_module_name(("params", "model", "layers", "mlp", "up_proj", "kernel"), 5) == (
    "model.layers.5.mlp.up_proj"
  )
  assert jlora.peft_module_name(("params", "Dense_0", "kernel")) == "Dense_0"
  with pytest.raises(ValueError, match="no layer container"):
    jlora.peft_module_name(("params", "q_proj", "kernel"), 0)


def test_keras_hub_gemma_names_and_unknown_kernels():
  # keras-hub Gemma variables nested by their `path`.
  assert (
    default_name_map(("decoder_block_1", "attention", "query", "kernel")) == "model.layers.1.self_attn.q_proj"
  )
  assert default_name_map(("decoder_block_0", "ffw_gating_2", "kernel")) == "model.layers.0.mlp.up_proj"
  # A `kernel` outside any layer container or known top-level module is not taken for an HF name.
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'encoder/proj/kernel'"
  ):
    default_name_map(("encoder", "proj", "kernel"))
  assert default_name_map(("params", "lm_head", "kernel")) == "lm_head"


def test_hf_tree_map_names_the_modules_outside_the_layer_stack():
  # A numbered module list reads as Hugging Face's (ALBERT's layer groups, Wav2Vec2's conv layers).
  albert = ("encoder", "albert_layer_groups", "0", "albert_layers", "0", "ffn", "kernel")
  assert default_name_map(albert) == "encoder.albert_layer_groups.0.albert_layers.0.ffn"
  pooler, query = (
    ("pooler", "dense", "kernel"),
    ("encoder", "layer", "0", "attention", "self", "query", "kernel"),
  )
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'pooler/dense/kernel'"
  ):
    default_name_map(pooler)
  # On a tree that is Hugging Face's (BERT), the leaves outside the layer stack mirror PyTorch's too.
  bert = hf_tree_map(default_name_map, [pooler, query])
  assert bert(pooler) == "pooler.dense" and bert(query) == "encoder.layer.0.attention.self.query"
  assert bert(("embeddings_project", "kernel")) == "embeddings_project"  # ELECTRA
  # Not on a tree none of whose paths reads as Hugging Face's, nor for a map the user gave.
  proj = ("encoder", "proj", "kernel")
  with pytest.raises(
    ValueError, match=r"No PEFT name map jlora knows names the weight 'encoder/proj/kernel'"
  ):
    hf_tree_map(default_name_map, [proj, pooler])(proj)
  mine = lambda path, index: "x"  # noqa: E731
  assert hf_tree_map(mine, [pooler, query]) is mine
