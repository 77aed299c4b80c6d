"""Reading a checkpoint step (`jlora._src.io.checkpoint.read`): `StepReader` over a `StepFormat`."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora._src.io.checkpoint.bank import BankStep
from jlora._src.io.checkpoint.manager import read_step
from jlora._src.io.checkpoint.metadata import CorruptCheckpointError, build_metadata
from jlora._src.io.checkpoint.read import ADAPTER_ITEM, OPT_ITEM, AdapterStep

CFG = jlora.LoraConfig(r=2, target_modules=("q_proj",))


def _adapter():
  tree = {"q_proj": {"kernel": jnp.ones((4, 6))}}
  return tree, jlora.init(tree, CFG, key=jax.random.key(0))


def test_the_adapter_format_checks_the_callers_arguments_against_the_metadata():
  tree, lora = _adapter()
  step = AdapterStep()
  meta = step.parse_meta(build_metadata(lora, CFG, base=tree), "here")
  assert set(step.restore_items(meta, tree, None, None, "here")) == {ADAPTER_ITEM}
  with pytest.raises(ValueError, match="An `opt_state` template was given but here was saved without"):
    step.restore_items(meta, None, None, {"mu": jnp.zeros(2)}, "here")
  with_opt = step.parse_meta(build_metadata(lora, CFG, opt_state={"mu": jnp.zeros(2)}), "here")
  assert set(step.restore_items(with_opt, None, None, {"mu": jnp.zeros(2)}, "here")) == {
    ADAPTER_ITEM,
    OPT_ITEM,
  }
  with pytest.raises(ValueError, match=r"lora_B"):
    step.check_fit(meta, {"q_proj": {"kernel": {"lora_A": lora["q_proj"]["kernel"]["lora_A"]}}}, tree)


def test_one_reader_reads_a_step_in_the_format_it_is_given(tmp_path):
  tree, lora = _adapter()
  jlora.save_adapter(tmp_path, lora, CFG, base=tree)
  with jlora.AdapterCheckpointManager(tmp_path, read_only=True) as mngr:
    read = read_step(mngr, AdapterStep(), None, base=tree, shardings=None, opt_state=None)
    assert read.meta.config == CFG and read.opt_state is None
    chex.assert_trees_all_equal(read.lora, lora)
    with pytest.raises(
      CorruptCheckpointError, match=r"Invalid jlora bank metadata .* `format` is 'jlora.adapter'"
    ):
      read_step(mngr, BankStep(), None, base=None, shardings=None, opt_state=None)
