"""One writer per checkpoint directory: an advisory lock on ``<directory>/.jlora-writer.lock``.

A writing `AdapterCheckpointManager` (and so `save_adapter`) holds an
exclusive ``fcntl.flock`` on the lock file from when it opens until it
closes; the operating system drops the lock when the process dies, also on
``kill -9``, so a crashed writer never blocks the next one. The holder writes
its pid, host and start time into the file, and a second writer, in this
process or another, is refused with a `CheckpointBusyError` that names them.
Readers take no lock; they ask whether a writer is active (`active_writer`)
only to explain a failed read.

The lock is advisory and needs ``flock`` semantics from the file system
(local disks do; NFS with Linux ≥ 2.6.12 emulates it). Where ``fcntl`` is
missing (Windows) nothing is locked.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import NamedTuple

try:
  import fcntl
except ImportError:  # pragma: no cover - Windows
  fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".jlora-writer.lock"


class CheckpointBusyError(RuntimeError):
  """Another writer holds the checkpoint directory, or rewrote a step while it was read."""


class WriterInfo(NamedTuple):
  """Who holds a directory's writer lock."""

  pid: int | None
  host: str
  since: str

  def describe(self) -> str:
    pid = "an unknown process" if self.pid is None else f"pid {self.pid}"
    return f"{pid} on host {self.host!r} (since {self.since})"


_UNKNOWN = WriterInfo(pid=None, host="?", since="?")


def _read_info(fd: int) -> WriterInfo:
  # The holder writes its info just after locking; give it a moment.
  for _ in range(20):
    try:
      data = json.loads(os.pread(fd, 4096, 0).decode())
      return WriterInfo(pid=int(data["pid"]), host=str(data["host"]), since=str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
      time.sleep(0.01)
  return _UNKNOWN


def busy_message(directory: str, holder: WriterInfo) -> str:
  return (
    f"The checkpoint directory {directory!r} is being written by another AdapterCheckpointManager or "
    f"`save_adapter`: {holder.describe()}. A directory has one writer at a time; close that one first, "
    "save to another directory, or open this one with `read_only=True` to restore from it meanwhile."
  )


class WriterLock:
  """The exclusive writer lock of a checkpoint directory; `acquire` it, `release` it when done.

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> lock = WriterLock.acquire(d)
    >>> active_writer(d).pid == os.getpid()
    True
    >>> WriterLock.acquire(d)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    CheckpointBusyError: The checkpoint directory ... is being written by ...
    >>> lock.release()
    >>> active_writer(d) is None
    True
  """

  def __init__(self, fd: int | None) -> None:
    self._fd = fd

  @classmethod
  def acquire(cls, directory: str) -> WriterLock:
    """Takes the lock without waiting.

    Raises:
      CheckpointBusyError: naming the holder's pid and host if it is taken.
    """
    if fcntl is None:  # pragma: no cover - Windows
      return cls(None)
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_info(fd)
      os.close(fd)
      raise CheckpointBusyError(busy_message(directory, holder)) from None
    except BaseException:
      os.close(fd)
      raise
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return cls(fd)

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Releases the lock (closing the file drops it); idempotent."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)


def active_writer(directory: str) -> WriterInfo | None:
  """The holder of ``directory``'s writer lock, or ``None`` if no writer is active."""
  if fcntl is None:  # pragma: no cover - Windows
    return None
  try:
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY)
  except OSError:
    return None  # no lock file: no writer ever opened the directory (or it is not readable)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _read_info(fd)
    return None
  finally:
    os.close(fd)  # also drops the shared lock taken just now
