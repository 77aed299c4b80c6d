"""Bank files: `save_bank` and `load_bank`, a `Bank` in one orbax checkpoint.

A bank directory is an `AdapterCheckpointManager` directory holding one step
(saving again replaces it atomically, as `save_adapter` does), whose items are

* ``adapter``: every adapter's own (unpadded) tree, under its bank index
  (``{"0": lora_0, "1": lora_1, ...}``);
* ``jlora_meta``: JSON ``{format: "jlora.bank", format_version, names,
  adapters, meta_crc32}``, where ``adapters`` holds each adapter's
  `save_adapter` metadata (config, leaf records with CRC32s, base
  fingerprint, its own checksum; `jlora._src.io.checkpoint.metadata`) and
  ``meta_crc32`` covers the whole object.

Loading reads, checks and re-stacks the adapters (`jlora.stack`), which gives
back the saved bank exactly: the padding and scales follow from the adapters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jlora._src.adapters.bank import Bank, stack
from jlora._src.adapters.bind import bind
from jlora._src.core import paths
from jlora._src.io import processes
from jlora._src.io.checkpoint.arrays import abstract_lora, check_stored_arrays, verify_crc
from jlora._src.io.checkpoint.manager import AdapterCheckpointManager, read_step
from jlora._src.io.checkpoint.metadata import (
  META_CRC,
  CorruptCheckpointError,
  Metadata,
  build_metadata,
  check_base,
  metadata_checksum,
  parse_metadata,
)
from jlora._src.io.checkpoint.read import ADAPTER_ITEM, META_ITEM, ReadPlan

FORMAT = "jlora.bank"
FORMAT_VERSION = 1
_FIELDS = frozenset({"format", "format_version", "names", "adapters", META_CRC})


def save_bank(directory: str | os.PathLike, bank: Bank, *, base: Any = None) -> None:
  """Saves a `Bank` (its adapters, names and configs) to ``directory`` in one orbax checkpoint.

  Saving again replaces the bank atomically (a crash leaves the old or the
  new one); one writer at a time, as `save_adapter`.

  Args:
    directory: where to save; created if missing.
    bank: the bank (from `jlora.stack` or `load_bank`).
    base: the base tree; recommended: each adapter is checked against it and
      its fingerprint saved, so that `load_bank` can refuse another base.

  Raises:
    TypeError: if ``bank`` is not a `Bank`.
    ValueError: if an adapter does not fit ``base`` (naming the path).
    CheckpointBusyError: if another writer holds ``directory``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfgs = [jlora.LoraConfig(r=r, target_modules=("q_proj",)) for r in (1, 2)]
    >>> bank = jlora.stack([(jlora.init(params, c, key=jax.random.key(i)), c) for i, c in enumerate(cfgs)],
    ...                    names=["a", "b"])
    >>> path = tempfile.mkdtemp()
    >>> jlora.save_bank(path, bank, base=params)
    >>> jlora.load_bank(path, base=params).names
    ('a', 'b')
  """
  with processes.together("jlora.save_bank"):
    if not isinstance(bank, Bank):
      raise TypeError(f"`bank` must be a jlora.Bank (from jlora.stack); got {type(bank).__name__}.")
    pairs = [bank.adapter(k) for k in range(len(bank))]
    for lora, config in pairs:  # the checks, before any array is gathered
      build_metadata(lora, config, base, checksums=False)
  trees = {str(k): lora for k, (lora, _) in enumerate(pairs)}
  metas = [build_metadata(lora, config, base) for lora, config in pairs]
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "names": list(bank.names), "adapters": metas}
  meta[META_CRC] = metadata_checksum(meta)
  items = {ADAPTER_ITEM: ocp.args.StandardSave(trees), META_ITEM: ocp.args.JsonSave(meta)}
  with AdapterCheckpointManager(directory, max_to_keep=1, async_save=False) as mngr:
    latest = mngr.latest_step()
    mngr.write_step(0 if latest is None else latest + 1, items)


@dataclasses.dataclass(frozen=True)
class _BankMeta:
  """Validated bank metadata: the names and each adapter's `Metadata`."""

  names: tuple[str, ...]
  adapters: tuple[Metadata, ...]


def _bad(where: str, msg: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f"Invalid jlora bank metadata in {where}: {msg} The file is corrupted or is not a bank "
    "(`jlora.save_bank`); an adapter saved with `jlora.save_adapter` loads with `jlora.load_adapter`."
  )


