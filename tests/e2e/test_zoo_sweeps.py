"""The unit modules' checks on the larger zoo models, where each takes seconds to compile.

Each unit module runs its check on the zoo models that cover its paths cheaply and keeps the check's body
(a ``check_...`` function); this file runs the same body on the rest of the zoo: scanned layers, N-D einsums,
MaxText's layout, the MoE decoder.
"""

import dataclasses

import numpy as np
import pytest

import jlora
from tests import zoo
from tests.adapters import test_dora
from tests.interpret import test_fusion
from tests.interpret.rules import test_routing

# -- DoRA (tests/adapters/test_dora.py) -----------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_scan", "gpt2_style", "gemma_style", "maxtext_scan", "convnet"])
def test_dora_wrapped_equals_the_merged_kernel(name):
  test_dora.check_wrapped_equals_the_merged_dora_kernel(name)


@pytest.mark.parametrize("name", ["llama_scan", "gemma_style"])
def test_dora_recompute_gives_the_same_values_and_gradients(name):
  test_dora.check_recompute_gives_the_same_values_and_gradients(name)


def test_dora_experts_materialise_with_the_warning_and_match_the_merge():
  case = zoo.BUILDERS["moe_scan"]()
  cfg = dataclasses.replace(case.config, use_dora=True)
  lora = zoo.trained(
    jlora.init(case.tree, cfg, key=test_dora.K[1], apply_fn=case.apply_fn, example_args=(case.inputs,)),
    test_dora.K[2],
  )
  with pytest.warns(jlora.MaterializationWarning, match=r"experts/w[io]'.*ragged_dot"):
    got = jlora.wrap(case.apply_fn, cfg)(case.tree, lora, case.inputs)
  want = case.apply_fn(jlora.merge(case.tree, lora, cfg), case.inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- sibling fusion (tests/interpret/test_fusion.py) ----------------------------------------------


@pytest.mark.parametrize("name", ["llama", "llama_scan", "moe_scan"])
def test_zoo_fused_matches_unfused(name):
  test_fusion.check_zoo_fused_matches_unfused(name)


# -- per-example routing (tests/interpret/rules/test_routing.py) ----------------------------------


@pytest.mark.parametrize("design", test_routing.DESIGNS)
@pytest.mark.parametrize("name", ["gemma_style", "llama_scan"])
def test_routed_examples_equal_their_adapters_alone(name, design):
  test_routing.check_each_example_equals_its_adapter_alone(name, design)


@pytest.mark.parametrize("design", test_routing.DESIGNS)
@pytest.mark.parametrize("name", ["llama_scan"])
def test_routed_gradients_reach_only_the_adapters_used(name, design):
  test_routing.check_gradients_reach_only_the_adapters_used(name, design)


@pytest.mark.parametrize("name", ["moe_scan"])
def test_unroutable_uses_are_errors(name):
  test_routing.check_unroutable_uses_are_errors(name)
