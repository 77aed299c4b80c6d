"""Tests for adapter checkpoints: `save_adapter`/`load_adapter`, `AdapterCheckpointManager`, `save_merged`.

With other processes writing, or killed mid-save: `tests/e2e/test_checkpoint_processes.py`.
"""

import json
import os
import socket

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora._src.io.checkpoint.lock import CheckpointBusyError
from jlora._src.io.checkpoint.metadata import metadata_checksum


def _nnx_like_tree(dtype=jnp.float32):
  """A plain tree with int keys (as NNX lists give) and a Linen-style one."""
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "layers": {i: {"q_proj": {"kernel": jax.random.normal(k[i], (16, 32), dtype)}} for i in range(2)},
    "head": {"kernel": jax.random.normal(k[3], (32, 8), dtype)},
  }


def _cfg(**kw):
  return jlora.LoraConfig(r=4, target_modules=("q_proj",), init_lora_weights=False, **kw)


def _key_types(tree):
  return [tuple(type(k).__name__ for k in p) for p, _ in jlora._src.core.paths.leaves_with_paths(tree)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_without_template(tmp_path, dtype):
  tree = _nnx_like_tree(dtype)
  cfg = _cfg(modules_to_save=("head",), rank_pattern={"layers/1/q_proj": 2})
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path, lora, cfg, base=tree)
  lora2, cfg2 = jlora.load_adapter(tmp_path)
  assert cfg2 == cfg
  chex.assert_trees_all_equal(lora2, lora)  # same structure (int keys kept), values and dtypes
  chex.assert_trees_all_equal_dtypes(lora2, lora)
  assert _key_types(lora2) == _key_types(lora)
  # Saving again replaces it; the directory keeps exactly one step.
  lora3 = jax.tree_util.tree_map(lambda x: x + 1, lora)
  jlora.save_adapter(tmp_path, lora3, cfg, base=tree)
  chex.assert_trees_all_equal(jlora.load_adapter(tmp_path, base=tree)[0], lora3)
  assert jlora.AdapterCheckpointManager(tmp_path, read_only=True).all_steps() == [1]


def test_base_mismatch_names_first_path(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path, lora, cfg, base=tree)
  wrong_shape = jax.tree_util.tree_map(lambda x: x, tree)
  wrong_shape["layers"][1]["q_proj"]["kernel"] = jnp.zeros((16, 33))
  with pytest.raises(ValueError, match=r"at 'layers/1/q_proj/kernel'.*shape \(16, 32\).*\(16, 33\)"):
    jlora.load_adapter(tmp_path, base=wrong_shape)
  wrong_dtype = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree)
  with pytest.raises(ValueError, match=r"at 'layers/0/q_proj/kernel'.*float32.*bfloat16"):
    jlora.load_adapter(tmp_path, base=wrong_dtype)
  with pytest.raises(ValueError, match=r"leaf at 'layers/0/q_proj/kernel'.*no leaf there"):
    jlora.load_adapter(tmp_path, base={"params": tree})
  # Saving checks the adapter fits the base, too.
  with pytest.raises(ValueError, match="layers/1/q_proj"):
    jlora.save_adapter(tmp_path / "other", lora, cfg, base=wrong_shape)


def test_restore_onto_shardings(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path, lora, cfg)
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  row = NamedSharding(mesh, PartitionSpec("data", None))
  col = NamedSharding(mesh, PartitionSpec(None, "model"))
  shardings = jax.tree_util.tree_map(lambda _: row, lora)
  for i in range(2):
    shardings["layers"][i]["q_proj"]["kernel"]["lora_B"] = col
  lora2, _ = jlora.load_adapter(tmp_path, shardings=shardings)
  chex.assert_trees_all_equal(lora2, lora)
  assert lora2["layers"][0]["q_proj"]["kernel"]["lora_A"].sharding == row
  assert lora2["layers"][1]["q_proj"]["kernel"]["lora_B"].sharding == col
  replicated = NamedSharding(mesh, PartitionSpec())
  lora3, _ = jlora.load_adapter(tmp_path, shardings=replicated)
  assert all(x.sharding == replicated for x in jax.tree_util.tree_leaves(lora3))


