"""Tests for `jlora._src.core.layouts`: roles, factor shapes, reading layouts back from shapes and uses."""

import pytest

import jlora
from jlora._src.core import layouts
from jlora._src.core.layouts import Layout


@pytest.mark.parametrize(
  "roles, kernel, a, b",
  [
    ("io", (16, 32), (16, 4), (4, 32)),  # Flax Dense
    ("oi", (32, 16), (4, 16), (32, 4)),  # GPT-2 (out, in): PEFT's lora_A (r, in), lora_B (out, r)
    ("oio", (2, 16, 8), (4, 16), (2, 4, 8)),  # gemma q_einsum (N, D, H)
    ("soio", (2, 1, 16, 8), (2, 4, 16), (2, 1, 4, 8)),  # gemma kv_einsum (2, K, D, H)
    ("iso", (16, 3, 32), (16, 3, 4), (4, 3, 32)),  # MaxText scan (in, L, out)
    ("sio", (3, 16, 32), (3, 16, 4), (3, 4, 32)),  # nn.scan (L, in, out)
    ("iiio", (3, 3, 8, 6), (3, 3, 8, 4), (4, 6)),  # conv (kh, kw, cin, cout)
  ],
)
def test_factor_shapes_keep_the_kernel_order_and_read_back(roles, kernel, a, b):
  lay = Layout(roles)
  assert layouts.factor_shapes(lay, kernel, 4) == (a, b)
  found = layouts.readings(kernel, a, b, layer_axis_ok=False)
  assert [f.layout for f in found] == [lay] and found[0].rank == 4
  assert (lay, kernel) in layouts.kernels_for(a, b, 4)


def test_canonical_permutations():
  lay = Layout("iso")  # kernel (in, L, out); A (in, L, r); B (r, L, out)
  assert lay.factor_axes("a") == (0, 1, layouts.RANK)
  assert lay.factor_axes("b") == (layouts.RANK, 1, 2)
  assert lay.canonical_perm("a") == (1, 0, 2)  # -> (L, in, r)
  assert lay.canonical_perm("b") == (1, 0, 2)  # -> (L, r, out)
  assert lay.kernel_perm() == (1, 0, 2)
  assert Layout("oio").canonical_perm("b") == (1, 0, 2)  # (N, r, H) -> (r, N, H)


def test_layer_axis_may_be_shortened():
  found = layouts.readings((4, 16, 32), (2, 16, 3), (2, 3, 32), layer_axis_ok=True)
  assert [(f.layout.roles, f.rank, f.layers) for f in found] == [("sio", 3, 2)]
  assert layouts.readings((4, 16, 32), (2, 16, 3), (2, 3, 32), layer_axis_ok=False) == []


def test_rank_equal_to_an_axis_is_ambiguous():
  found = layouts.readings((8, 8), (8, 8), (8, 8), layer_axis_ok=False)
  assert sorted(f.layout.roles for f in found) == ["io", "oi"]


def test_layout_validation_and_counts():
  assert Layout.of_counts(4, stacked=1, fan_in=2).roles == "siio"
  with pytest.raises(ValueError, match="leaves no fan-out axis"):
    Layout.of_counts(2, stacked=1, fan_in=1)
  with pytest.raises(ValueError, match="at least one fan-in"):
    Layout("oo")
  with pytest.raises(ValueError, match="string of axis roles"):
    Layout("iox")
  assert jlora.Layout("io") == Layout("io", ops=frozenset({"dot_general"}))


def test_grouped_conv_factors_read_back_from_their_shapes():
  # Conv2d(8, 8, 3, groups=2): kernel (3, 3, 4, 8); A over all 8 input channels, B (r / 2, out), as PEFT's
  grouped = layouts.Layout("iiio", groups=2, group_axis=2)
  assert layouts.factor_shapes(grouped, (3, 3, 4, 8), 4) == ((3, 3, 8, 4), (2, 8))
  assert str(grouped) == "iiio (groups=2 on axis 2)" and grouped != layouts.Layout("iiio")
  assert layouts.readings((3, 3, 4, 8), (3, 3, 8, 4), (2, 8), False) == [layouts.Reading(grouped, 4, None)]
  assert [r.layout for r in layouts.readings((3, 3, 4, 8), (3, 3, 4, 4), (4, 8), False)] == [
    layouts.Layout("iiio")
  ]
  with pytest.raises(ValueError, match="Rank 3 is not a multiple of the 2 groups"):
    layouts.factor_shapes(grouped, (3, 3, 4, 8), 3)
  with pytest.raises(ValueError, match="names its input-feature axis, a fan-in axis"):
    layouts.Layout("iiio", groups=2, group_axis=3)
  with pytest.raises(ValueError, match="names its input-feature axis"):
    layouts.Layout("iiio", groups=1, group_axis=2)


def test_from_uses_splits_fused_outputs_and_reports_conflicts():
  dot = ("dot_general", {0: "o", 1: "o", 2: "i", 3: "o"})
  parts = [("index", {0: f"{layouts.SPLIT}{k}"}) for k in range(2)]
  assert layouts.from_uses([dot, *parts], (2, 1, 16, 8), "kv").roles == "soio"
  # Taking one entry only (a classifier picking a logit) keeps the axis a fan-out axis.
  assert layouts.from_uses([dot, parts[0]], (2, 1, 16, 8), "kv").roles == "ooio"
  with pytest.raises(ValueError, match="conflicting axis roles"):
    layouts.from_uses([("dot_general", {0: "i", 1: "o"}), ("dot_general", {0: "o", 1: "i"})], (4, 4), "w")
  conv = ("conv_general_dilated", {0: "i", 1: f"{layouts.GROUPED}2", 2: "o"})
  assert layouts.from_uses([conv], (3, 4, 8), "m/w") == layouts.Layout("iio", groups=2, group_axis=1)
  with pytest.raises(ValueError, match="no LoRA layout"):
    layouts.from_uses([("dot_general", {0: "i"})], (4, 4), "w")
  tied = [("gather", {0: "i", 1: "o"}), ("dot_general", {0: "o", 1: "i"})]
  assert layouts.from_uses(tied, (32, 8), "embed").roles == "io"  # the lookup's layout wins
