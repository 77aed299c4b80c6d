"""Every storage API on ``gs://`` against a local GCS emulator (see `tests/_gcs_emulator.py`).

The emulator answers as GCS does where jlora relies on it: generation preconditions (the writer lease) and
generation headers (tensorstore). Each test works under its own prefix of the bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from etils import epath

import jlora
from jlora._src.io.checkpoint.lock import LOCK_NAME
from tests import TESTS


@pytest.fixture
def gs(gcs_bucket, tmp_path, monkeypatch):
  """A fresh ``gs://`` prefix; the test runs in an empty local directory, which must stay empty."""
  monkeypatch.chdir(tmp_path)
  yield f"{gcs_bucket}/{uuid.uuid4().hex}"
  assert os.listdir(tmp_path) == [], "a gs:// call wrote into the local working directory"


@pytest.fixture(scope="module")
def small():
  params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
  return params, cfg, jlora.init(params, cfg, key=jax.random.key(0))


def _objects(prefix: str) -> list[str]:
  """The objects under ``prefix``, relative to it."""
  fs = fsspec.filesystem("gs", finalize_on_close=True)
  fs.invalidate_cache()
  root = prefix.removeprefix("gs://") + "/"
  return sorted(p.removeprefix(root) for p in fs.find(root))


def _equal(a, b) -> bool:
  return all(bool((x == y).all()) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_save_and_load_adapter(gs, small):
  params, cfg, lora = small
  jlora.save_adapter(f"{gs}/a", lora, cfg, base=params)
  jlora.save_adapter(f"{gs}/a", lora, cfg, base=params)  # replaces it: one step is left
  got, cfg2 = jlora.load_adapter(f"{gs}/a", base=params)
  assert cfg2 == cfg and _equal(got, lora)
  steps = {name.split("/")[0] for name in _objects(f"{gs}/a")}
  assert steps == {"1"}  # step 0 deleted directly (GCS has no rename); the lease released


def test_manager_steps_retention_optimizer_state_and_read_only(gs, small):
  params, cfg, lora = small
  opt = optax.adam(1e-3)
  with jlora.AdapterCheckpointManager(f"{gs}/run", cfg, max_to_keep=2, base=params) as mngr:
    for step in range(4):
      mngr.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, lora), opt_state=opt.init(lora))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]
    restored = mngr.restore(opt_state=jax.eval_shape(opt.init, lora))
  assert restored.step == 3 and _equal(restored.opt_state, opt.init(lora))
  with jlora.AdapterCheckpointManager(f"{gs}/run", read_only=True) as reader:
    assert reader.all_steps() == [2, 3]
    old = reader.restore(2)
  assert _equal(old.lora, jax.tree_util.tree_map(lambda x: x + 2, lora))
  with pytest.raises(FileNotFoundError, match="No adapter checkpoint directory"):
    jlora.AdapterCheckpointManager(f"{gs}/nothing-here", read_only=True)


def test_bank_round_trip(gs, small):
  params, cfg, lora = small
  bank = jlora.stack([(lora, cfg), (jax.tree_util.tree_map(jnp.negative, lora), cfg)], names=["a", "b"])
  jlora.save_bank(f"{gs}/bank", bank, base=params)
  back = jlora.load_bank(f"{gs}/bank", base=params)
  assert back.names == ("a", "b") and _equal(back.adapter(1)[0], bank.adapter(1)[0])