def _train(lora, opt, opt_state, tree, cfg, *, steps, start):
  apply = jlora.wrap(lambda t, x: x @ t["layers"][0]["q_proj"]["kernel"] @ t["head"]["kernel"], cfg)

  @jax.jit
  def step(lora, opt_state, x):
    loss = lambda lo: jnp.mean(apply(tree, lo, x) ** 2)  # noqa: E731
    grads = jax.grad(loss)(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state

  for i in range(start, start + steps):
    lora, opt_state = step(lora, opt_state, jax.random.normal(jax.random.key(100 + i), (4, 16)))
  return lora, opt_state


def test_manager_resume_is_bit_identical(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora0 = jlora.init(tree, cfg, key=jax.random.key(1))
  opt = optax.adamw(1e-2)
  full, _ = _train(lora0, opt, opt.init(lora0), tree, cfg, steps=6, start=0)

  half, state = _train(lora0, opt, opt.init(lora0), tree, cfg, steps=3, start=0)
  with jlora.AdapterCheckpointManager(tmp_path, cfg, base=tree) as mngr:
    assert mngr.save(3, half, opt_state=state)
  with jlora.AdapterCheckpointManager(tmp_path) as mngr:  # a fresh process would do this
    restored = mngr.restore(base=tree, opt_state=jax.eval_shape(opt.init, lora0))
  assert restored.step == 3 and restored.config == cfg
  chex.assert_trees_all_equal(restored.opt_state, state)
  resumed, _ = _train(restored.lora, opt, restored.opt_state, tree, cfg, steps=3, start=3)
  chex.assert_trees_all_equal(resumed, full)  # bit-identical to the uninterrupted run
  with jlora.AdapterCheckpointManager(tmp_path, read_only=True) as mngr:
    with pytest.raises(
      ValueError, match="template has 4 array leaves but the optimizer state saved in step 3"
    ):
      mngr.restore(opt_state=jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, lora0))


def test_manager_retention_interval_and_async(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  with jlora.AdapterCheckpointManager(tmp_path, cfg, max_to_keep=2, save_interval_steps=2) as mngr:
    saved = [mngr.save(s, jax.tree_util.tree_map(lambda x, s=s: x * s, lora)) for s in range(7)]
    mngr.wait_until_finished()
    assert saved == [True, False, True, False, True, False, True]
    assert mngr.all_steps() == [4, 6] and mngr.latest_step() == 6
    chex.assert_trees_all_close(mngr.restore().lora, jax.tree_util.tree_map(lambda x: x * 6, lora))
    chex.assert_trees_all_close(mngr.restore(4).lora, jax.tree_util.tree_map(lambda x: x * 4, lora))
    with pytest.raises(ValueError, match=r"Step 2 is not in .*complete steps: \[4, 6\]"):
      mngr.restore(2)
    with pytest.raises(ValueError, match="Step 6 already exists"):
      mngr.save(6, lora, force=True)
  with pytest.raises(ValueError, match="has no `config`"):
    jlora.AdapterCheckpointManager(tmp_path).save(8, lora)
  with pytest.raises(FileNotFoundError, match="No complete adapter checkpoint"):
    jlora.AdapterCheckpointManager(tmp_path / "empty").restore()


# -- bad files ----------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
  # Arrays above orbax's 1 KiB inline limit, so their data is in separate files.
  tree = {
    "layers": {i: {"q_proj": {"kernel": jax.random.normal(jax.random.key(i), (128, 256))}} for i in range(2)}
  }
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj",), init_lora_weights=False)
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path, lora, cfg, base=tree)
  step_dir = tmp_path / "0"
  return tmp_path, step_dir, tree


def _meta_file(step_dir):
  return step_dir / "jlora_meta" / "metadata"  # orbax's JsonCheckpointHandler file


def _edit_meta(step_dir, fn, *, rechecksum=True):
  """Edits the metadata JSON; by default as a buggy writer would, with a matching checksum."""
  path = _meta_file(step_dir)
  meta = json.loads(path.read_text())
  fn(meta)
  if rechecksum and "meta_crc32" in meta:
    meta["meta_crc32"] = metadata_checksum(meta)
  path.write_text(json.dumps(meta))


def test_unknown_and_invalid_metadata_fields(saved):
  root, step_dir, _ = saved
  original = _meta_file(step_dir).read_text()
  _edit_meta(step_dir, lambda m: m.update(extra=1))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['extra'\]"):
    jlora.load_adapter(root)
  _meta_file(step_dir).write_text(original)
  _edit_meta(step_dir, lambda m: m["config"].update(rank=4))
  with pytest.raises(ValueError, match=r"not a valid LoraConfig: Unknown LoraConfig field\(s\) \['rank'\]"):
    jlora.load_adapter(root)
  _meta_file(step_dir).write_text(original)
  _edit_meta(step_dir, lambda m: m["config"].update(r=-1))
  with pytest.raises(ValueError, match="`r` must be a positive integer"):
    jlora.load_adapter(root)
  _meta_file(step_dir).write_text(original)
  _edit_meta(step_dir, lambda m: m.update(format_version=99))
  with pytest.raises(ValueError, match="format_version"):
    jlora.load_adapter(root)
  _meta_file(step_dir).write_text(original)
  _edit_meta(step_dir, lambda m: m["leaves"][0].update(shape=[16, 5]))
  with pytest.raises(ValueError, match=r"inconsistent at adapter leaf 'layers/0/q_proj/kernel/lora_A'"):
    jlora.load_adapter(root)
  _meta_file(step_dir).write_text("{truncated")
  with pytest.raises(ValueError, match="Cannot read the jlora metadata"):
    jlora.load_adapter(root)


# When tensorstore fails a read, orbax's async reader later posts to its closed
# event loop ("Event loop is closed", an unraisable exception in a background
# thread). jlora has already raised its ValueError by then; the noise is orbax's and
# is ignored in pyproject.toml's filterwarnings, since it surfaces in later tests too.
def test_truncated_or_corrupted_arrays(saved):
  root, step_dir, _ = saved
  data_dir = step_dir / "adapter" / "ocdbt.process_0" / "d"
  big = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)  # holds array data
  original = big.read_bytes()
  blob = bytearray(original)
  blob[len(blob) // 2] ^= 0xFF  # one flipped bit pattern in the array data
  big.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r"data of 'layers/\d/q_proj/kernel/lora_[AB]' fails its checksum"):
    jlora.load_adapter(root)
  big.write_bytes(original)
  manifest = step_dir / "adapter" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:40])
  with pytest.raises(ValueError, match="truncated or corrupted"):
    jlora.load_adapter(root)


