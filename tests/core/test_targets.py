"""Target matching on key paths: PEFT's suffix/regex rules, exclusions, layers, all-linear."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jlora
from jlora._src.core import paths
from jlora._src.core import targets as jlora_targets
from tests import zoo


@pytest.fixture(scope="module")
def llama():
  model = zoo.Llama()
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)


def _adapted(tree, **kw):
  cfg = jlora.LoraConfig(r=2, **kw)
  lora = jax.eval_shape(lambda: jlora.init(tree, cfg, key=jax.random.key(0)))
  return sorted(paths.to_str(p) for p, _ in paths.adapter_items(lora))


def test_suffix_rule(llama):
  got = _adapted(llama, target_modules=("q_proj", "v_proj"))
  assert got == [f"params/layers_{i}/{n}/kernel" for i in range(zoo.LAYERS) for n in ("q_proj", "v_proj")]
  # A longer suffix works too.
  assert _adapted(llama, target_modules=("layers_1/q_proj",)) == ["params/layers_1/q_proj/kernel"]


def test_substring_is_not_a_suffix(llama):
  with pytest.raises(ValueError, match=r"entry 'proj' matches no module.*Close module names: \[") as e:
    _adapted(llama, target_modules=("proj",))
  assert "layers_0/q_proj" in str(e.value)  # a sample of real module paths


def test_close_matches_are_listed(llama):
  with pytest.raises(ValueError, match=r"'q_prj'.*Close module names: \['q_proj'"):
    _adapted(llama, target_modules=("q_prj",))


def test_regex_full_match(llama):
  assert _adapted(llama, target_modules=r"layers_0/(q|k)_proj") == [
    "params/layers_0/k_proj/kernel",
    "params/layers_0/q_proj/kernel",
  ]
  with pytest.raises(ValueError, match="matches no module"):
    _adapted(llama, target_modules=r"q_proj")  # must match the whole path


def test_exclude_modules(llama):
  got = _adapted(llama, target_modules=("q_proj", "v_proj"), exclude_modules=("layers_0/v_proj",))
  assert "params/layers_0/v_proj/kernel" not in got and "params/layers_1/v_proj/kernel" in got
  with pytest.raises(ValueError, match="leaves nothing to adapt"):
    _adapted(llama, target_modules=("q_proj",), exclude_modules=r".*")


def test_layers_to_transform_linen_names(llama):
  got = _adapted(llama, target_modules=("q_proj",), layers_to_transform=1)
  assert got == ["params/layers_1/q_proj/kernel"]
  got = _adapted(llama, target_modules=("q_proj",), layers_to_transform=[0], layers_pattern="layers")
  assert got == ["params/layers_0/q_proj/kernel"]
  with pytest.raises(ValueError, match="selects none of the matched modules"):
    _adapted(llama, target_modules=("q_proj",), layers_to_transform=[0], layers_pattern="blocks")


def test_layers_to_transform_nnx_lists():
  state = nnx.state(zoo.NNXTransformer(nnx.Rngs(0)))
  got = _adapted(state, target_modules=("q_proj",), layers_to_transform=[1])
  assert got == ["layers/1/q_proj/kernel"]


def test_all_linear_skips_head_embeddings_and_norms(llama):
  got = _adapted(llama, target_modules="all-linear")
  assert len(got) == 7 * zoo.LAYERS
  assert not any("lm_head" in p or "embed" in p or "norm" in p for p in got)


def test_norms_and_biases_never_adapted(llama):
  with pytest.raises(ValueError, match="no adaptable kernel"):
    _adapted(llama, target_modules=("input_layernorm",))
  tree = {"fc": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}
  assert _adapted(tree, target_modules=("fc",)) == ["fc/kernel"]


def test_plain_dict_and_integer_leaves():
  tree = {"enc": {"w": jnp.zeros((3, 4)), "ids": jnp.zeros((3, 4), jnp.int32)}}
  assert _adapted(tree, target_modules=("enc",)) == ["enc/w"]


def test_modules_to_save_copies_leaves(llama):
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), modules_to_save=("lm_head",))
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), llama)
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  head = lora["params"]["lm_head"]["kernel"]
  assert head.shape == params["params"]["lm_head"]["kernel"].shape
  assert head is not params["params"]["lm_head"]["kernel"]
  with pytest.raises(ValueError, match="`modules_to_save` entry 'head_x' matches no module"):
    jlora.init(
      params, jlora.LoraConfig(target_modules=("q_proj",), modules_to_save=("head_x",)), key=jax.random.key(0)
    )


def test_module_paths_lists_targetable_modules(llama):
  mods = jlora.module_paths(llama)
  assert mods["layers_0/q_proj"] == {"kernel": (zoo.D, zoo.D)}
  assert mods["embed_tokens"] == {"embedding": (zoo.VOCAB, zoo.D)}
  assert "norm" not in mods and "layers_0/input_layernorm" not in mods


def test_a_weight_of_a_module_with_two_is_targetable_alone():
  case = zoo.BUILDERS["gemma_style"]()
  chosen = lambda targets: {  # noqa: E731
    c.param for c in jlora_targets.match_targets(case.tree, jlora.LoraConfig(target_modules=targets))
  }
  assert chosen(("linear",)) == {f"layer_{i}/mlp/linear" for i in range(zoo.LAYERS)}
  both = {f"layer_{i}/mlp/{w}" for i in range(zoo.LAYERS) for w in ("linear", "gating_einsum")}
  assert chosen(("mlp",)) == both
  assert chosen("layer_0/mlp/gating_einsum") == {"layer_0/mlp/gating_einsum"}
  with pytest.raises(ValueError, match=r"Close module names: \['linear'\]"):
    chosen(("lineat",))
  # Without the model, all-linear falls back to leaves named `kernel`; this model has none.
  with pytest.raises(
    ValueError,
    match=r"'all-linear'` without the model only sees leaves named `kernel`.*'layer_0/attn/q_einsum/w'",
  ):
    chosen("all-linear")


def test_all_linear_without_the_model_on_top_level_weights_names_them_and_the_fix():
  # Linen's self.param("q_w", ...) at the top module: module path '', which is never printed.
  tree = {"params": {"q_w": jnp.ones((4, 4)), "v_w": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"its weights: \['q_w', 'v_w'\]\. Pass the model .*apply_fn=") as err:
    jlora.init(tree, jlora.LoraConfig(target_modules="all-linear"), key=jax.random.key(0))
  assert "''" not in str(err.value)
  # With the model, all-linear finds them whatever their names.
  lora = jlora.init(
    tree,
    jlora.LoraConfig(target_modules="all-linear"),
    key=jax.random.key(0),
    apply_fn=lambda t, x: (x @ t["params"]["q_w"]) @ t["params"]["v_w"],
    example_args=(jnp.ones((2, 4)),),
  )
  assert sorted(lora["params"]) == ["q_w", "v_w"]
  # A tree of top-level leaves that leaves nothing to adapt lists parameter paths, not ''.
  with pytest.raises(ValueError, match=r"leaves nothing to adapt .* exist: \['q_w', 'v_w'\]"):
    jlora_targets.match_targets(tree, jlora.LoraConfig(target_modules=("q_w",), exclude_modules=("q_w",)))


def test_all_linear_leaves_out_a_keras_hub_reverse_embedding_head():
  tree = {"token_embedding": {"reverse_embeddings": jnp.ones((8, 16))}, "q": {"kernel": jnp.ones((8, 8))}}
  chosen = jlora_targets.match_targets(
    tree,
    jlora.LoraConfig(target_modules="all-linear"),
    linear={("token_embedding", "reverse_embeddings"), ("q", "kernel")},
  )
  assert [c.param for c in chosen] == ["q/kernel"]
