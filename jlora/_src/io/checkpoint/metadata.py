"""The jlora adapter checkpoint metadata: building, checksumming and validating it (no disk access).

Each checkpoint step stores, beside the adapter arrays, one JSON object:

* ``format``, ``format_version``, ``jlora_version``;
* ``config``: the `LoraConfig` (``LoraConfig.to_dict``);
* ``leaves``: one record per adapter array, ``{path, shape, dtype, crc32}``
  (``path`` keeps key types: NNX lists have int keys; ``crc32`` of the whole
  array's bytes in C order, whatever its sharding: an array that spans the
  processes of a job is gathered for it; ``null`` in files of jlora versions
  that skipped such arrays, and then not checked);
* ``base``: the *fingerprint* of the base tree, ``{path, kind, shape, dtype}``
  of every adapted kernel (``kind`` ``"lora"``) and `modules_to_save` leaf
  (``"saved"``), or ``null``; for a PiSSA/OLoRA adapter each kernel's record
  also has ``norm``, the Frobenius norm of the residual kernel it was trained
  on, so that the original base (which has the same shapes) is refused;
* ``opt_state``: ``{path, shape, dtype, crc32}`` per optimizer-state leaf, or
  ``null``;
* ``meta_crc32`` (format version 2 on): the CRC32 of the canonical JSON of all
  the other fields, so that a damaged metadata file (``lora_alpha`` 16 → 96 is
  one flipped bit) is an error rather than a different config. Version 1
  files have no such field and are still read.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping
from importlib import metadata as _metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters.bind import bind
from jlora._src.core import paths
from jlora._src.core.config import LoraConfig, residual_init
from jlora._src.core.qarray import is_quantized
from jlora._src.io import processes

FORMAT = "jlora.adapter"
FORMAT_VERSION = 2
META_CRC = "meta_crc32"
_FIELDS_V1 = frozenset({"format", "format_version", "jlora_version", "config", "leaves", "base", "opt_state"})
_FIELDS = {1: _FIELDS_V1, 2: _FIELDS_V1 | {META_CRC}}
_LEAF_FIELDS = frozenset({"path", "shape", "dtype", "crc32"})
_BASE_FIELDS = frozenset({"path", "kind", "shape", "dtype"})
_QUANT_FIELD = "quant"  # optional: the format of a quantized base weight (`QuantizedArray.format`)
_NORM_FIELD = "norm"  # PiSSA/OLoRA: the Frobenius norm of the residual kernel (`jlora.init_with_residual`)
# The residual's norm is read back within this relative tolerance (float32 row sums, added in float64);
# the original kernel's differs by its principal part: for r = 1 of a random 4096 x 4096 kernel (the least
# concentrated case) by 5e-4, and trained weights concentrate far more in their top singular values.
_NORM_RTOL = 1e-5


class CorruptCheckpointError(ValueError):
  """A checkpoint's files are unreadable or disagree with each other or with their checksums."""


@dataclasses.dataclass(frozen=True)
class Metadata:
  """Validated checkpoint metadata (see the module docstring for the records)."""

  config: LoraConfig
  leaves: tuple[Mapping[str, Any], ...]
  base: tuple[Mapping[str, Any], ...] | None
  opt_state: tuple[Mapping[str, Any], ...] | None
  format_version: int


def jlora_version() -> str:
  try:
    return _metadata.version("jlora")
  except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
    return "0.0.0"


# -- checksums -------------------------------------------------------------------------


def crc32(x: Any) -> int:
  """CRC32 of a whole array's bytes in C order (an array that spans processes is gathered: every process
  of the job must call this for the same arrays in the same order).

  Example:
    >>> crc32(np.zeros(2, np.float32)) == zlib.crc32(bytes(8))
    True
  """
  return zlib.crc32(np.ascontiguousarray(processes.to_numpy(x)).tobytes())


def canonical_json(obj: Any) -> str:
  """One spelling of a JSON value: sorted keys, no spaces (tuples are lists, as in the file).

  Example:
    >>> canonical_json({"b": (1, 2.0), "a": None})
    '{"a":null,"b":[1,2.0]}'
  """
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def metadata_checksum(meta: Mapping[str, Any]) -> int:
  """CRC32 of the canonical JSON of every field but ``meta_crc32``.

  Example:
    >>> m = {"format_version": 2, "config": {"lora_alpha": 16}}
    >>> metadata_checksum(m) == metadata_checksum(json.loads(json.dumps(m, indent=2)))
    True
    >>> metadata_checksum(m) == metadata_checksum({"format_version": 2, "config": {"lora_alpha": 96}})
    False
  """
  rest = {k: v for k, v in meta.items() if k != META_CRC}
  return zlib.crc32(canonical_json(rest).encode("ascii"))


