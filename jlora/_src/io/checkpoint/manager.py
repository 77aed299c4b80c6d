"""Adapter checkpoints with orbax: `AdapterCheckpointManager`, `save_adapter`, `load_adapter`.

On disk an adapter checkpoint is an orbax `CheckpointManager` directory: one
sub-directory per step, each holding three orbax items written together

* ``adapter``: the adapter tree's arrays (``StandardSave``);
* ``jlora_meta``: JSON with the `LoraConfig`, the adapter's leaf records
  (paths, shapes, dtypes, CRC32s), the base fingerprint and a checksum of
  the metadata itself (see `jlora._src.io.checkpoint.metadata`);
* ``opt_state`` (optional): the optimizer state, to resume training.

Orbax writes a step into a temporary directory and renames it into place
only when every item is written, so a process killed while saving leaves the
previous steps intact and a temporary directory that is ignored (and removed
the next time a writer opens the directory). Restoring needs no template:
the abstract tree is rebuilt from the metadata.

One writer per directory: a writing manager holds an advisory lock on the
directory while it is open (`jlora._src.io.checkpoint.lock`); a second writer
is refused with an error naming the first one's pid and host. Steps removed
by retention or replaced are first moved aside (``.jlora-deleted/``), then
deleted, so a reader sees a step whole or not at all; a read that fails
because a step was removed or replaced meanwhile is retried or reported as
such, never as corruption.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jlora._src.core.config import LoraConfig
from jlora._src.io import processes, storage
from jlora._src.io.checkpoint.lock import WriterLock
from jlora._src.io.checkpoint.metadata import FORMAT as ADAPTER_FORMAT
from jlora._src.io.checkpoint.metadata import build_metadata
from jlora._src.io.checkpoint.read import (
  ADAPTER_ITEM,
  META_ITEM,
  OPT_ITEM,
  AdapterStep,
  RestoredAdapter,
  RestoredStep,
  StepFormat,
  StepReader,
  handler_registry,
  read_meta_json,
  retrying,
)

DELETED_DIR = ".jlora-deleted"  # where removed steps wait to be deleted (orbax's `todelete_subdir`)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_options(config: Any, max_to_keep: Any, save_interval_steps: Any) -> None:
  if config is not None and not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig or None; got {type(config).__name__}.")
  if max_to_keep is not None and (not _is_int(max_to_keep) or max_to_keep < 1):
    raise ValueError(f"`max_to_keep` must be None or a positive integer; got {max_to_keep!r}.")
  if not _is_int(save_interval_steps) or save_interval_steps < 1:
    raise ValueError(f"`save_interval_steps` must be a positive integer; got {save_interval_steps!r}.")


def _orbax_manager(
  directory: Any, max_to_keep: int | None, interval: int, async_save: bool, read_only: bool
) -> ocp.CheckpointManager:
  """Orbax's manager over ``directory``, with barriers that time out in a multi-process job."""
  options = ocp.CheckpointManagerOptions(
    save_interval_steps=interval,
    preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep else None,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=not read_only,
    create=False,  # jlora creates the directory (and orbax cannot with `active_processes`)
    save_root_metadata=not read_only,
    todelete_subdir=None if read_only or storage.is_remote(directory) else DELETED_DIR,
    multiprocessing_options=processes.orbax_options(),
  )
  return ocp.CheckpointManager(directory, options=options, handler_registry=handler_registry())