def _parse(meta: Any, where: str) -> _BankMeta:
  if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
    raise _bad(where, f"`format` is {got!r}, expected {FORMAT!r}.")
  if meta.get("format_version") != FORMAT_VERSION:
    raise _bad(
      where, f"`format_version` is {meta.get('format_version')!r}; this jlora reads {FORMAT_VERSION}."
    )
  if set(meta) != _FIELDS:
    raise _bad(where, f"its fields are {sorted(meta)}, expected {sorted(_FIELDS)}.")
  if meta[META_CRC] != metadata_checksum(meta):
    raise CorruptCheckpointError(
      f"The jlora bank metadata of {where} fails its checksum: the file was changed or damaged after it was "
      "written, so its names and configs cannot be trusted."
    )
  names, metas = meta["names"], meta["adapters"]
  if not isinstance(names, list) or not isinstance(metas, list) or len(names) != len(metas) or not names:
    raise _bad(where, "`names` and `adapters` must be lists of one entry per adapter.")
  parsed = tuple(parse_metadata(m, f"adapter {n!r} of {where}") for n, m in zip(names, metas))
  return _BankMeta(tuple(names), parsed)


class BankStep:
  """The `StepFormat` of a bank's step (`save_bank`): one adapter tree per bank entry, no optimizer state."""

  def parse_meta(self, raw: Any, where: str) -> _BankMeta:
    """See `StepFormat.parse_meta`."""
    return _parse(raw, where)

  def restore_items(self, meta: _BankMeta, base: Any, shardings: Any, opt_state: Any, where: str) -> dict:
    """See `StepFormat.restore_items` (``opt_state``: always ``None``, as `load_bank` passes)."""
    if base is not None:
      for name, m in zip(meta.names, meta.adapters):
        check_base(m, base, f"adapter {name!r} of {where}")
    tree = {str(k): abstract_lora(m.leaves, shardings) for k, m in enumerate(meta.adapters)}
    return {ADAPTER_ITEM: ocp.args.StandardRestore(tree)}

  def check_stored(self, stored: Any, meta: _BankMeta, where: str) -> None:
    """See `StepFormat.check_stored`."""
    stored = getattr(stored, "tree", stored)
    if not isinstance(stored, Mapping) or set(stored) != {str(k) for k in range(len(meta.adapters))}:
      raise CorruptCheckpointError(f"{where} does not hold one adapter tree per bank entry; it is corrupted.")
    for k, m in enumerate(meta.adapters):
      check_stored_arrays(stored[str(k)], m.leaves, f"{where} (adapter {meta.names[k]!r})")

  def verify(self, restored: Any, plan: ReadPlan) -> tuple[dict, None]:
    """See `StepFormat.verify`."""
    restored = restored[ADAPTER_ITEM]
    for k, m in enumerate(plan.meta.adapters):
      by_path = dict(paths.leaves_with_paths(restored[str(k)]))
      names = [tuple(r["path"]) for r in m.leaves]
      verify_crc(m.leaves, [by_path[p] for p in names], [paths.to_str(p) for p in names], plan.where)
    return restored, None

  def check_fit(self, meta: _BankMeta, lora: Any, base: Any) -> None:
    """See `StepFormat.check_fit`."""
    if base is not None:
      for k, m in enumerate(meta.adapters):
        bind(base, lora[str(k)], m.config)


def load_bank(directory: str | os.PathLike, *, base: Any = None, shardings: Any = None) -> Bank:
  """Loads a `Bank` saved by `save_bank`.

  Args:
    directory: a `save_bank` directory.
    base: the base tree to check every adapter against; a mismatch with a
      saved fingerprint raises, naming the adapter and the first mismatching path.
    shardings: one ``jax.sharding.Sharding`` for every array (default: the
      first local device).

  Returns:
    The `Bank`, equal to the one saved (arrays, names, configs, entries).

  Raises:
    FileNotFoundError: if there is no complete checkpoint in ``directory``.
    ValueError: if it is not a bank, is truncated or corrupted (a
      `CorruptCheckpointError`), or does not fit ``base``.
    TypeError: if ``shardings`` is not a single sharding.
    CheckpointBusyError: if a writer replaced it while it was read, again and again.
  """
  with processes.together("jlora.load_bank"):
    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
      raise TypeError(
        "`shardings` must be one jax.sharding.Sharding for every array of the bank; got "
        f"{type(shardings).__name__}."
      )
  with AdapterCheckpointManager(directory, read_only=True) as mngr:
    restored = read_step(mngr, BankStep(), None, base=base, shardings=shardings, opt_state=None)
  meta = restored.meta
  pairs = [(restored.lora[str(k)], m.config) for k, m in enumerate(meta.adapters)]
  return stack(pairs, names=meta.names)
