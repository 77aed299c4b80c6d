"""The processes of a ``jax.distributed`` job acting as one: agreement, the primary process, gathering arrays.

In a job of several processes (a TPU pod, a multi-GPU host with one process
per GPU), every process runs the same script and calls the same jlora storage
functions in the same order, as orbax expects. Orbax's own barriers wait
forever for a process that never arrives, so jlora agrees *before* entering
them: each phase that can fail ends with `agree`, where every process reports
its outcome through the job's key-value store and then

* all go on, if every process succeeded;
* all raise, if any failed: the failing process its own error, the others the
  same kind of error, naming the process and its message;
* all raise `SyncTimeoutError`, naming the processes that did not arrive,
  after ``JLORA_SYNC_TIMEOUT_S`` seconds (default 300), never a hang.

Files that are not orbax's (metadata, PEFT files, locks) are written by the
primary process (`is_primary`) while the others wait in `agree`. An array
that spans processes is read whole with `to_numpy`, which every process must
call for the same arrays in the same order (it gathers across processes).

In a single process all of this costs nothing: `agree` raises the error it is
given, and nothing is exchanged.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jlora._src.core import jax_compat

TIMEOUT_ENV = "JLORA_SYNC_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 300.0
# The n-th agreement of this process. Every process calls jlora's storage functions in the same order
# (orbax requires the same), so the n-th agreement of each process is the same call.
_SEQUENCE = itertools.count()


class SyncTimeoutError(TimeoutError):
  """A process of the job did not reach a jlora storage call in time."""


class OtherProcessError(RuntimeError):
  """Another process of the job failed (with an error this process cannot rebuild)."""


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def is_primary() -> bool:
  """Whether this process writes the files that are not orbax's (process 0)."""
  return jax.process_index() == 0


def timeout_s() -> float:
  """How long `agree` waits for the other processes (``JLORA_SYNC_TIMEOUT_S``, default 300 s)."""
  raw = os.environ.get(TIMEOUT_ENV)
  if raw is None:
    return _DEFAULT_TIMEOUT_S
  try:
    value = float(raw)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f"Environment variable {TIMEOUT_ENV}={raw!r} must be a positive number of seconds.")
  return value


def _report(error: BaseException | None) -> str:
  if error is None:
    return "{}"
  cls = type(error)
  return json.dumps({"type": f"{cls.__module__}:{cls.__qualname__}", "message": str(error)})


def _rebuild(process: int, report: dict[str, str]) -> BaseException:
  """The error another process reported, as an exception of the same class where jlora can build one."""
  module, _, name = report["type"].partition(":")
  message = f"process {process} of the job failed: {report['message']}"
  cls: Any = None
  if module == "builtins":
    cls = getattr(builtins, name, None)
  elif module.split(".")[0] == "jlora":
    with contextlib.suppress(ImportError):
      cls = getattr(importlib.import_module(module), name, None)
  if isinstance(cls, type) and issubclass(cls, Exception):
    with contextlib.suppress(Exception):
      return cls(message)
  return OtherProcessError(f"{message} ({report['type']})")


def agree(what: str, error: BaseException | None = None) -> None:
  """Every process reports whether its part of ``what`` failed; if any did, every process raises.

  Args:
    what: the call, for messages (e.g. ``"jlora.save_adapter"``).
    error: this process's error, or ``None``.

  Raises:
    The error given; else the first failed process's error (same class, its
    message prefixed with the process); `SyncTimeoutError` if a process does
    not report within `timeout_s`.

  Example:
    >>> agree("a call")  # one process: nothing to exchange
    >>> agree("a call", ValueError("bad"))
    Traceback (most recent call last):
    ValueError: bad
  """
  if count() == 1:
    if error is not None:
      raise error
    return
  client = jax_compat.distributed_client()
  seq = next(_SEQUENCE)
  prefix = f"jlora/agree/{seq}/"
  client.key_value_set(f"{prefix}{index()}", _report(error))
  limit = timeout_s()
  try:
    client.wait_at_barrier(f"jlora-agree-{seq}", int(limit * 1000))
  except jax.errors.JaxRuntimeError:
    arrived = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(prefix)}
    missing = sorted(set(range(count())) - arrived)
    raise SyncTimeoutError(
      f"{what}: process(es) {missing} of this {count()}-process job did not arrive within {limit:g} s. "
      f"Every process must call {what} (the same jlora storage calls, in the same order); if a process is "
      f"merely slow, raise {TIMEOUT_ENV}."
    ) from (error if error is not None else None)
  if error is not None:
    raise error
  reports = sorted((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in client.key_value_dir_get(prefix))
  failed = [(p, r) for p, r in reports if r]
  if failed:
    raise _rebuild(*failed[0])


def share(what: str, value: Any) -> Any:
  """The primary process's ``value`` (JSON), in every process.

  Example:
    >>> share("a choice", 3)
    3
  """
  if count() == 1:
    return value
  client = jax_compat.distributed_client()
  key = f"jlora/share/{next(_SEQUENCE)}"
  if is_primary():
    client.key_value_set(key, json.dumps(value))
    return value
  limit = timeout_s()
  try:
    return json.loads(client.blocking_key_value_get(key, int(limit * 1000)))
  except jax.errors.JaxRuntimeError:
    raise SyncTimeoutError(
      f"{what}: the primary process (0) did not answer within {limit:g} s. Every process must call {what}; "
      f"if the primary is merely slow, raise {TIMEOUT_ENV}."
    ) from None


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
  """Runs the block in every process, then `agree`s on its outcome (an error in any process raises in all).

  The block must not enter a collective (orbax, `to_numpy`) after a point where
  it can fail in one process only: the others would wait there.
  """
  try:
    yield
  except Exception as e:
    agree(what, e)
    raise
  agree(what)


def on_primary(what: str, fn: Any) -> None:
  """Runs ``fn()`` on the primary process while the others wait; an error there raises in every process."""
  with together(what):
    if is_primary():
      fn()


def orbax_options() -> Any:
  """Orbax's multiprocessing options for a job of all processes: with the processes named, orbax's barriers
  are the distributed client's, which time out (its default barrier, a device collective, waits forever for a
  process that failed)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  return ocp.options.MultiprocessingOptions(active_processes=set(range(count())) if count() > 1 else None)


def to_numpy(x: Any) -> np.ndarray:
  """The whole array as numpy, gathered from all processes when it spans several (a collective then).

  Example:
    >>> to_numpy(jax.numpy.arange(3)).tolist()
    [0, 1, 2]
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