class AdapterCheckpointManager:
  """Saves adapter trees (and optimizer states) by step, for training loops.

  A thin layer over orbax's `CheckpointManager`: steps, retention
  (``max_to_keep``), a save interval and asynchronous saving come from orbax;
  jlora adds the config and base fingerprint beside each step, rebuilds the
  adapter tree from them on restore (no template needed), and checks the
  restored data against the base and against checksums.

  Crash safety: a step becomes visible only once all of its items are
  written (orbax's temporary directory + rename); a process killed while
  saving leaves earlier steps restorable, and the half-written step is
  ignored and cleaned up when the directory is next opened for writing.

  One writer: a manager that can save holds the directory's writer lock
  until `close` (or the end of its ``with`` block, or its process); another
  writer on the same directory, in this process or another, is refused with
  a `CheckpointBusyError` (a `RuntimeError`) naming the holder's pid and
  host. Any number of ``read_only`` managers (and `load_adapter`) may read
  meanwhile: they get a complete step, or an error saying that a writer
  removed or replaced it while it was read.

  Shapes: ``lora_A`` ``(*stacked, *fan_in, r)``, ``lora_B``
  ``(*stacked, r, *fan_out)`` for a kernel ``(*stacked, *fan_in, *fan_out)``.

  Args:
    directory: the checkpoint root; created if missing (unless ``read_only``).
    config: the `LoraConfig` saved with every step; needed to `save`, not to
      `restore` (which returns the saved config).
    base: the base tree; when given, every `save` checks the adapter fits it
      and records its fingerprint (paths, shapes, dtypes of the adapted
      kernels) so a later restore onto another base fails early.
    max_to_keep: keep only the newest this many steps (``None``: all).
    save_interval_steps: `save` writes only steps that are multiples of this.
    async_save: write in a background thread; `save` returns once the arrays
      are copied off the device. Call `wait_until_finished` (or `close`, or
      leave the ``with`` block) before reading the files.
    read_only: open an existing directory for restoring only (takes no lock).

  Raises:
    TypeError: if ``config`` is not a `LoraConfig` or None.
    ValueError: for invalid arguments.
    FileNotFoundError: if ``read_only`` and the directory does not exist.
    CheckpointBusyError: if another writer holds the directory.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, optax, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> opt = optax.adam(1e-3)
    >>> with jlora.AdapterCheckpointManager(tempfile.mkdtemp(), cfg, max_to_keep=2) as mngr:
    ...   for step in range(3):
    ...     _ = mngr.save(step, lora, opt_state=opt.init(lora), base=params)
    ...   mngr.wait_until_finished()
    ...   restored = mngr.restore(opt_state=jax.eval_shape(opt.init, lora))
    >>> restored.step, mngr.all_steps()
    (2, [1, 2])
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    config: LoraConfig | None = None,
    *,
    base: Any = None,
    max_to_keep: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
  ) -> None:
    with processes.together("opening an AdapterCheckpointManager"):
      _check_options(config, max_to_keep, save_interval_steps)
      self._directory = storage.resolve(directory)
      if read_only and not storage.is_dir(self._directory):
        raise FileNotFoundError(f"No adapter checkpoint directory at {self.directory!r}.")
      if not read_only and processes.is_primary():
        storage.mkdir(self._directory)
    self._config, self._base, self._interval = config, base, int(save_interval_steps)
    # `read_only` is enforced here rather than with orbax's option of that name,
    # which logs warnings on every open; a reading manager writes nothing.
    self._read_only = read_only
    self._lock = WriterLock()
    if not read_only:
      self._lock = WriterLock.acquire(self._directory)  # before orbax cleans up "stale" temporary dirs
    try:
      self._purge_deleted()
      self._manager = retrying(
        lambda: _orbax_manager(self._directory, max_to_keep, save_interval_steps, async_save, read_only)
      )
    except BaseException:
      self._lock.release()
      raise

  # -- context manager / lifecycle
  def __enter__(self) -> AdapterCheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @property
  def directory(self) -> str:
    """The checkpoint root, as a string (an absolute local path or a URL such as ``gs://bucket/dir``)."""
    return storage.show(self._directory)

  def all_steps(self) -> list[int]:
    """The complete steps on disk, ascending (half-written ones are not listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step (or, while it is written asynchronously, the one being saved), or ``None``."""
    return self._manager.latest_step()

  def wait_until_finished(self) -> None:
    """Blocks until every asynchronous save has been written and committed (in a job: by every process, and
    finalized by the primary, which writes orbax's commit markers on gs:// after the others are done)."""
    with processes.together("AdapterCheckpointManager.wait_until_finished"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases orbax's resources and the directory's writer lock."""
    try:
      self._manager.close()
      self._purge_deleted()
    finally:
      self._lock.release()

  def _purge_deleted(self) -> None:
    """Deletes the steps that retention or `save(overwrite=True)` moved aside (the writing job's primary
    process, on a local disk; on an object store orbax deletes steps directly)."""
    if not self._lock.held or storage.is_remote(self._directory):
      return
    with processes.together(f"cleaning up {self.directory!r}"):
      trash = self._directory / DELETED_DIR
      storage.refuse_link(trash, "where removed steps wait to be deleted")
      if processes.is_primary():
        for name in storage.listdir(trash):
          entry = trash / name
          if storage.is_link(entry):
            storage.remove_file(entry)  # the link itself, never what it points to
          else:
            storage.remove_tree(entry)

  # -- save
  def _check_step_order(self, step: int, overwrite: bool) -> None:
    latest = self.latest_step()
    if overwrite or latest is None or step > latest:
      return
    fix = (
      "A run restarted from this directory must continue its step count: `restored = mngr.restore()`, "
      "then save `restored.step + 1` onwards. To replace steps deliberately pass `overwrite=True`."
    )
    if step in self._manager.all_steps():
      raise ValueError(
        f"Step {step} already exists in {self.directory!r} (latest step: {latest}); steps are never "
        f"overwritten silently. {fix}"
      )
    raise ValueError(
      f"Step {step} is older than the latest step {latest} in {self.directory!r}; steps must increase. {fix}"
    )

  def save(
    self,
    step: int,
    lora: Any,
    *,
    opt_state: Any = None,
    base: Any = None,
    force: bool = False,
    overwrite: bool = False,
  ) -> bool:
    """Saves ``lora`` (and ``opt_state``) as ``step``.

    Args:
      step: the training step, a non-negative int larger than any saved one
        (unless ``overwrite``).
      lora: the adapter tree.
      opt_state: optionally the optimizer state (any pytree of arrays, e.g.
        an optax state), to resume training exactly.
      base: the base tree, for the fingerprint (default: the manager's).
      force: save even if ``step`` is not a multiple of
        ``save_interval_steps``.
      overwrite: allow ``step`` to be at or below the latest step; an
        existing step of that number is replaced (the old one is moved aside
        first, so a crash while saving loses that step, never others). Newer
        steps are kept.

    Returns:
      Whether a checkpoint was written (``False`` between intervals).

    Raises:
      ValueError: if the manager is read-only or has no config, ``step`` is
        not after the latest step (naming it) and not ``overwrite``, or the
        adapter does not fit ``base`` (naming the path).
    """
    with processes.together("AdapterCheckpointManager.save"):
      self._check_can_save(step, overwrite)
      step = int(step)
      latest = self.latest_step()
      due = self._manager.should_save(step) if latest is None or step > latest else step % self._interval == 0
      base = base if base is not None else self._base
      if force or due:  # the checks of the metadata, before any array is gathered
        build_metadata(lora, self._config, base, opt_state, checksums=False)
    if not (force or due):
      return False
    meta = build_metadata(lora, self._config, base, opt_state)
    items = {ADAPTER_ITEM: ocp.args.StandardSave(lora), META_ITEM: ocp.args.JsonSave(meta)}
    if opt_state is not None:
      items[OPT_ITEM] = ocp.args.StandardSave(opt_state)
    return self.write_step(step, items)

  def _check_can_save(self, step: Any, overwrite: bool) -> None:
    if self._read_only:
      raise ValueError("This AdapterCheckpointManager was opened with `read_only=True`; it cannot save.")
    if self._config is None:
      raise ValueError(
        "This AdapterCheckpointManager has no `config`; pass "
        "`AdapterCheckpointManager(directory, config)` to save."
      )
    if not _is_int(step) or step < 0:
      raise ValueError(f"`step` must be a non-negative int; got {step!r}.")
    self._check_step_order(int(step), overwrite)

  def write_step(self, step: int, items: dict[str, Any]) -> bool:
    """Writes the orbax ``items`` as ``step``, replacing a step of that number (see `save`)."""
    self._manager.wait_until_finished()  # earlier saves' retention has moved their steps aside
    if step in self._manager.all_steps():  # `overwrite`
      self._manager.delete(step)
    self._purge_deleted()
    with processes.together("AdapterCheckpointManager.save"):
      saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
    return saved

  # -- restore
  def restore(
    self,
    step: int | None = None,
    *,
    base: Any = None,
    shardings: Any = None,
    opt_state: Any = None,
  ) -> RestoredAdapter:
    """Restores a step without any template for the adapter tree.

    Args:
      step: the step to restore; ``None``: the newest complete step.
      base: a base tree to check the adapter against (default: the
        manager's). A mismatch with the saved fingerprint raises, naming the
        first mismatching path.
      shardings: where to put the adapter arrays: one
        ``jax.sharding.Sharding`` for every leaf, or a tree with the adapter
        tree's structure whose leaves are shardings. Default: the first
        local device.
      opt_state: a template of the optimizer state to restore with it
        (arrays or ``jax.ShapeDtypeStruct``; e.g.
        ``jax.eval_shape(optimizer.init, lora)``). An optimizer state's
        structure (optax NamedTuples) cannot be rebuilt from the files, so it
        is restored only when a template is given; leaves keep the
        template's shardings.

    Returns:
      ``RestoredAdapter(lora, config, opt_state, step)``; ``opt_state`` is
      ``None`` without a template.

    Raises:
      FileNotFoundError: if the directory has no complete step.
      TypeError, ValueError: for a ``shardings`` that is not a sharding or
        does not divide a saved array (naming the leaf).
      ValueError: if the step is missing, truncated or corrupted, does not
        fit ``base``, or has no optimizer state when a template is given.
        Nothing is returned partially.
      CheckpointBusyError: if a writer removed or replaced the step while it
        was read (with ``step=None`` the newest step is tried again first).
    """
    base = base if base is not None else self._base
    read = read_step(self, AdapterStep(), step, base=base, shardings=shardings, opt_state=opt_state)
    return RestoredAdapter(lora=read.lora, config=read.meta.config, opt_state=read.opt_state, step=read.step)


def read_step(
  mngr: AdapterCheckpointManager, step_format: StepFormat, step: int | None, **args: Any
) -> RestoredStep:
  """Reads ``step`` of ``mngr``'s directory in ``step_format`` (`AdapterStep`, `bank.BankStep`); ``args``:
  `StepReader.restore`'s ``base``, ``shardings`` and ``opt_state``."""
  reader = StepReader(mngr._manager, mngr._directory, is_writer=mngr._lock.held, step_format=step_format)
  return reader.restore(step, **args)


# -- one-call save / load --------------------------------------------------------------


def save_adapter(directory: str | os.PathLike, lora: Any, config: LoraConfig, *, base: Any = None) -> None:
  """Saves an adapter tree and its config to ``directory`` (blocking).

  ``directory`` holds one adapter: saving again replaces it atomically (the
  new one is written as a new step and the old one is removed only after the
  new one is complete), so a crash never leaves it without a valid adapter,
  and a concurrent `load_adapter` gets the old or the new one, or an error
  saying it was replaced while read. It is an ordinary
  `AdapterCheckpointManager` directory, with one writer at a time: a second
  `save_adapter` to it while one is running raises `CheckpointBusyError`
  naming the other's pid and host.

  Shapes: the factors keep their kernel's axis order (`jlora.Layout`): a
  Dense kernel ``(in, out)`` has ``lora_A`` ``(in, r)`` and ``lora_B`` ``(r, out)``.

  Args:
    directory: where to save; created if missing.
    lora: the adapter tree.
    config: the config it was made with.
    base: the base tree; recommended: the adapter is checked against it and
      its fingerprint (paths, shapes, dtypes of the adapted kernels; for a
      PiSSA/OLoRA adapter also the norms of the residual kernels) is saved
      so that `load_adapter` can refuse a base that does not fit (the
      original base, for an adapter trained on its residual).

  Returns:
    ``None``; the adapter is on disk when the call returns.

  Raises:
    TypeError: if ``config`` is not a `LoraConfig` or ``lora`` not an adapter tree.
    ValueError: if the adapter does not fit ``base`` (naming the path).
    CheckpointBusyError: if another writer holds ``directory``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> path = tempfile.mkdtemp()
    >>> jlora.save_adapter(path, lora, cfg, base=params)
    >>> lora2, cfg2 = jlora.load_adapter(path, base=params)
    >>> cfg2 == cfg, lora2["q_proj"]["kernel"]["lora_A"].shape
    (True, (4, 2))
  """
  with processes.together("jlora.save_adapter"):
    if not isinstance(config, LoraConfig):
      raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  with AdapterCheckpointManager(directory, config, base=base, max_to_keep=1, async_save=False) as mngr:
    with processes.together("jlora.save_adapter"):
      _check_single_adapter(mngr)
    latest = mngr.latest_step()
    mngr.save(0 if latest is None else latest + 1, lora, force=True)


def _check_single_adapter(mngr: AdapterCheckpointManager) -> None:
  """`save_adapter` replaces the one adapter of a directory; it refuses a directory that holds more."""
  steps = mngr.all_steps()
  if not steps:
    return
  where = f"step {steps[-1]} of {mngr.directory!r}"
  raw = read_meta_json(mngr._directory, steps[-1], where)  # noqa: SLF001 - this module's manager
  kind = None
  if len(steps) > 1:
    kind = f"{len(steps)} steps ({steps[0]} ... {steps[-1]})"
  elif isinstance(raw, dict) and raw.get("format") != ADAPTER_FORMAT:
    kind = f"a {raw.get('format')!r} checkpoint"
  elif isinstance(raw, dict) and raw.get("opt_state") is not None:
    kind = "a step with an optimizer state"
  if kind is not None:
    raise ValueError(
      f"{mngr.directory!r} holds {kind}, written by an AdapterCheckpointManager or `jlora.save_bank`; "
      "`save_adapter` keeps one adapter per directory and would delete them. Save to another directory, "
      "or use `AdapterCheckpointManager(...).save(step, lora)` to add a step."
    )


def load_adapter(
  directory: str | os.PathLike, *, base: Any = None, shardings: Any = None, step: int | None = None
) -> tuple[dict, LoraConfig]:
  """Loads ``(lora, config)`` saved by `save_adapter` (or a manager's newest step).

  No template is needed: the tree is rebuilt from the saved metadata.

  Args:
    directory: a `save_adapter` or `AdapterCheckpointManager` directory.
    base: the base tree to check the adapter against; a mismatch with the
      saved fingerprint raises, naming the first mismatching path.
    shardings: a ``jax.sharding.Sharding`` for every leaf, or a tree of them
      with the adapter tree's structure (default: the first local device).
    step: a step of a manager directory (default: the newest complete one).

  Returns:
    ``(lora, config)``.

  Raises:
    FileNotFoundError: if there is no complete checkpoint in ``directory``.
    ValueError: if it is truncated, corrupted or does not fit ``base``.
    CheckpointBusyError: if a writer replaced it while it was read, again
      and again (a single replacement is retried).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> path = tempfile.mkdtemp()
    >>> jlora.save_adapter(path, lora, cfg, base=params)
    >>> lora2, cfg2 = jlora.load_adapter(path, base=params)
    >>> bool((lora2["q_proj"]["kernel"]["lora_B"] == lora["q_proj"]["kernel"]["lora_B"]).all()), cfg2 == cfg
    (True, True)
    >>> jlora.load_adapter(path, base={"q_proj": {"kernel": jnp.ones((5, 3))}})
    Traceback (most recent call last):
    ...
    ValueError: ...
  """
  with AdapterCheckpointManager(directory, read_only=True) as mngr:
    restored = mngr.restore(step, base=base, shardings=shardings)
  return restored.lora, restored.config
