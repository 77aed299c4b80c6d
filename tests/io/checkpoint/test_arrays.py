"""Tests for the abstract trees to restore into and the checks of restored arrays
(`jlora._src.io.checkpoint.arrays`): no disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora._src.io.checkpoint import arrays as rst
from jlora._src.io.checkpoint import metadata as fmt

CFG = jlora.LoraConfig(r=2, lora_alpha=16, target_modules=("q_proj",))


def test_abstract_lora_places_leaves_and_names_bad_shardings():
  tree = {"layers": {i: {"q_proj": {"kernel": jnp.ones((4, 6))}} for i in range(2)}}
  lora = jlora.init(tree, CFG, key=jax.random.key(0))
  recs = fmt.parse_metadata(fmt.build_metadata(lora, CFG), "here").leaves
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  row = NamedSharding(mesh, PartitionSpec("x", None))
  out = rst.abstract_lora(recs, row)
  a = out["layers"][1]["q_proj"]["kernel"]["lora_A"]
  assert (a.shape, a.dtype, a.sharding) == ((4, 2), jnp.float32, row)
  assert out["layers"][0]["q_proj"]["kernel"]["lora_B"].shape == (2, 6)
  with pytest.raises(
    ValueError, match=r"entry for 'layers/0/q_proj/kernel/lora_B' does not fit .*shape \(2, 6\)"
  ):
    rst.abstract_lora(recs, NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), PartitionSpec("x")))
  with pytest.raises(ValueError, match=r"spec .* has more entries than the array has axes"):
    rst.abstract_lora(recs, NamedSharding(mesh, PartitionSpec(None, None, "x")))
  with pytest.raises(ValueError, match=r"no entry for adapter leaf 'layers/0/q_proj/kernel/lora_A'"):
    rst.abstract_lora(recs, {"layers": {}})
  tree = jax.tree_util.tree_map(lambda _: row, lora)
  tree["layers"][1]["q_proj"]["kernel"]["lora_B"] = "cpu"
  with pytest.raises(TypeError, match=r"entry for 'layers/1/q_proj/kernel/lora_B' is a str"):
    rst.abstract_lora(recs, tree)


def test_check_stored_arrays_and_crcs():
  recs = [{"path": ["q", 0], "shape": [2], "dtype": "float32", "crc32": fmt.crc32(np.ones(2, np.float32))}]
  rst.check_stored_arrays({"q": {"0": np.zeros(2, np.float32)}}, recs, "here")
  with pytest.raises(fmt.CorruptCheckpointError, match=r"here is missing the array of adapter leaf 'q/0'"):
    rst.check_stored_arrays({"q": {}}, recs, "here")
  with pytest.raises(
    fmt.CorruptCheckpointError, match=r"inconsistent at adapter leaf 'q/0'.*\(2,\) float32.*\(2,\) int32"
  ):
    rst.check_stored_arrays({"q": {"0": np.zeros(2, np.int32)}}, recs, "here")
  with pytest.raises(fmt.CorruptCheckpointError, match=r"arrays the metadata does not list \(e.g. 'r'\)"):
    rst.check_stored_arrays({"q": {"0": np.zeros(2, np.float32)}, "r": np.zeros(1)}, recs, "here")
  rst.verify_crc(recs, [np.ones(2, np.float32)], ["q/0"], "here")
  rst.verify_crc([dict(recs[0], crc32=None)], [np.zeros(2, np.float32)], ["q/0"], "here")  # unknown: skipped
  with pytest.raises(fmt.CorruptCheckpointError, match=r"data of 'q/0' fails its checksum \(crc32 0x"):
    rst.verify_crc(recs, [np.array([1.0, 2.0], np.float32)], ["q/0"], "here")


def test_abstract_opt_checks_the_template():
  state = {"mu": jnp.zeros(3), "count": jnp.zeros((), jnp.int32)}
  recs = fmt.opt_records(state)
  out = rst.abstract_opt(jax.eval_shape(lambda: state), recs, "here")
  assert out["count"].dtype == jnp.int32 and out["mu"].shape == (3,)
  with pytest.raises(ValueError, match=r"template has 1 array leaves but .* saved in here has 2"):
    rst.abstract_opt({"mu": jnp.zeros(3)}, recs, "here")
  with pytest.raises(
    ValueError, match=r"template leaf \['mu'\] is \(4,\) float32, saved leaf \['mu'\] is \(3,\)"
  ):
    rst.abstract_opt({"mu": jnp.zeros(4), "count": jnp.zeros((), jnp.int32)}, recs, "here")
  with pytest.raises(TypeError, match=r"Optimizer state leaf \['n'\] is a str"):
    fmt.opt_records({"n": "x"})
