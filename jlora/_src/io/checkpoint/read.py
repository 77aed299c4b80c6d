"""Reading one step of a checkpoint directory: `StepReader`, over a `StepFormat`.

A read is a pipeline of phases: pick the step; read and validate its
metadata (`checkpoint.metadata`); check the caller's ``base``, ``shardings``
and optimizer template against it and build the abstract trees
(`checkpoint.arrays`), all before any array is read, so that a bad argument
is reported as such; read orbax's array metadata and the arrays; verify them
against the metadata and the CRCs.

`StepReader` owns the phases that do not depend on what a step holds (the step
choice, the reads, telling damage from a concurrent rewrite, agreement across
processes); a `StepFormat` owns the ones that do (parsing the metadata, what to
restore, checking what was restored): `AdapterStep` here for one adapter
(`save_adapter`, `AdapterCheckpointManager`), `checkpoint.bank.BankStep` for a bank.

A failed read means the files are damaged, or a writer removed or replaced
the step meanwhile. Only the first is reported as corruption: the step must
still be there, unchanged (`storage.identity` of its metadata file: an inode
locally, an object generation on ``gs://``), with no other writer at work
(`checkpoint.lock.active_writer`). Otherwise the newest step is read again
(``step=None``) or a `CheckpointBusyError` says that a writer is at work.

In a multi-process job every process reads: the primary's choice of step is
everyone's, each phase ends with `processes.agree` (an error anywhere raises
everywhere), and the arrays come from one orbax restore that every process
enters, onto whatever mesh the ``shardings`` name. The checksums are verified
on the whole arrays, gathered across processes when they span several.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

from jlora._src.adapters.bind import bind
from jlora._src.core import paths
from jlora._src.core.config import LoraConfig
from jlora._src.io import processes, storage
from jlora._src.io.checkpoint.arrays import abstract_lora, abstract_opt, check_stored_arrays, verify_crc
from jlora._src.io.checkpoint.lock import CheckpointBusyError, WriterInfo, active_writer
from jlora._src.io.checkpoint.metadata import CorruptCheckpointError, Metadata, check_base, parse_metadata

ADAPTER_ITEM = "adapter"
META_ITEM = "jlora_meta"
OPT_ITEM = "opt_state"
_META_FILE = "metadata"  # the file orbax's JsonCheckpointHandler writes in an item's directory
# What a failed read of checkpoint files raises: OSError, tensorstore's and json's ValueError, KeyError
# for a missing entry, and orbax's bare `Exception` around a failed array read. Arguments are checked
# before anything is read, so that a bad one is never reported as a damaged checkpoint.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError)
_READ_ATTEMPTS = 6


def _is_read_error(e: BaseException) -> bool:
  return isinstance(e, _READ_ERRORS) or type(e) is Exception


def retrying(fn: Any, attempts: int = _READ_ATTEMPTS) -> Any:
  """Calls ``fn()``, again after an OSError: listing a directory whose steps a writer is removing."""
  for attempt in range(attempts):
    try:
      return fn()
    except OSError:
      if attempt == attempts - 1:
        raise
      time.sleep(0.01 * (attempt + 1))
  raise AssertionError("unreachable")  # pragma: no cover


class RestoredAdapter(NamedTuple):
  """What `AdapterCheckpointManager.restore` returns.

  Attributes:
    lora: the adapter tree.
    config: the `LoraConfig` it was saved with.
    opt_state: the optimizer state restored into the template given to
      ``restore(opt_state=...)``, or ``None``.
    step: the step that was read.
  """

  lora: dict
  config: LoraConfig
  opt_state: Any
  step: int


@dataclasses.dataclass(frozen=True)
class ReadPlan:
  """What to read from a step: orbax restore arguments built from its metadata and the caller's templates."""

  meta: Any  # the step format's parsed metadata (`Metadata` for one adapter)
  where: str
  items: dict[str, Any]


class RestoredStep(NamedTuple):
  """What `StepReader.restore` read: the format's metadata, the adapter item, the optimizer state
  (``None`` without a template) and the step."""

  meta: Any
  lora: Any
  opt_state: Any
  step: int


