"""Fixtures of the PEFT file tests."""

import jax
import pytest

import jlora
from tests import _peft as P


@pytest.fixture
def exported(tmp_path):
  tree = P.linen_tree()
  cfg = P.config()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.export_peft(tmp_path, lora, cfg)
  return tmp_path, tree
