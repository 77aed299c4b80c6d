"""Tests for the single-writer lock of a checkpoint directory (`checkpoint.lock`).

The lock of a killed process: `tests/e2e/test_checkpoint_processes.py`.
"""

import os
import socket

import pytest

from jlora._src.io.checkpoint.lock import LOCK_NAME, CheckpointBusyError, WriterLock, active_writer


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