def test_flipped_bit_in_metadata_is_an_error_naming_the_step(tmp_path):
  tree = _nnx_like_tree()
  cfg = jlora.LoraConfig(r=4, lora_alpha=16, target_modules=("q_proj",))
  jlora.save_adapter(tmp_path, jlora.init(tree, cfg, key=jax.random.key(1)), cfg)
  path = _meta_file(tmp_path / "0")
  original = path.read_bytes()
  # One flipped bit each, the JSON still valid: lora_alpha 16 -> 96, target q_proj -> q_pro*.
  for prefix, bit, field, changed in [
    (b'"lora_alpha": ', 0x08, "lora_alpha", 96.0),
    (b'"target_modules": ["q_pro', 0x40, "target_modules", ["q_pro*"]),
  ]:
    blob = bytearray(original)
    blob[original.index(prefix) + len(prefix)] ^= bit
    assert json.loads(bytes(blob))["config"][field] == changed
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"metadata of step 0 of '{tmp_path}' fails its checksum"):
      jlora.load_adapter(tmp_path)
  path.write_bytes(original)
  assert jlora.load_adapter(tmp_path)[1] == cfg


def test_format_version_1_without_checksum_still_loads(saved):
  root, step_dir, _ = saved

  def to_v1(m):
    del m["meta_crc32"]
    m["format_version"] = 1
    m["config"]["lora_alpha"] = 96  # unprotected in version 1: read as written

  _edit_meta(step_dir, to_v1)
  assert jlora.load_adapter(root)[1].lora_alpha == 96
  _edit_meta(step_dir, lambda m: m.update(meta_crc32=1), rechecksum=False)
  msg = r"unknown field\(s\) \['meta_crc32'\]; known fields \(format version 1\)"
  with pytest.raises(ValueError, match=msg):
    jlora.load_adapter(root)


