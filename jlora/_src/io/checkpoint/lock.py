"""One writer per checkpoint directory, across hosts: ``<directory>/.jlora-writer.lock``.

A writing `AdapterCheckpointManager` (and so `save_adapter`, `save_bank`)
holds the directory's writer lock from when it opens until it closes. In a
``jax.distributed`` job the lock belongs to the job: the primary process
takes it and every process learns the outcome (`processes.agree`), so a
second job on the same directory is refused with `CheckpointBusyError` in
all of its processes.

* On a local disk the lock is an exclusive ``flock`` on the file (opened
  with ``O_NOFOLLOW``: a link there is refused, never followed). The
  operating system drops it when the process dies, also on ``kill -9``, so a
  crashed writer never blocks the next one. (``flock`` needs a file system
  that supports it: local disks do; NFS emulates it.)
* On ``gs://`` it is a *lease*: an object created only if absent (the write
  carries ``ifGenerationMatch=0``, which GCS refuses when the object exists)
  and deleted on close only if it is still the same generation. A job that
  dies leaves its lease behind: the next writer is refused, with a message
  naming the holder, until `break_writer_lock` removes it.

The holder's pid, host, process count and start time are in the file, and
every refusal names them. Readers take no lock; they ask whether a writer is
active (`active_writer`) only to explain a failed read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from typing import Any, NamedTuple

from etils import epath

from jlora._src.io import processes, storage

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
  processes: int = 1

  def describe(self) -> str:
    pid = "an unknown process" if self.pid is None else f"pid {self.pid}"
    job = f", primary of a {self.processes}-process job" if self.processes > 1 else ""
    return f"{pid} on host {self.host!r}{job} (since {self.since})"


_UNKNOWN = WriterInfo(pid=None, host="?", since="?")


def _parse_info(raw: bytes) -> WriterInfo | None:
  try:
    data = json.loads(raw.decode())
    return WriterInfo(
      pid=int(data["pid"]), host=str(data["host"]), since=str(data["since"]), processes=int(data["processes"])
    )
  except (ValueError, KeyError, TypeError, AttributeError):
    return None


def _my_info() -> bytes:
  now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "processes": processes.count()}
  return json.dumps(info).encode()


def busy_message(directory: epath.Path, holder: WriterInfo) -> str:
  where = storage.show(directory)
  fix = (
    f" If that job is no longer running, remove its lease with `jlora.break_writer_lock({where!r})`."
    if storage.is_remote(directory)
    else ""
  )
  return (
    f"The checkpoint directory {where!r} is being written by another AdapterCheckpointManager or "
    f"`save_adapter`: {holder.describe()}. A directory has one writer at a time; close that one first, "
    f"save to another directory, or open this one with `read_only=True` to restore from it meanwhile.{fix}"
  )


# -- local disks: flock ----------------------------------------------------------------------


def _read_local_info(fd: int) -> WriterInfo:
  # The holder writes its info just after locking; give it a moment.
  for _ in range(20):
    info = _parse_info(os.pread(fd, 4096, 0))
    if info is not None:
      return info
    time.sleep(0.01)
  return _UNKNOWN


def _take_local(directory: epath.Path) -> int:
  fd = storage.open_no_follow(directory / LOCK_NAME, "the writer lock file", create=True)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_local_info(fd)
    os.close(fd)
    raise CheckpointBusyError(busy_message(directory, holder)) from None
  except BaseException:
    os.close(fd)
    raise
  os.ftruncate(fd, 0)
  os.pwrite(fd, _my_info(), 0)
  return fd


def _local_holder(directory: epath.Path) -> WriterInfo | None:
  path = directory / LOCK_NAME
  if storage.is_link(path):
    return None
  try:
    fd = storage.open_no_follow(path, "the writer lock file", create=False)
  except OSError:
    return None  # not readable
  if fd is None:
    return None  # no lock file: no writer ever opened the directory
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _read_local_info(fd)
    return None
  finally:
    os.close(fd)  # also drops the shared lock taken just now


# -- object stores: a lease ------------------------------------------------------------------


def _take_lease(directory: epath.Path) -> Any:
  path = directory / LOCK_NAME
  token = storage.create_exclusive(path, _my_info())
  if token is None:
    raise CheckpointBusyError(busy_message(directory, _lease_holder(directory) or _UNKNOWN))
  return token


def _lease_holder(directory: epath.Path) -> WriterInfo | None:
  try:
    raw = storage.read_bytes(directory / LOCK_NAME)
  except (OSError, FileNotFoundError):
    return None
  return _parse_info(raw) or _UNKNOWN


# -- the lock --------------------------------------------------------------------------------


class WriterLock:
  """The writer lock of a checkpoint directory, held by this job; `acquire` it, `release` it when done.

  Example:
    >>> import tempfile
    >>> d = storage.resolve(tempfile.mkdtemp())
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

  def __init__(self, directory: epath.Path | None = None, handle: Any = None) -> None:
    self._directory, self._handle = directory, handle

  @classmethod
  def acquire(cls, directory: epath.Path | str) -> WriterLock:
    """Takes the lock for this job without waiting; call it in every process of a job.

    Raises:
      CheckpointBusyError: naming the holder if another writer has it (in
        every process of the job).
      storage.LinkError: if the lock file is a symbolic link.
    """
    directory = storage.resolve(directory)
    lock = cls(directory, None)
    with processes.together(f"opening {storage.show(directory)!r} for writing"):
      if processes.is_primary():
        lock._handle = _take_lease(directory) if storage.is_remote(directory) else _take_local(directory)
    return lock

  @property
  def held(self) -> bool:
    """Whether this job holds the lock (in every process of a job that took it)."""
    return self._directory is not None

  def release(self) -> None:
    """Releases the lock (in the primary process: unlocks, or deletes the lease); idempotent."""
    directory, handle = self._directory, self._handle
    self._directory = self._handle = None
    if handle is None:
      return
    if storage.is_remote(directory):
      storage.delete_exclusive(directory / LOCK_NAME, handle)
    else:
      os.close(handle)