class StepFormat(Protocol):
  """What a step holds, for `StepReader`: the phases of a read that depend on the step's items.

  Every method checks before anything is read or after it was read; none reads files.
  """

  def parse_meta(self, raw: Any, where: str) -> Any:
    """The step's metadata JSON ``raw``, validated (raises `CorruptCheckpointError`)."""
    ...

  def restore_items(self, meta: Any, base: Any, shardings: Any, opt_state: Any, where: str) -> dict[str, Any]:
    """The caller's arguments checked against ``meta``, and orbax's restore arguments for each item."""
    ...

  def check_stored(self, stored: Any, meta: Any, where: str) -> None:
    """Checks orbax's array metadata of the adapter item against ``meta``."""
    ...

  def verify(self, restored: Any, plan: ReadPlan) -> tuple[Any, Any]:
    """The restored adapter item and optimizer state (or ``None``), checked against the saved CRCs."""
    ...

  def check_fit(self, meta: Any, lora: Any, base: Any) -> None:
    """Reads the restored adapter item against ``base`` (when given)."""
    ...


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in (ADAPTER_ITEM, OPT_ITEM):
    reg.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    reg.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  reg.add(META_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  reg.add(META_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return reg


@contextlib.contextmanager
def reading(what: str, where: str) -> Iterator[None]:
  """Turns a failed read of checkpoint files into a `CorruptCheckpointError` naming what and where."""
  try:
    yield
  except CorruptCheckpointError:
    raise
  except Exception as e:
    if not _is_read_error(e):
      raise
    raise CorruptCheckpointError(
      f"Cannot read the {what} of {where} ({type(e).__name__}: {e}); the checkpoint is truncated or "
      "corrupted. Restore another step."
    ) from e


def meta_path(directory: epath.Path, step: int) -> epath.Path:
  """The jlora metadata file of a step (read directly: orbax's restore would add a barrier)."""
  return directory / str(step) / META_ITEM / _META_FILE


def read_meta_json(directory: epath.Path, step: int, where: str) -> Any:
  """The raw metadata JSON of a step."""
  with reading("jlora metadata", where):
    return json.loads(storage.read_bytes(meta_path(directory, step)).decode())


class AdapterStep:
  """The `StepFormat` of one adapter's step (`save_adapter`, `AdapterCheckpointManager.save`): the
  adapter item, and the optimizer state when the caller gives its template."""

  def parse_meta(self, raw: Any, where: str) -> Metadata:
    """See `StepFormat.parse_meta`."""
    return parse_metadata(raw, where)

  def restore_items(
    self, meta: Metadata, base: Any, shardings: Any, opt_state: Any, where: str
  ) -> dict[str, Any]:
    """See `StepFormat.restore_items`."""
    if base is not None:
      check_base(meta, base, where)
    if opt_state is not None and meta.opt_state is None:
      raise ValueError(f"An `opt_state` template was given but {where} was saved without an optimizer state.")
    items = {ADAPTER_ITEM: ocp.args.StandardRestore(abstract_lora(meta.leaves, shardings))}
    if opt_state is not None:
      items[OPT_ITEM] = ocp.args.StandardRestore(abstract_opt(opt_state, meta.opt_state, where))
    return items

  def check_stored(self, stored: Any, meta: Metadata, where: str) -> None:
    """See `StepFormat.check_stored`."""
    check_stored_arrays(stored, meta.leaves, where)

  def verify(self, restored: Any, plan: ReadPlan) -> tuple[dict, Any]:
    """Checks the restored arrays against the saved CRCs (gathering arrays that span processes)."""
    meta, where = plan.meta, plan.where
    lora = restored[ADAPTER_ITEM]
    by_path = dict(paths.leaves_with_paths(lora))
    names = [tuple(r["path"]) for r in meta.leaves]
    verify_crc(meta.leaves, [by_path[p] for p in names], [paths.to_str(p) for p in names], where)
    opt = None
    if OPT_ITEM in plan.items:
      opt = restored[OPT_ITEM]
      verify_crc(meta.opt_state, jax.tree_util.tree_leaves(opt), [r["path"] for r in meta.opt_state], where)
    return lora, opt

  def check_fit(self, meta: Metadata, lora: Any, base: Any) -> None:
    """See `StepFormat.check_fit`."""
    if base is not None:
      bind(base, lora, meta.config)


class StepReader:
  """Restores steps of the orbax ``manager`` over ``directory``, telling damage from concurrent rewrites.

  ``is_writer``: the reader belongs to the directory's writer, so no other
  writer can be at work (a step that vanished was removed by its own retention).
  ``step_format``: what a step holds (one adapter's, `AdapterStep`; a bank's, `bank.BankStep`).
  """

  def __init__(
    self,
    manager: ocp.CheckpointManager,
    directory: epath.Path,
    *,
    is_writer: bool,
    step_format: StepFormat,
  ) -> None:
    self._manager, self._directory, self._is_writer = manager, directory, is_writer
    self._format = step_format
    self.directory = storage.show(directory)

  def _step_id(self, step: int) -> Any:
    """What changes when the step is removed or replaced."""
    return storage.identity(meta_path(self._directory, step))

  def _reload(self) -> None:
    storage.refresh(self._directory)
    retrying(self._manager.reload)

  def _pick_step(self, step: int | None) -> int:
    if step is None:
      latest = self._manager.latest_step()
      for attempt in range(0 if self._is_writer or latest is not None else 3):
        # Orbax lists a directory entry by entry: while a writer replaces the newest step, a
        # listing can miss both the new and the old one. Look again before saying there is none.
        time.sleep(0.01 * (attempt + 1))
        self._reload()
        latest = self._manager.latest_step()
        if latest is not None:
          break
      if latest is None:
        writer = active_writer(self._directory) if not self._is_writer else None
        busy = (
          f" A writer is active ({writer.describe()}); its first step is not complete yet." if writer else ""
        )
        raise FileNotFoundError(
          f"No complete adapter checkpoint in {self.directory!r} (half-written steps are ignored).{busy}"
        )
      return latest
    if step not in self._manager.all_steps():
      self._reload()  # a reader's list of steps dates from when it opened
    if step not in self._manager.all_steps():
      raise ValueError(
        f"Step {step} is not in {self.directory!r}; complete steps: {sorted(self._manager.all_steps())}."
      )
    return step

  def _agreed_step(self, step: int | None) -> int:
    """The step to read: the primary process's choice, in every process."""
    chosen = None
    with processes.together(f"choosing a step of {self.directory!r}"):
      if processes.count() > 1:
        self._reload()  # the others' steps, finished since this process listed the directory
      chosen = self._pick_step(step)
    return processes.share(f"choosing a step of {self.directory!r}", chosen)

  def _plan(self, step: int, base: Any, shardings: Any, opt_state: Any) -> ReadPlan:
    """Reads and checks the metadata, then the caller's arguments against it (before any array is read)."""
    where = f"step {step} of {self.directory!r}"
    storage.refresh(self._directory / str(step))
    meta = self._format.parse_meta(read_meta_json(self._directory, step, where), where)
    items = self._format.restore_items(meta, base, shardings, opt_state, where)
    with reading("array metadata", where):
      # A fresh handler: the writer's own remembers its last save's items as temporary until it finalizes
      # them, which only the primary process does (on gs://, where items are written in place).
      stored = ocp.StandardCheckpointHandler().metadata(self._directory / str(step) / ADAPTER_ITEM)
    if stored is None:
      raise CorruptCheckpointError(
        f"{where} has no adapter arrays; the checkpoint is truncated or corrupted."
      )
    self._format.check_stored(stored, meta, where)
    return ReadPlan(meta=meta, where=where, items=items)

  def _read_arrays(self, step: int, plan: ReadPlan) -> dict[str, Any]:
    """Orbax's restore of the planned items (every process enters it), agreed on."""
    with processes.together(f"reading {plan.where}"), reading("arrays", plan.where):
      return self._manager.restore(step, args=ocp.args.Composite(**plan.items))

  def _explain_failed_read(self, step: int, step_id: Any, error: Exception, *, retry: bool) -> None:
    """Returns if the read should be retried; raises what explains the failure otherwise.

    A read fails for one of two reasons: the files are damaged, or a writer
    removed or replaced the step while it was read. Only the first is reported
    as corruption: the step must still be there, unchanged, with no writer at work.
    """
    writer: WriterInfo | None = None if self._is_writer else active_writer(self._directory)
    replaced = step_id is None or self._step_id(step) != step_id
    if not replaced and writer is None:
      raise error
    if retry:
      self._reload()
      return
    by = f" by the writer at work there, {writer.describe()}" if writer else ""
    what = "removed or replaced" if replaced else "possibly being replaced"
    raise CheckpointBusyError(
      f"Step {step} of {self.directory!r} was {what}{by} while it was being read ({error}). The data read "
      "is discarded; retry, or restore another step. If this persists once no writer is active, the step "
      "is corrupted."
    ) from error

  def _attempt(self, step: int, base: Any, shardings: Any, opt_state: Any) -> tuple[ReadPlan, dict, Any]:
    with processes.together(f"restoring step {step} of {self.directory!r}"):
      plan = self._plan(step, base, shardings, opt_state)
    restored = self._read_arrays(step, plan)
    with processes.together(f"verifying {plan.where}"):
      lora, opt = self._format.verify(restored, plan)
    return plan, lora, opt

  def restore(self, step: int | None, *, base: Any, shardings: Any, opt_state: Any) -> RestoredStep:
    """Reads ``step`` (``None``: the newest), checked against the caller's arguments, its metadata and
    CRCs (see `AdapterCheckpointManager.restore`)."""
    for attempt in range(_READ_ATTEMPTS):
      chosen = self._agreed_step(step)
      step_id = self._step_id(chosen)
      try:
        plan, lora, opt = self._attempt(chosen, base, shardings, opt_state)
      except CorruptCheckpointError as e:
        with processes.together(f"restoring step {chosen} of {self.directory!r}"):
          self._explain_failed_read(chosen, step_id, e, retry=attempt < _READ_ATTEMPTS - 1)
        time.sleep(0.02 * (attempt + 1))
        continue
      with processes.together(f"restoring step {chosen} of {self.directory!r}"):
        self._format.check_fit(plan.meta, lora, base)
      return RestoredStep(meta=plan.meta, lora=lora, opt_state=opt, step=int(chosen))
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises
