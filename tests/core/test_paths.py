"""Key paths (`jlora._src.core.paths`): JAX key paths reduced to plain keys, module paths, adapter nodes."""

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.core import paths


def test_key_paths_reduce_to_plain_keys_and_module_paths():
  tree = {"params": {"layers": [{"q_proj": {"kernel": jnp.ones((2, 3))}}]}}
  ((path, leaf),) = paths.leaves_with_paths(tree)
  assert path == ("params", "layers", 0, "q_proj", "kernel") and leaf.shape == (2, 3)
  assert paths.to_str(path) == "params/layers/0/q_proj/kernel"
  assert paths.is_collections(tree) and not paths.is_collections(tree["params"])
  assert paths.module_path(path, collections=True) == "layers/0/q_proj"  # no collection, no leaf name
  assert paths.module_path(path[1:], collections=False) == "layers/0/q_proj"
  attr = (jax.tree_util.GetAttrKey("w"), jax.tree_util.GetAttrKey("value"))  # an NNX Variable's value
  assert paths.normalize(attr) == ("w",)
  assert paths.normalize((jax.tree_util.DictKey(("a", 1)),)) == ("('a', 1)",)  # a key of another type


def test_adapter_nodes_and_their_walk():
  pair = {"lora_A": np.ones((2, 1)), "lora_B": np.ones((1, 3))}
  assert paths.is_adapter(pair) and paths.is_adapter({**pair, "lora_magnitude": np.ones(3)})
  assert not paths.is_adapter({"lora_A": pair["lora_A"]}) and not paths.is_adapter({**pair, "x": 1})
  lora = {"b": {"kernel": pair}, "a": np.ones(2), 0: {"kernel": pair}}
  assert [p for p, _ in paths.adapter_items(lora)] == [(0, "kernel"), ("a",), ("b", "kernel")]  # ints first
  out: dict = {}
  paths.nested_set(out, ("x", 1, "kernel"), pair)
  assert out == {"x": {1: {"kernel": pair}}}