def active_writer(directory: epath.Path | str) -> WriterInfo | None:
  """The holder of ``directory``'s writer lock, or ``None`` if no writer is active."""
  directory = storage.resolve(directory)
  if storage.is_remote(directory):
    return _lease_holder(directory)
  if fcntl is None:  # pragma: no cover - Windows
    return None
  return _local_holder(directory)


def break_writer_lock(directory: str | os.PathLike) -> WriterInfo | None:
  """Removes the writer lease that a job which died left on a checkpoint directory.

  On ``gs://`` a writer's lease outlives a job that was killed, and every
  later writer is refused (`CheckpointBusyError`, naming the holder) until
  the lease is removed. Call this from one process, once you know that job is
  no longer running: a lease of a live job must not be broken, or two jobs
  write the same steps. On a local disk there is nothing to break: the lock
  is released when its process ends, and a live holder is an error.

  Args:
    directory: the checkpoint directory.

  Returns:
    Who held the lease, or ``None`` if there was none.

  Raises:
    CheckpointBusyError: for a local directory whose lock a live process holds.
    storage.LinkError: if the lock file is a symbolic link.

  Example:
    >>> import tempfile, jlora
    >>> jlora.break_writer_lock(tempfile.mkdtemp()) is None
    True
  """
  path = storage.resolve(directory)
  lock = path / LOCK_NAME
  storage.refuse_link(lock, "the writer lock file")
  if not storage.is_remote(path):
    holder = active_writer(path)
    if holder is not None:
      raise CheckpointBusyError(
        f"{busy_message(path, holder)} That process is alive (a local lock ends with its process); "
        "there is nothing to break."
      )
    return None
  holder = _lease_holder(path)
  with contextlib.suppress(FileNotFoundError):
    storage.remove_file(lock)
  return holder