def test_bad_shardings_are_argument_errors_not_corruption(saved):
  root, _, _ = saved
  mesh = Mesh(np.array(jax.devices()[:3]), ("x",))
  uneven = NamedSharding(mesh, PartitionSpec("x", None))  # 3 does not divide 128 or 8
  msg = r"`shardings` entry for 'layers/0/q_proj/kernel/lora_A' does not fit the saved array of shape"
  with pytest.raises(ValueError, match=msg) as e:
    jlora.load_adapter(root, shardings=uneven)
  assert "corrupt" not in str(e.value)
  lora = jlora.load_adapter(root)[0]
  tree = jax.tree_util.tree_map(lambda _: "cpu", lora)
  with pytest.raises(TypeError, match=r"entry for 'layers/0/q_proj/kernel/lora_A' is a str, not a jax"):
    jlora.load_adapter(root, shardings=tree)


def test_config_must_be_a_lora_config(tmp_path):
  tree = _nnx_like_tree()
  lora = jlora.init(tree, _cfg(), key=jax.random.key(1))
  for bad, name in [({"r": 4}, "dict"), (None, "NoneType")]:
    with pytest.raises(TypeError, match=rf"`config` must be a jlora.LoraConfig; got {name}"):
      jlora.save_adapter(tmp_path, lora, bad)
  with pytest.raises(TypeError, match=r"`config` must be a jlora.LoraConfig or None; got dict"):
    jlora.AdapterCheckpointManager(tmp_path, {"r": 4})
  with pytest.raises(TypeError, match=r"`config` must be a jlora.LoraConfig; got dict"):
    jlora.save_merged(tmp_path / "m", tree, lora, {"r": 4})


# -- step order and overwriting ----------------------------------------------------------------


def _filled(lora, value):
  return jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), lora)


def test_save_of_existing_or_older_step_is_an_error(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  with jlora.AdapterCheckpointManager(tmp_path, cfg, max_to_keep=3, save_interval_steps=2) as mngr:
    for s in (4, 6):
      assert mngr.save(s, _filled(lora, s))
  # A restarted run whose step counter was reset: every save used to return False silently.
  with jlora.AdapterCheckpointManager(tmp_path, cfg, save_interval_steps=2) as mngr:
    with pytest.raises(ValueError, match=r"Step 3 is older than the latest step 6 .*restored.step \+ 1"):
      mngr.save(3, lora)  # not on the interval either: the order is checked first
    with pytest.raises(ValueError, match=r"Step 6 already exists .*latest step: 6.*`overwrite=True`"):
      mngr.save(6, lora, force=True)
    assert not mngr.save(7, lora)  # the interval still applies to new steps
    assert mngr.all_steps() == [4, 6]
    assert mngr.save(4, _filled(lora, 40), overwrite=True)
    assert mngr.save(2, _filled(lora, 20), overwrite=True)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 4, 6]
  for s, v in [(2, 20), (4, 40), (6, 6)]:
    chex.assert_trees_all_equal(jlora.load_adapter(tmp_path, step=s)[0], _filled(lora, v))
  assert os.listdir(tmp_path / ".jlora-deleted") == []  # replaced steps are deleted, not kept


# -- one writer per directory ------------------------------------------------------------------


def test_second_writer_in_process_is_refused_naming_the_first(tmp_path):
  tree = _nnx_like_tree()
  cfg = _cfg()
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  busy = rf"being written by .*pid {os.getpid()} on host '{socket.gethostname()}'"
  with jlora.AdapterCheckpointManager(tmp_path, cfg) as mngr:
    mngr.save(0, lora)
    with pytest.raises(CheckpointBusyError, match=busy):
      jlora.AdapterCheckpointManager(tmp_path, cfg)
    with pytest.raises(RuntimeError, match=busy):
      jlora.save_adapter(tmp_path, lora, cfg)
    mngr.wait_until_finished()
    with jlora.AdapterCheckpointManager(tmp_path, read_only=True) as reader:  # readers take no lock
      chex.assert_trees_all_equal(reader.restore().lora, lora)
    assert mngr.all_steps() == [0]  # the refused writers changed nothing
  jlora.save_adapter(tmp_path, _filled(lora, 1), cfg)  # free again once closed
  assert jlora.AdapterCheckpointManager(tmp_path, read_only=True).all_steps() == [1]  # it keeps one


