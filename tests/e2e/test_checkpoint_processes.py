"""Checkpoints with other processes at work: each test starts Python processes that import jax and write.

`tests/_crash_saver.py` saves a stream of adapter steps, each step's arrays all equal to the step number:
two writers on one directory (the second is refused, naming the first; no step lost), loads while another
process rewrites (one whole step each time, or a "busy" error, never a mix), a writer killed by SIGKILL
mid-save 20 times per save path (the latest complete step loads, a half-written one is ignored), and the
lock of a killed process (free again). Only the processes started here are killed, by pid.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jlora
from jlora._src.io.checkpoint.lock import CheckpointBusyError, WriterLock, active_writer
from tests import TESTS


def _env():
  """This environment, with the checkout on ``PYTHONPATH`` (the started scripts import jlora and tests)."""
  return dict(os.environ, PYTHONPATH=os.path.dirname(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _saver(directory, mode, *args):
  return subprocess.Popen(
    [sys.executable, os.path.join(TESTS, "_crash_saver.py"), str(directory), mode, *map(str, args)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=_env(),
    text=True,
  )


def _stop(proc):
  proc.kill()
  proc.communicate()


def _uniform_value(lora):
  values = np.unique(np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(lora)]))
  assert len(values) == 1, f"restored a mix of steps {values}"
  return int(values[0])


# -- two processes, one directory -----------------------------------------------------------


def test_two_processes_one_directory(tmp_path):
  first = _saver(tmp_path, "manager", 12, 0, 5)  # pauses after step 5 until told to go on
  second = None
  try:
    assert first.stdout.readline() == "open\n"
    assert [first.stdout.readline() for _ in range(6)][-1] == "done 5\n"
    second = _saver(tmp_path, "manager", 12, 100)
    out, err = second.communicate(timeout=60)  # never hangs
    assert second.returncode == 1 and "done" not in out
    assert f"CheckpointBusyError: The checkpoint directory '{tmp_path}' is being written" in err
    assert f"pid {first.pid} on host '{socket.gethostname()}'" in err
    out, err = first.communicate("go\n", timeout=60)
    assert first.returncode == 0, err
  finally:
    for proc in (first, second):
      if proc is not None and proc.returncode is None:
        _stop(proc)
  assert [int(line.split()[1]) for line in out.splitlines()] == list(range(6, 12))
  with jlora.AdapterCheckpointManager(tmp_path, read_only=True) as mngr:
    assert mngr.all_steps() == [9, 10, 11]  # max_to_keep=3: none lost, none extra
    assert [_uniform_value(mngr.restore(s).lora) for s in mngr.all_steps()] == [9, 10, 11]


def test_load_while_another_process_rewrites(tmp_path):
  writer = _saver(tmp_path, "save_adapter", 10**6)
  loads, busy = [], []
  try:
    assert writer.stdout.readline() == "done 0\n"
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
      try:
        lora, cfg = jlora.load_adapter(tmp_path)
      except CheckpointBusyError as e:  # allowed: says a writer is at work; never "corrupted"
        assert "was removed or replaced" in str(e) or "possibly being replaced" in str(e)
        busy.append(str(e))
        continue
      assert cfg.r == 8 and len(jax.tree_util.tree_leaves(lora)) == 16
      loads.append(_uniform_value(lora))  # one whole step, old or new
  finally:
    _stop(writer)
  print(f"{len(loads)} loads of steps {loads[0]}..{loads[-1]}, {len(busy)} busy errors {busy[:1]}")
  assert len(loads) >= 5 and loads == sorted(loads) and len(set(loads)) > 1


# -- crash safety -----------------------------------------------------------------------------


TRIALS = 20


@pytest.mark.parametrize("mode", ["manager", "save_adapter"])
def test_sigkill_while_saving_keeps_latest_complete_step(tmp_path, mode):
  delays = [0.0, 0.03, 0.07, 0.15] if mode == "manager" else [0.01, 0.05, 0.1]
  env = _env()
  leftovers = 0
  # 20 kills per save path, at delays spread over the save (issue 15's measure).
  for i, delay in enumerate((delays * 7)[:TRIALS]):
    directory = tmp_path / f"run{i}"
    proc = subprocess.Popen(
      [sys.executable, os.path.join(TESTS, "_crash_saver.py"), str(directory), mode],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      env=env,
      text=True,
    )
    done = []
    try:
      for line in proc.stdout:  # wait for two complete steps, then kill mid-save
        if not line.startswith("done"):
          continue
        done.append(int(line.split()[1]))
        if len(done) == 2 + i % len(delays):
          break
      time.sleep(delay)
      os.kill(proc.pid, signal.SIGKILL)
      rest = proc.stdout.read()
    finally:
      proc.kill()
      proc.wait()
      proc.stdout.close()
    done += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("done")]
    leftovers += any("tmp" in name for name in os.listdir(directory))
    lora, cfg = jlora.load_adapter(directory)
    steps = {
      float(x)
      for x in np.unique(np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(lora)]))
    }
    assert len(steps) == 1, f"restored a mix of steps {steps}"
    (step,) = steps
    # The latest step reported complete (or one more, finished between report and kill).
    assert step in (done[-1], done[-1] + 1), (step, done[-1])
    assert cfg.r == 8 and len(jax.tree_util.tree_leaves(lora)) == 16
  # Kills did land mid-save, leaving a half-written step on disk, and every load ignored it.
  assert leftovers > 0, f"{mode}: no run of {i + 1} was killed mid-save; the test proved nothing"


# -- the writer lock -----------------------------------------------------------------------------

HOLDER = """
import sys, time
from jlora._src.io.checkpoint.lock import WriterLock
lock = WriterLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_process_is_free(tmp_path):
  cmd = [sys.executable, "-c", HOLDER, str(tmp_path)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=_env(), text=True)
  try:
    assert proc.stdout.readline() == "locked\n"
    assert active_writer(str(tmp_path)).pid == proc.pid
    with pytest.raises(CheckpointBusyError, match=rf"pid {proc.pid} on host"):
      WriterLock.acquire(str(tmp_path))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
  finally:
    proc.kill()
    proc.communicate()
  assert active_writer(str(tmp_path)) is None
  WriterLock.acquire(str(tmp_path)).release()
