"""From validated checkpoint metadata to restored arrays (no disk access).

Before reading: the abstract adapter tree to restore into (shapes and dtypes
from the metadata, placement from the caller's ``shardings``, checked here so
that a bad ``shardings`` is reported as such) and the abstract optimizer
state (from the caller's template). After reading orbax's array metadata and
the arrays: checks that the files agree with the metadata and the checksums.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.core import paths
from jlora._src.io.checkpoint.metadata import CorruptCheckpointError, crc32


def default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _check_sharding(sharding: Any, shape: tuple[int, ...], name: str) -> None:
  if not isinstance(sharding, jax.sharding.Sharding):
    raise TypeError(
      f"`shardings` entry for {name!r} is a {type(sharding).__name__}, not a jax.sharding.Sharding."
    )
  spec = getattr(sharding, "spec", None)
  try:
    if spec is not None and len(spec) > len(shape):
      raise ValueError(f"its spec {spec} has more entries than the array has axes")
    sharding.shard_shape(shape)
  except (ValueError, TypeError, IndexError) as e:
    raise ValueError(
      f"`shardings` entry for {name!r} does not fit the saved array of shape {shape}: {e}. Pass a sharding "
      "that divides the array's axes (e.g. a NamedSharding whose mesh axes divide them)."
    ) from None


def abstract_lora(records: Iterable[Mapping[str, Any]], shardings: Any) -> dict:
  """The adapter tree of ``jax.ShapeDtypeStruct`` to restore into.

  Args:
    records: the metadata's ``leaves``.
    shardings: ``None`` (the first local device), one ``jax.sharding.Sharding``
      for every leaf, or a tree with the adapter tree's structure whose
      leaves are shardings.

  Raises:
    TypeError, ValueError: for a ``shardings`` that is not a sharding, lacks
      an adapter leaf, or does not divide a leaf's shape (naming the leaf).
  """
  by_path = None
  if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
    by_path = dict(paths.leaves_with_paths(shardings))
  out: dict = {}
  for rec in records:
    path, shape = tuple(rec["path"]), tuple(rec["shape"])
    if by_path is None:
      sharding = shardings or default_sharding()
    elif path in by_path:
      sharding = by_path[path]
    else:
      raise ValueError(
        f"`shardings` has no entry for adapter leaf {paths.to_str(path)!r}; pass one "
        "`jax.sharding.Sharding` for all leaves or a tree with the adapter tree's structure."
      )
    _check_sharding(sharding, shape, paths.to_str(path))
    paths.nested_set(out, path, jax.ShapeDtypeStruct(shape, jnp.dtype(rec["dtype"]), sharding=sharding))
  return out


def abstract_opt(template: Any, records: Sequence[Mapping[str, Any]], where: str) -> Any:
  """The optimizer state of ``jax.ShapeDtypeStruct`` to restore into, checked against the saved records."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  if len(flat) != len(records):
    raise ValueError(
      f"`opt_state` template has {len(flat)} array leaves but the optimizer state saved in {where} "
      f"has {len(records)}; build the template with the same optimizer, e.g. "
      "`jax.eval_shape(optimizer.init, lora)`."
    )
  out = []
  for (kp, leaf), rec in zip(flat, records):
    name = jax.tree_util.keystr(kp)
    shape, dtype = tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", None)
    if (
      name != rec["path"]
      or shape != tuple(rec["shape"])
      or dtype is None
      or jnp.dtype(dtype).name != rec["dtype"]
    ):
      raise ValueError(
        f"`opt_state` template does not match the optimizer state saved in {where}: template leaf "
        f"{name} is {shape} {dtype}, saved leaf {rec['path']} is {tuple(rec['shape'])} {rec['dtype']}. "
        "Build the template with the same optimizer and adapter, e.g. `jax.eval_shape(optimizer.init, lora)`."
      )
    sharding = getattr(leaf, "sharding", None) or default_sharding()
    out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
  return jax.tree_util.tree_unflatten(treedef, out)


def _walk(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(node, Mapping):
    out = {}
    for k, v in node.items():
      out.update(_walk(v, prefix + (str(k),)))
    return out
  return {prefix: node}


def check_stored_arrays(stored: Any, records: Iterable[Mapping[str, Any]], where: str) -> None:
  """Compares orbax's array metadata (a tree of objects with ``shape``/``dtype``) with the records.

  Raises:
    CorruptCheckpointError: for a missing, extra or differently shaped array.

  Example:
    >>> import numpy as np
    >>> recs = [{"path": ["q", 0], "shape": [2], "dtype": "float32"}]
    >>> check_stored_arrays({"q": {"0": np.zeros(2, np.float32)}}, recs, "here")
    >>> check_stored_arrays({"q": {"0": np.zeros(3, np.float32)}}, recs, "here")
    Traceback (most recent call last):
    jlora._src.io.checkpoint.metadata.CorruptCheckpointError: Checkpoint here is inconsistent at ...
  """
  on_disk = _walk(getattr(stored, "tree", stored))
  wanted = {tuple(str(k) for k in rec["path"]): rec for rec in records}
  for key, rec in wanted.items():
    name = paths.to_str(tuple(rec["path"]))
    if key not in on_disk:
      raise CorruptCheckpointError(
        f"Checkpoint {where} is missing the array of adapter leaf {name!r}: the checkpoint is "
        "truncated or corrupted."
      )
    arr = on_disk[key]
    shape, dtype = tuple(getattr(arr, "shape", ()) or ()), getattr(arr, "dtype", None)
    if shape != tuple(rec["shape"]) or dtype is None or jnp.dtype(dtype).name != rec["dtype"]:
      raise CorruptCheckpointError(
        f"Checkpoint {where} is inconsistent at adapter leaf {name!r}: the metadata says shape "
        f"{tuple(rec['shape'])} {rec['dtype']}, the stored array is {shape} {dtype}. "
        "The checkpoint is corrupted."
      )
  extra = sorted(set(on_disk) - set(wanted))
  if extra:
    raise CorruptCheckpointError(
      f"Checkpoint {where} stores arrays the metadata does not list (e.g. {'/'.join(extra[0])!r}); "
      "the checkpoint is corrupted."
    )


def verify_crc(
  records: Sequence[Mapping[str, Any]], leaves: Sequence[Any], names: Sequence[str], where: str
) -> None:
  """Checks each restored array against its saved CRC32 (records with ``crc32`` null are skipped).

  Raises:
    CorruptCheckpointError: naming the first array whose bytes differ.
  """
  for rec, leaf, name in zip(records, leaves, names):
    if rec["crc32"] is None:
      continue
    got = crc32(leaf)
    if got != rec["crc32"]:
      raise CorruptCheckpointError(
        f"Checkpoint {where}: the data of {name!r} fails its checksum (crc32 {got:#010x}, saved "
        f"{rec['crc32']:#010x}); the checkpoint is corrupted. Restore another step."
      )
