"""Tests for the single-writer lock of a checkpoint directory (`checkpoint.lock`)."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from jlora._src.io.checkpoint.lock import LOCK_NAME, CheckpointBusyError, WriterLock, active_writer
from tests import ROOT

HOLDER = """
import sys, time
from jlora._src.io.checkpoint.lock import WriterLock
lock = WriterLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_second_acquire_is_refused_naming_the_holder(tmp_path):
  assert active_writer(str(tmp_path)) is None  # no lock file yet
  lock = WriterLock.acquire(str(tmp_path))
  info = active_writer(str(tmp_path))
  assert (info.pid, info.host) == (os.getpid(), socket.gethostname())
  holder = rf"pid {os.getpid()} on host '{socket.gethostname()}' \(since 2"
  with pytest.raises(CheckpointBusyError, match=holder):
    WriterLock.acquire(str(tmp_path))  # another open file: refused in the same process too
  assert lock.held
  lock.release()
  lock.release()  # idempotent
  assert not lock.held and active_writer(str(tmp_path)) is None
  WriterLock.acquire(str(tmp_path)).release()
  assert os.path.exists(tmp_path / LOCK_NAME)  # kept: deleting lock files races


def test_lock_of_a_killed_process_is_free(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-c", HOLDER, str(tmp_path)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
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