def test_checkpoint_is_small_relative_to_base(tmp_path):
  size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
  k = jax.random.split(jax.random.key(0), 8)
  tree = {f"layers_{i}": {"q_proj": {"kernel": jax.random.normal(k[i], (256, 256))}} for i in range(8)}
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj",))
  lora = jlora.init(tree, cfg, key=jax.random.key(1))
  jlora.save_adapter(tmp_path / "adapter", lora, cfg, base=tree)
  jlora.save_merged(tmp_path / "merged", tree, lora, cfg)
  a, b = size(tmp_path / "adapter"), size(tmp_path / "merged")
  print(f"adapter checkpoint {a} bytes vs merged base {b} bytes ({a / b:.3f})")
  assert a < 0.15 * b  # 2*256*8 / 256**2 = 6.25% of the parameters, plus metadata


def test_save_adapter_refuses_a_managers_directory_and_keeps_its_steps(tmp_path):
  params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  opt = optax.adam(1e-3)
  with jlora.AdapterCheckpointManager(tmp_path / "run", cfg) as mngr:
    for step in (100, 200, 300):
      mngr.save(step, lora, opt_state=opt.init(lora))
  with pytest.raises(ValueError, match=r"holds 3 steps \(100 \.\.\. 300\).*would delete them"):
    jlora.save_adapter(tmp_path / "run", lora, cfg)
  with jlora.AdapterCheckpointManager(tmp_path / "one", cfg, max_to_keep=1) as mngr:
    mngr.save(7, lora, opt_state=opt.init(lora))
  with pytest.raises(ValueError, match="holds a step with an optimizer state"):
    jlora.save_adapter(tmp_path / "one", lora, cfg)
  jlora.save_bank(tmp_path / "bank", jlora.stack([(lora, cfg)], names=["a"]))
  with pytest.raises(ValueError, match="holds a 'jlora.bank' checkpoint"):
    jlora.save_adapter(tmp_path / "bank", lora, cfg)
  with jlora.AdapterCheckpointManager(tmp_path / "run", read_only=True) as reader:
    assert reader.all_steps() == [100, 200, 300]
  jlora.save_adapter(tmp_path / "plain", lora, cfg)
  jlora.save_adapter(tmp_path / "plain", lora, cfg)  # its own directory: replaced


class _GroupedConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(8, (3, 3), padding="SAME", feature_group_count=2, name="grouped")(x)


@pytest.mark.parametrize("with_base", [False, True])
def test_a_grouped_conv_adapter_round_trips(tmp_path, with_base):
  """A grouped convolution's factors (lora_A over all input features, a grouped lora_B) are read back with
  their groups from the shapes alone, or against the base: the wrapped apply gives the same outputs."""
  model, x = _GroupedConv(), jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
  variables = model.init(jax.random.key(1), x)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["grouped"])
  lora = jlora.init(variables, cfg, key=jax.random.key(2), apply_fn=model.apply, example_args=(x,))
  lora = jax.tree_util.tree_map(lambda a: a + 0.1, lora)  # a trained B: the branch is not zero
  base = variables if with_base else None
  jlora.save_adapter(tmp_path / "a", lora, cfg, base=base)
  back, back_cfg = jlora.load_adapter(tmp_path / "a", base=base)
  assert back_cfg == cfg
  chex.assert_trees_all_equal(back, lora)
  apply = jlora.wrap(model.apply, cfg)
  want = apply(variables, lora, x)
  assert float(jnp.abs(want - model.apply(variables, x)).max()) > 0.1
  np.testing.assert_array_equal(apply(variables, back, x), want)