# -- building -----------------------------------------------------------------------------


def _check_lora_tree(lora: Any, prefix: paths.Path = ()) -> None:
  if not isinstance(lora, Mapping):
    where = paths.to_str(prefix) or "<root>"
    raise TypeError(
      f"The adapter tree must be a nested dict (from `jlora.init`); found a {type(lora).__name__} "
      f"at {where!r}."
    )
  for k, v in lora.items():
    if isinstance(k, bool) or not isinstance(k, (str, int)):
      raise TypeError(f"Adapter tree keys must be str or int; got {k!r} under {paths.to_str(prefix)!r}.")
    if isinstance(v, Mapping):
      _check_lora_tree(v, prefix + (k,))
    elif not hasattr(v, "shape") or not hasattr(v, "dtype"):
      raise TypeError(
        f"Adapter tree leaf {paths.to_str(prefix + (k,))!r} is a {type(v).__name__}, not an array."
      )


def _array_record(path: Any, leaf: Any, checksums: bool) -> dict[str, Any]:
  crc = crc32(leaf) if checksums else None
  return {"path": path, "shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name, "crc32": crc}


def leaf_records(lora: Any, checksums: bool = True) -> list[dict[str, Any]]:
  """``{path, shape, dtype, crc32}`` for each adapter array, in tree order (``crc32`` null without
  ``checksums``)."""
  _check_lora_tree(lora)
  records, names = [], {}
  for path, leaf in paths.leaves_with_paths(lora):
    name = ".".join(str(k) for k in path)  # how orbax names the array on disk
    if name in names:
      raise ValueError(
        f"Adapter tree paths {paths.to_str(names[name])!r} and {paths.to_str(path)!r} would be stored "
        f"under the same orbax name {name!r}; rename the dict keys that contain '.'."
      )
    names[name] = path
    records.append(_array_record(list(path), leaf, checksums))
  if not records:
    raise ValueError("The adapter tree has no arrays; nothing to save.")
  return records


def fingerprint(base: Any, lora: Any, config: LoraConfig) -> list[dict[str, Any]]:
  """Path, kind, shape and dtype of each base leaf the adapter touches (and, for a quantized
  weight, its format), sorted by path."""
  bound, saved = bind(base, lora, config)
  leaves = dict(paths.leaves_with_paths(base))

  def record(path: paths.Path, kind: str, leaf: Any) -> dict[str, Any]:
    rec = {"path": list(path), "kind": kind, "shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name}
    if is_quantized(leaf):
      rec[_QUANT_FIELD] = leaf.format
    if kind == "lora" and residual_init(config.init_lora_weights):
      rec[_NORM_FIELD] = kernel_norm(leaf)
    return rec

  out = [record(b.spec.path, "lora", b.kernel) for b in bound]
  out += [record(path, "saved", leaves[path]) for path in saved]
  return sorted(out, key=lambda r: paths.to_str(tuple(r["path"])))


def kernel_norm(kernel: Any) -> float:
  """The Frobenius norm of a kernel (dequantized), from float32 sums per row added in float64."""
  w = kernel.dequantize(jnp.float32) if is_quantized(kernel) else jnp.asarray(kernel, jnp.float32)
  return float(np.sqrt(processes.to_numpy(jnp.sum(jnp.square(w), axis=-1)).astype(np.float64).sum()))


def opt_records(opt_state: Any, checksums: bool = True) -> list[dict[str, Any]]:
  """``{path, shape, dtype, crc32}`` per optimizer-state leaf (``path`` is its `keystr`)."""
  out = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if not hasattr(leaf, "shape"):
      raise TypeError(
        f"Optimizer state leaf {jax.tree_util.keystr(kp)} is a {type(leaf).__name__}, not an array; "
        "only array leaves can be checkpointed."
      )
    out.append(_array_record(jax.tree_util.keystr(kp), leaf, checksums))
  return out


def build_metadata(
  lora: Any, config: LoraConfig, base: Any = None, opt_state: Any = None, *, checksums: bool = True
) -> dict[str, Any]:
  """The JSON saved beside the adapter arrays (see the module docstring).

  Without ``checksums`` the ``crc32`` fields are null: the checks alone, before
  the arrays are gathered (in a multi-process job, gathering is a collective).

  Example:
    >>> cfg = LoraConfig(r=2, target_modules=("q",))
    >>> lora = {"q": {"kernel": {"lora_A": np.zeros((3, 2)), "lora_B": np.zeros((2, 4))}}}
    >>> meta = build_metadata(lora, cfg)
    >>> meta["leaves"][1]["path"], meta["leaves"][1]["shape"], parse_metadata(meta, "here").config == cfg
    (['q', 'kernel', 'lora_B'], [2, 4], True)
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  meta = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "jlora_version": jlora_version(),
    "config": config.to_dict(),
    "leaves": leaf_records(lora, checksums),
    "base": None if base is None else fingerprint(base, lora, config),
    "opt_state": None if opt_state is None else opt_records(opt_state, checksums),
  }
  meta[META_CRC] = metadata_checksum(meta)
  return meta


# -- parsing ------------------------------------------------------------------------------


def _bad(where: str, msg: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(
    f"Invalid jlora checkpoint metadata in {where}: {msg} The file is corrupted or was not written "
    "by `jlora.save_adapter`/`AdapterCheckpointManager`; restore another step or save it again."
  )


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_path(p: Any) -> bool:
  return isinstance(p, list) and bool(p) and all(isinstance(k, str) or _is_int(k) for k in p)


def _is_shape(s: Any) -> bool:
  return isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s)


def _is_norm(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _is_dtype(d: Any) -> bool:
  try:
    return isinstance(d, str) and jnp.dtype(d).name == d
  except TypeError:
    return False


def _check_header(meta: Any, where: str) -> int:
  """Format, version, field names and (version 2) checksum; returns the version."""
  if not isinstance(meta, Mapping):
    raise _bad(where, f"expected a JSON object, got {type(meta).__name__}.")
  if meta.get("format") != FORMAT:
    raise _bad(where, f"`format` is {meta.get('format')!r}, expected {FORMAT!r}.")
  version = meta.get("format_version")
  if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
    raise _bad(
      where,
      f"`format_version` is {version!r}; this jlora ({jlora_version()}) reads versions 1..{FORMAT_VERSION}"
      " (a newer jlora wrote it? upgrade jlora).",
    )
  fields = _FIELDS[version]
  unknown, missing = sorted(set(meta) - fields), sorted(fields - set(meta))
  if unknown:
    raise _bad(
      where, f"unknown field(s) {unknown}; known fields (format version {version}): {sorted(fields)}."
    )
  if missing:
    raise _bad(where, f"missing field(s) {missing}.")
  if version >= 2:
    saved, got = meta[META_CRC], metadata_checksum(meta)
    if not _is_int(saved) or saved != got:
      shown = f"{saved:#010x}" if _is_int(saved) else repr(saved)
      raise CorruptCheckpointError(
        f"The jlora metadata of {where} fails its checksum (crc32 {got:#010x}, saved {shown}): the file "
        "was changed or damaged after it was written, so its config cannot be trusted. Restore another step."
      )
  return version


def _check_array_records(recs: Any, where: str, field: str, path_ok: Any) -> tuple[Mapping[str, Any], ...]:
  if not isinstance(recs, list):
    raise _bad(where, f"`{field}` must be a list.")
  for i, rec in enumerate(recs):
    if not isinstance(rec, Mapping) or set(rec) != _LEAF_FIELDS:
      raise _bad(where, f"`{field}[{i}]` must have exactly the fields {sorted(_LEAF_FIELDS)}; got {rec!r}.")
    crc_ok = rec["crc32"] is None or _is_int(rec["crc32"])
    if not (path_ok(rec["path"]) and _is_shape(rec["shape"]) and _is_dtype(rec["dtype"]) and crc_ok):
      raise _bad(where, f"`{field}[{i}]` is malformed: {rec!r}.")
  return tuple(recs)


def _check_base_records(recs: Any, where: str) -> tuple[Mapping[str, Any], ...]:
  if not isinstance(recs, list):
    raise _bad(where, "`base` must be null or a list.")
  for i, rec in enumerate(recs):
    ok = (
      isinstance(rec, Mapping)
      and set(rec) - {_QUANT_FIELD, _NORM_FIELD} == _BASE_FIELDS
      and (_QUANT_FIELD not in rec or isinstance(rec[_QUANT_FIELD], str))
      and (_NORM_FIELD not in rec or _is_norm(rec[_NORM_FIELD]))
      and _is_path(rec["path"])
      and rec["kind"] in ("lora", "saved")
      and _is_shape(rec["shape"])
      and _is_dtype(rec["dtype"])
    )
    if not ok:
      raise _bad(where, f"`base[{i}]` is malformed: {rec!r}.")
  return tuple(recs)


def parse_metadata(meta: Any, where: str) -> Metadata:
  """Validates saved metadata (fields, records and, from version 2, its checksum).

  Args:
    meta: the JSON object read from a checkpoint.
    where: names the checkpoint in errors (``"step 3 of '/ckpt'"``).

  Raises:
    CorruptCheckpointError: a `ValueError` naming ``where`` and the first bad
      field, or the failed checksum.
  """
  version = _check_header(meta, where)
  try:
    config = LoraConfig.from_dict(meta["config"])
  except (TypeError, ValueError) as e:
    raise _bad(where, f"its `config` is not a valid LoraConfig: {e}") from e
  leaves = _check_array_records(meta["leaves"], where, "leaves", _is_path)
  if not leaves:
    raise _bad(where, "`leaves` must be a non-empty list.")
  base = None if meta["base"] is None else _check_base_records(meta["base"], where)
  opt = meta["opt_state"]
  opt = None if opt is None else _check_array_records(opt, where, "opt_state", lambda p: isinstance(p, str))
  return Metadata(config=config, leaves=leaves, base=base, opt_state=opt, format_version=version)


def check_base(meta: Metadata, base: Any, where: str) -> None:
  """Raises if ``base`` does not match the saved fingerprint, naming the first mismatching path."""
  leaves = dict(paths.leaves_with_paths(base))
  for rec in meta.base or ():
    path = tuple(rec["path"])
    name = paths.to_str(path)
    if path not in leaves:
      raise ValueError(
        f"The adapter in {where} was saved for a base with a leaf at {name!r} "
        f"(shape {tuple(rec['shape'])}, {rec['dtype']}), but the given base has no leaf there. "
        "Pass the base tree the adapter was trained on (same model, same tree layout: a Linen "
        "variables dict vs. its 'params')."
      )
    leaf = leaves[path]
    shape, dtype = tuple(getattr(leaf, "shape", ())), jnp.dtype(getattr(leaf, "dtype", None)).name
    if is_quantized(leaf) and leaf.format != rec.get(_QUANT_FIELD, leaf.format):
      raise ValueError(
        f"The adapter in {where} was trained on {name!r} quantized as {rec[_QUANT_FIELD]!r}, but the given "
        f"base holds it as {leaf.format!r}. Pass the quantized base it was trained on, or the "
        "full-precision original."
      )
    if shape != tuple(rec["shape"]) or dtype != rec["dtype"]:
      raise ValueError(
        f"The adapter in {where} does not fit the given base at {name!r}: it was saved for shape "
        f"{tuple(rec['shape'])} and dtype {rec['dtype']}, the base has shape {shape} and dtype {dtype}. "
        "Pass the base tree the adapter was trained on."
      )
    if _NORM_FIELD in rec:
      _check_residual(rec[_NORM_FIELD], kernel_norm(leaf), meta.config, name, where)


def _check_residual(saved: float, given: float, config: LoraConfig, name: str, where: str) -> None:
  """Raises unless a PiSSA/OLoRA adapter's base kernel is the residual it was trained on (by its norm)."""
  if abs(given - saved) <= _NORM_RTOL * max(saved, given):
    return
  raise ValueError(
    f"The {config.init_lora_weights!r} adapter in {where} was trained on the residual base that "
    f"`jlora.init_with_residual` returned, whose kernel {name!r} has Frobenius norm {saved:.7g}; the "
    f"given base's has {given:.7g}. It is not that residual: the original base (of the same shapes) "
    "still holds the principal part the adapter took, and the adapter on it would count that part "
    "twice. Pass the residual base (`init_with_residual` on the original base with the same config and "
    "key gives it again), or share the adapter for the original base as plain LoRA "
    "(`jlora.to_plain_lora(lora, lora_at_init, config)`)."
  )