def test_peft_export_and_import(gs, small):
  params, cfg, lora = small
  peft_cfg = jlora.export_peft(f"{gs}/peft", lora, cfg, base=params)
  assert _objects(f"{gs}/peft") == ["adapter_config.json", "adapter_model.safetensors"]
  with pytest.raises(FileExistsError, match="already holds a PEFT adapter"):
    jlora.export_peft(f"{gs}/peft", lora, cfg, base=params)
  got, cfg2 = jlora.import_peft(f"{gs}/peft", params)
  assert cfg2.r == 2 and peft_cfg["target_modules"] == ["q_proj"]
  merged = lambda tree, c: jlora.merge(params, tree, c)["params"]["model"]["layers_0"]["self_attn"]["q_proj"]  # noqa: E731
  np.testing.assert_allclose(merged(got, cfg2)["kernel"], merged(lora, cfg)["kernel"], rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
    jlora.import_peft(f"{gs}/missing", params)


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_save_merged(gs, small, fmt):
  params, cfg, lora = small
  want = np.asarray(
    jlora.merge(params, lora, cfg)["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  )
  out = jlora.save_merged(f"{gs}/merged", params, lora, cfg, format=fmt)
  if fmt == "safetensors":
    assert out == f"{gs}/merged/model.safetensors"
    got = safetensors.numpy.load(epath.Path(out).read_bytes())[
      "params/model/layers_0/self_attn/q_proj/kernel"
    ]
  else:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
      got = ckptr.restore(epath.Path(out))["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(FileExistsError, match="already exists"):
    jlora.save_merged(f"{gs}/merged", params, lora, cfg, format=fmt)


def test_the_lease_refuses_a_second_writer_until_released_or_broken(gs, small):
  params, cfg, lora = small
  with jlora.AdapterCheckpointManager(f"{gs}/leased", cfg):
    assert LOCK_NAME in _objects(f"{gs}/leased")
    with pytest.raises(jlora.CheckpointBusyError, match=rf"pid {os.getpid()} on host .*break_writer_lock"):
      jlora.save_adapter(f"{gs}/leased", lora, cfg)
    with jlora.AdapterCheckpointManager(f"{gs}/leased", read_only=True):  # readers take no lease
      pass
  assert LOCK_NAME not in _objects(f"{gs}/leased")
  jlora.save_adapter(f"{gs}/leased", lora, cfg)


def _kill_mid_save(directory: str) -> list[int]:
  """Runs `tests/_crash_saver.py` (save_adapter in a loop) until it has saved twice, then kills it."""
  env = dict(os.environ, PYTHONPATH=os.path.dirname(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(TESTS, "_crash_saver.py"), directory, "save_adapter"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
  done = []
  try:
    for line in proc.stdout:
      if line.startswith("done"):
        done.append(int(line.split()[1]))
        if len(done) == 2:
          break
    os.kill(proc.pid, signal.SIGKILL)
    done += [int(x.split()[1]) for x in proc.stdout.read().splitlines() if x.startswith("done")]
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  return done


def test_a_killed_save_leaves_the_previous_adapter_and_a_lease_to_break(gs, small):
  directory = f"{gs}/killed"
  done = _kill_mid_save(directory)
  lora, cfg = jlora.load_adapter(directory)
  values = {float(v) for leaf in jax.tree_util.tree_leaves(lora) for v in np.unique(np.asarray(leaf))}
  assert len(values) == 1 and values.pop() in (done[-1], done[-1] + 1)  # a whole step, never a mix
  holder = jlora.break_writer_lock(directory)  # the dead saver's lease, if it died holding one
  assert holder is None or holder.pid != os.getpid()
  params, cfg_small, lora_small = small
  jlora.save_adapter(directory, lora_small, cfg_small)
  assert jlora.load_adapter(directory)[1] == cfg_small


def test_a_corrupted_object_is_an_error(gs, small):
  params, cfg, lora = small
  jlora.save_adapter(f"{gs}/c", lora, cfg)
  fs = fsspec.filesystem("gs", finalize_on_close=True)
  data = [p for p in _objects(f"{gs}/c") if p.startswith("0/adapter/") and "/d/" in p]
  assert data
  for name in data:
    path = f"{gs.removeprefix('gs://')}/c/{name}"
    fs.pipe_file(path, b"\0" * len(fs.cat_file(path)))
  with pytest.raises(ValueError, match=r"truncated or corrupted|fails its checksum"):
    jlora.load_adapter(f"{gs}/c")
