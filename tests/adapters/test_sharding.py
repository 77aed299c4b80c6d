"""Tests for `jlora.adapter_specs` and sharded `jlora.init` on 8 simulated CPU devices.

The expected specs are written out by hand from the rule (A: the kernel's
stacked + fan-in entries and a replicated rank axis; B: stacked entries, rank,
fan-out entries). Sharded results are compared with the same computation run
unsharded on one device. Sharded training steps: `tests/e2e/test_sharded_training.py`.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from tests import _sharding_models
from tests._sharding_models import FSDP_TP_RULES, LAYOUTS, TARGETS, Llama, LlamaConfig, mesh


@pytest.fixture(scope="module")
def mesh_fsdp_tp():
  return mesh((2, 4), ("fsdp", "tp"))


@pytest.fixture(scope="module")
def small():
  return _sharding_models.small()


def _specs(tree):
  return jax.tree_util.tree_map(
    lambda s: s.spec if isinstance(s, NamedSharding) else s,
    tree,
    is_leaf=lambda x: isinstance(x, (NamedSharding, P)),
  )


# Hand-derived from the logical names in `_sharding_models` under FSDP_TP_RULES.
EXPECTED_FSDP_TP = {
  "embed_tokens": {"embedding": (P("tp", None), P(None, "fsdp"))},  # (vocab, embed)
  "lm_head": {"kernel": (P("fsdp", None), P(None, "tp"))},  # (embed, vocab)
  "layers": {
    "q_proj": {"kernel": (P(None, "fsdp", None), P(None, None, "tp", None))},  # (L, embed, heads, hd)
    "k_proj": {"kernel": (P(None, "fsdp", None), P(None, None, "tp", None))},
    "v_proj": {"kernel": (P(None, "fsdp", None), P(None, None, "tp", None))},
    "o_proj": {"kernel": (P(None, "tp", None, None), P(None, None, "fsdp"))},  # (L, heads, hd, embed)
    "gate_proj": {"kernel": (P(None, "fsdp", None), P(None, None, "tp"))},  # (L, embed, mlp)
    "down_proj": {"kernel": (P(None, "tp", None), P(None, None, "fsdp"))},  # (L, mlp, embed)
  },
}


def _expected(table):
  return {
    "params": jax.tree_util.tree_map(
      lambda ab: {"lora_A": ab[0], "lora_B": ab[1]}, table, is_leaf=lambda x: isinstance(x, tuple)
    )
  }


# -- spec derivation -------------------------------------------------------------------------------


def test_specs_of_a_dense_kernel_from_partition_specs(mesh_fsdp_tp):
  params = {"blk": {"q_proj": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros(32)}}}
  cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  specs = {"blk": {"q_proj": {"kernel": P("fsdp", "tp"), "bias": P("tp")}}}
  got = jlora.adapter_specs(params, lora, cfg, specs=specs)
  assert got == {"blk": {"q_proj": {"kernel": {"lora_A": P("fsdp", None), "lora_B": P(None, "tp")}}}}
  named = jlora.adapter_specs(params, lora, cfg, specs=specs, mesh=mesh_fsdp_tp)
  assert named["blk"]["q_proj"]["kernel"]["lora_B"] == NamedSharding(mesh_fsdp_tp, P(None, "tp"))
  # A spec shorter than the kernel's rank means trailing replicated axes.
  short = jlora.adapter_specs(params, lora, cfg, specs={"blk": {"q_proj": {"kernel": P("fsdp")}}})
  assert short["blk"]["q_proj"]["kernel"] == {"lora_A": P("fsdp", None), "lora_B": P(None, None)}


@pytest.mark.parametrize(
  "layout, shape, spec, want_a, want_b",
  [
    ("oi", (32, 16), P("tp", "fsdp"), P(None, "fsdp"), P("tp", None)),  # GPT-2 (out, in): A (r, in)
    ("iso", (16, 3, 32), P("fsdp", None, "tp"), P("fsdp", None, None), P(None, None, "tp")),  # (in, L, out)
    ("soio", (2, 4, 16, 8), P(None, "tp", "fsdp", None), P(None, None, "fsdp"), P(None, "tp", None, None)),
  ],
)
def test_specs_follow_any_storage_order(layout, shape, spec, want_a, want_b):
  params = {"blk": {"proj": {"kernel": jnp.zeros(shape)}}}
  cfg = jlora.LoraConfig(r=4, target_modules=("proj",), layout_pattern={"proj": layout})
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  got = jlora.adapter_specs(params, lora, cfg, specs={"blk": {"proj": {"kernel": spec}}})
  assert got["blk"]["proj"]["kernel"] == {"lora_A": want_a, "lora_B": want_b}


def test_specs_of_nd_and_stacked_kernels_from_logical_metadata(small):
  """DenseGeneral (L, embed, heads, hd) / (L, heads, hd, embed), scanned (L, in, out), embedding."""
  got = jlora.adapter_specs(small["boxed"], small["lora"], small["cfg"], rules=FSDP_TP_RULES)
  assert _specs(got) == _expected(EXPECTED_FSDP_TP)
  # The same from an explicit tree of logical PartitionSpecs (what `nn.get_partition_spec` gives).
  logical = nn.get_partition_spec(small["boxed"])
  again = jlora.adapter_specs(
    small["params"], small["lora"], small["cfg"], specs=logical, rules=FSDP_TP_RULES
  )
  assert _specs(again) == _expected(EXPECTED_FSDP_TP)
  # ... and from a contextual `nn.logical_axis_rules`.
  with nn.logical_axis_rules(FSDP_TP_RULES):
    ctx = jlora.adapter_specs(small["boxed"], small["lora"], small["cfg"])
  assert _specs(ctx) == _expected(EXPECTED_FSDP_TP)


def test_specs_from_named_shardings_of_sharded_arrays(small, mesh_fsdp_tp):
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(small["boxed"]), mesh_fsdp_tp, FSDP_TP_RULES)
  placed = jax.device_put(small["params"], shardings)
  from_arrays = jlora.adapter_specs(placed, small["lora"], small["cfg"])
  from_shardings = jlora.adapter_specs(small["params"], small["lora"], small["cfg"], specs=shardings)
  assert from_arrays == from_shardings
  leaves = jax.tree_util.tree_leaves(from_arrays)
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh_fsdp_tp for s in leaves)
  assert _specs(from_arrays) == _expected(EXPECTED_FSDP_TP)


@pytest.mark.parametrize(
  ("layers", "mesh_given", "stacked_entry"),
  [
    (None, True, "fsdp"),  # all 4 layers: the layer axis follows the kernel
    ((0, 2), True, "fsdp"),  # 2 layers over fsdp=2: still divisible
    ((1,), True, None),  # 1 layer cannot be split over fsdp=2: replicated
    ((0, 2), False, None),  # no mesh, divisibility unknown: replicated
  ],
)
def test_layer_axis_shortened_by_layers_to_transform(mesh_fsdp_tp, layers, mesh_given, stacked_entry):
  params = {"layers": {"q_proj": {"kernel": jnp.zeros((4, 16, 32))}}}
  cfg = jlora.LoraConfig(
    r=2, target_modules=("q_proj",), layout_pattern={"q_proj": (1, 1)}, layers_to_transform=layers
  )
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  assert lora["layers"]["q_proj"]["kernel"]["lora_A"].shape[0] == (4 if layers is None else len(layers))
  specs = {"layers": {"q_proj": {"kernel": P("fsdp", None, "tp")}}}
  got = jlora.adapter_specs(params, lora, cfg, specs=specs, mesh=mesh_fsdp_tp if mesh_given else None)
  assert _specs(got)["layers"]["q_proj"]["kernel"] == {
    "lora_A": P(stacked_entry, None, None),
    "lora_B": P(stacked_entry, None, "tp"),
  }


def test_overrides_replace_matching_modules_only(small):
  over = {"q_proj": (P(None, None, None), P(None, None, None, None)), "layers/o_proj": ((), ())}
  got = jlora.adapter_specs(small["boxed"], small["lora"], small["cfg"], rules=FSDP_TP_RULES, overrides=over)
  table = dict(EXPECTED_FSDP_TP, layers=dict(EXPECTED_FSDP_TP["layers"]))
  table["layers"]["q_proj"] = {"kernel": over["q_proj"]}
  table["layers"]["o_proj"] = {"kernel": (P(), P())}
  assert _specs(got) == _expected(table)


def test_modules_to_save_copies_follow_their_base_leaf(small, mesh_fsdp_tp):
  cfg = jlora.LoraConfig(
    r=4, target_modules=("q_proj",), modules_to_save=("lm_head",), layout_pattern=LAYOUTS
  )
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(small["boxed"]), mesh_fsdp_tp, FSDP_TP_RULES)
  placed = jax.device_put(small["params"], shardings)
  lora = jlora.init(placed, cfg, key=jax.random.key(2), shardings=mesh_fsdp_tp)
  head = lora["params"]["lm_head"]["kernel"]
  assert head.sharding.spec == P("fsdp", "tp")
  np.testing.assert_array_equal(head, small["params"]["params"]["lm_head"]["kernel"])
  assert lora["params"]["layers"]["q_proj"]["kernel"]["lora_A"].sharding.spec == P(None, "fsdp", None)


def test_errors_name_the_path_and_the_fix(small, mesh_fsdp_tp):
  boxed, lora, cfg = small["boxed"], small["lora"], small["cfg"]
  logical = nn.get_partition_spec(boxed)
  del logical["params"]["layers"]["q_proj"]
  with pytest.raises(ValueError, match=r"no spec for 'params/layers/q_proj/kernel'.*`specs=`"):
    jlora.adapter_specs(small["params"], lora, cfg, specs=logical, rules=FSDP_TP_RULES)
  with pytest.raises(ValueError, match=r"`overrides` pattern 'qproj' matches no adapted module.*q_proj"):
    jlora.adapter_specs(boxed, lora, cfg, rules=FSDP_TP_RULES, overrides={"qproj": (P(), P())})
  with pytest.raises(ValueError, match=r"overrides\['gate_proj'\]\[0\].*4 entries for an array of 3"):
    too_long = P(None, None, None, None)
    jlora.adapter_specs(boxed, lora, cfg, rules=FSDP_TP_RULES, overrides={"gate_proj": (too_long, P())})
  with pytest.raises(ValueError, match=r"must be a pair"):
    jlora.adapter_specs(boxed, lora, cfg, rules=FSDP_TP_RULES, overrides={"gate_proj": P()})
  # Logical names used as mesh axes: the mesh has no axis 'embed'.
  with pytest.raises(ValueError, match=r"'params/embed_tokens/embedding'.*names mesh axis 'vocab'.*`rules=`"):
    jlora.adapter_specs(small["params"], lora, cfg, specs=logical | {}, mesh=mesh_fsdp_tp)
  plain = {"q_proj": {"kernel": jnp.zeros((4, 8))}}
  plain_cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
  plain_lora = jlora.init(plain, plain_cfg, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"`shardings` must mirror the adapter tree"):
    jlora.init(
      plain, plain_cfg, key=jax.random.key(0), shardings={"q_proj": NamedSharding(mesh_fsdp_tp, P())}
    )
  specs = jlora.adapter_specs(plain, plain_lora, plain_cfg, specs={"q_proj": {"kernel": P("fsdp")}})
  with pytest.raises(TypeError, match=r"PartitionSpecs need a mesh"):
    jlora.init(plain, plain_cfg, key=jax.random.key(0), shardings=specs)


# -- sharded creation ------------------------------------------------------------------------------


def test_sharded_init_places_each_leaf_and_matches_unsharded_values(small, mesh_fsdp_tp):
  cfg = small["cfg"]
  shardings = jlora.adapter_specs(small["boxed"], small["lora"], cfg, rules=FSDP_TP_RULES, mesh=mesh_fsdp_tp)
  lora = jlora.init(small["params"], cfg, key=jax.random.key(1), shardings=shardings)
  for got, want in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(shardings)):
    assert got.sharding == want
  # Partitionable threefry: the same key gives the same values however the output is split.
  chex.assert_trees_all_equal(lora, small["lora"])


def test_sharded_init_runs_under_jit_and_never_holds_the_whole_adapter(mesh_fsdp_tp):
  """Compiled abstractly for a wider model: per-device output is one shard per leaf and the
  per-device peak (output + temporaries) stays below the size of the whole adapter."""
  model = Llama(LlamaConfig(vocab=512, dim=256, heads=8, mlp=512, layers=4))
  tokens = jax.ShapeDtypeStruct((8, 8), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  cfg = jlora.LoraConfig(r=16, target_modules=TARGETS[:6])

  def make(key):
    with nn.logical_axis_rules(FSDP_TP_RULES):
      return jlora.init(
        abstract, cfg, key=key, apply_fn=model.apply, example_args=(tokens,), shardings=mesh_fsdp_tp
      )

  key = jax.random.key(0)
  jaxpr = jax.make_jaxpr(make)(key)
  (eqn,) = jaxpr.jaxpr.eqns  # one jitted computation, nothing created outside it
  assert eqn.primitive.name in ("jit", "pjit")
  shapes = jax.eval_shape(make, key)
  with nn.logical_axis_rules(FSDP_TP_RULES):
    want = jlora.adapter_specs(abstract, shapes, cfg, mesh=mesh_fsdp_tp)
  assert tuple(eqn.params["out_shardings"]) == tuple(jax.tree_util.tree_leaves(want))

  stats = jax.jit(make).lower(key).compile().memory_analysis()
  shard_bytes = sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(want))
  )
  full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  # Plus one 8-byte buffer pointer per output leaf in the output tuple.
  assert 0 <= stats.output_size_in_bytes - shard_bytes <= 8 * len(jax.tree_util.tree_leaves(shapes))
  assert stats.output_size_in_bytes + stats.temp_size_in_bytes < full_bytes
