"""Adapter checkpoints with orbax: `save_adapter`, `load_adapter`, `AdapterCheckpointManager`, `save_merged`.

On disk an adapter checkpoint is an orbax `CheckpointManager` directory: one
sub-directory per step, each holding three orbax items written together

* ``adapter``: the adapter tree's arrays (``StandardSave``);
* ``jlora_meta``: JSON with the `LoraConfig`, the adapter tree's leaf paths
  (with their key types: NNX lists have int keys), shapes, dtypes and CRC32
  checksums, and the *fingerprint* of the base tree the adapter was saved
  for: path, shape and dtype of every adapted kernel (and `modules_to_save`
  leaf);
* ``opt_state`` (optional): the optimizer state, to resume training.

Orbax writes a step into a temporary directory and renames it into place
only when every item is written, so a process killed while saving leaves the
previous steps intact and a temporary directory that is ignored (and removed
the next time a manager opens the directory). Restoring needs no template:
the abstract tree is rebuilt from the metadata.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from importlib import metadata as _metadata
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jlora._src import adapters, paths
from jlora._src.config import LoraConfig
from jlora._src.merge import merge

FORMAT = "jlora.adapter"
FORMAT_VERSION = 1
ADAPTER_ITEM = "adapter"
META_ITEM = "jlora_meta"
OPT_ITEM = "opt_state"
_META_FIELDS = frozenset(
  {"format", "format_version", "jlora_version", "config", "leaves", "base", "opt_state"}
)
_LEAF_FIELDS = frozenset({"path", "shape", "dtype", "crc32"})
_BASE_FIELDS = frozenset({"path", "kind", "shape", "dtype"})


def _jlora_version() -> str:
  try:
    return _metadata.version("jlora")
  except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
    return "0.0.0"


class RestoredAdapter(NamedTuple):
  """What `AdapterCheckpointManager.restore` returns."""

  lora: dict
  config: LoraConfig
  opt_state: Any
  step: int


# -- metadata ------------------------------------------------------------------


def _crc32(x: Any) -> int | None:
  """CRC32 of an array's bytes; ``None`` for arrays this process cannot read whole."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return zlib.crc32(np.ascontiguousarray(np.asarray(x)).tobytes())


def _check_lora_tree(lora: Any, prefix: paths.Path = ()) -> None:
  if not isinstance(lora, Mapping):
    where = paths.to_str(prefix) or "<root>"
    raise TypeError(
      f"The adapter tree must be a nested dict (from `jlora.init`); found a "
      f"{type(lora).__name__} at {where!r}."
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


def _leaf_records(lora: Any) -> list[dict[str, Any]]:
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
    records.append(
      {
        "path": list(path),
        "shape": list(leaf.shape),
        "dtype": jnp.dtype(leaf.dtype).name,
        "crc32": _crc32(leaf),
      }
    )
  if not records:
    raise ValueError("The adapter tree has no arrays; nothing to save.")
  return records


def _fingerprint(base: Any, lora: Any, config: LoraConfig) -> list[dict[str, Any]]:
  """Path, shape and dtype of each base leaf the adapter touches (checks the adapter fits)."""
  bound, saved = adapters.bind(base, lora, config)
  leaves = dict(paths.leaves_with_paths(base))
  out = [
    {
      "path": list(b.spec.path),
      "kind": "lora",
      "shape": list(b.kernel.shape),
      "dtype": jnp.dtype(b.kernel.dtype).name,
    }
    for b in bound
  ]
  for path in saved:
    leaf = leaves[path]
    out.append(
      {"path": list(path), "kind": "saved", "shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name}
    )
  return sorted(out, key=lambda r: paths.to_str(tuple(r["path"])))


def _opt_records(opt_state: Any) -> list[dict[str, Any]]:
  out = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    if not hasattr(leaf, "shape"):
      raise TypeError(
        f"Optimizer state leaf {jax.tree_util.keystr(kp)} is a {type(leaf).__name__}, not an array; "
        "only array leaves can be checkpointed."
      )
    out.append(
      {
        "path": jax.tree_util.keystr(kp),
        "shape": list(leaf.shape),
        "dtype": jnp.dtype(leaf.dtype).name,
        "crc32": _crc32(leaf),
      }
    )
  return out


def build_metadata(lora: Any, config: LoraConfig, base: Any = None, opt_state: Any = None) -> dict[str, Any]:
  """The JSON saved beside the adapter arrays (see the module docstring)."""
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  return {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "jlora_version": _jlora_version(),
    "config": config.to_dict(),
    "leaves": _leaf_records(lora),
    "base": None if base is None else _fingerprint(base, lora, config),
    "opt_state": None if opt_state is None else _opt_records(opt_state),
  }


def _bad(where: str, msg: str) -> ValueError:
  return ValueError(
    f"Invalid jlora checkpoint metadata in {where}: {msg} The file is corrupted or was not written "
    "by `jlora.save_adapter`/`AdapterCheckpointManager`; restore another step or save it again."
  )


def _is_path(p: Any) -> bool:
  return (
    isinstance(p, list) and bool(p) and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in p)
  )


def _is_shape(s: Any) -> bool:
  return isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)


def _is_dtype(d: Any) -> bool:
  try:
    return isinstance(d, str) and jnp.dtype(d).name == d
  except TypeError:
    return False


def parse_metadata(meta: Any, where: str) -> tuple[dict[str, Any], LoraConfig]:
  """Validates saved metadata; returns it with its `LoraConfig`.

  Raises:
    ValueError: naming ``where`` and the first bad field.
  """
  if not isinstance(meta, Mapping):
    raise _bad(where, f"expected a JSON object, got {type(meta).__name__}.")
  unknown = sorted(set(meta) - _META_FIELDS)
  if unknown:
    raise _bad(where, f"unknown field(s) {unknown}; known fields: {sorted(_META_FIELDS)}.")
  missing = sorted(_META_FIELDS - set(meta))
  if missing:
    raise _bad(where, f"missing field(s) {missing}.")
  if meta["format"] != FORMAT:
    raise _bad(where, f"`format` is {meta['format']!r}, expected {FORMAT!r}.")
  version = meta["format_version"]
  if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
    raise _bad(
      where,
      f"`format_version` is {version!r}; this jlora ({_jlora_version()}) reads versions 1..{FORMAT_VERSION}"
      " (a newer jlora wrote it? upgrade jlora).",
    )
  try:
    config = LoraConfig.from_dict(meta["config"])
  except (TypeError, ValueError) as e:
    raise _bad(where, f"its `config` is not a valid LoraConfig: {e}") from e
  leaves = meta["leaves"]
  if not isinstance(leaves, list) or not leaves:
    raise _bad(where, "`leaves` must be a non-empty list.")
  for i, rec in enumerate(leaves):
    if not isinstance(rec, Mapping) or set(rec) != _LEAF_FIELDS:
      raise _bad(where, f"`leaves[{i}]` must have exactly the fields {sorted(_LEAF_FIELDS)}; got {rec!r}.")
    crc = rec["crc32"]
    crc_ok = crc is None or (isinstance(crc, int) and not isinstance(crc, bool))
    if not (_is_path(rec["path"]) and _is_shape(rec["shape"]) and _is_dtype(rec["dtype"]) and crc_ok):
      raise _bad(where, f"`leaves[{i}]` is malformed: {rec!r}.")
  if meta["base"] is not None:
    if not isinstance(meta["base"], list):
      raise _bad(where, "`base` must be null or a list.")
    for i, rec in enumerate(meta["base"]):
      ok = (
        isinstance(rec, Mapping)
        and set(rec) == _BASE_FIELDS
        and _is_path(rec["path"])
        and rec["kind"] in ("lora", "saved")
        and _is_shape(rec["shape"])
        and _is_dtype(rec["dtype"])
      )
      if not ok:
        raise _bad(where, f"`base[{i}]` is malformed: {rec!r}.")
  if meta["opt_state"] is not None:
    recs = meta["opt_state"]
    if not isinstance(recs, list) or not all(
      isinstance(r, Mapping)
      and set(r) == _LEAF_FIELDS
      and isinstance(r["path"], str)
      and _is_shape(r["shape"])
      and _is_dtype(r["dtype"])
      for r in recs
    ):
      raise _bad(where, "`opt_state` must be null or a list of {path, shape, dtype, crc32} records.")
  return dict(meta), config


def check_base(meta: Mapping[str, Any], base: Any, where: str) -> None:
  """Raises if ``base`` does not match the saved fingerprint, naming the first mismatching path."""
  leaves = dict(paths.leaves_with_paths(base))
  for rec in meta["base"] or ():
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
    if shape != tuple(rec["shape"]) or dtype != rec["dtype"]:
      raise ValueError(
        f"The adapter in {where} does not fit the given base at {name!r}: it was saved for shape "
        f"{tuple(rec['shape'])} and dtype {rec['dtype']}, the base has shape {shape} and dtype {dtype}. "
        "Pass the base tree the adapter was trained on."
      )


# -- restore helpers -------------------------------------------------------------


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_lora(meta: Mapping[str, Any], shardings: Any) -> dict:
  by_path = None
  if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
    by_path = dict(paths.leaves_with_paths(shardings))
  out: dict = {}
  for rec in meta["leaves"]:
    path = tuple(rec["path"])
    if by_path is None:
      sharding = shardings or _default_sharding()
    elif path in by_path:
      sharding = by_path[path]
    else:
      raise ValueError(
        f"`shardings` has no entry for adapter leaf {paths.to_str(path)!r}; pass one "
        "`jax.sharding.Sharding` for all leaves or a tree with the adapter tree's structure."
      )
    if not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(
        f"`shardings` entry for {paths.to_str(path)!r} is a {type(sharding).__name__}, "
        "not a jax.sharding.Sharding."
      )
    paths.nested_set(
      out, path, jax.ShapeDtypeStruct(tuple(rec["shape"]), jnp.dtype(rec["dtype"]), sharding=sharding)
    )
  return out


def _walk_metadata(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(node, Mapping):
    out = {}
    for k, v in node.items():
      out.update(_walk_metadata(v, prefix + (str(k),)))
    return out
  return {prefix: node}


def _check_stored_arrays(stored: Any, meta: Mapping[str, Any], where: str) -> None:
  """Compares orbax's own array metadata with the JSON records before reading any data."""
  tree = getattr(stored, "tree", stored)
  on_disk = _walk_metadata(tree)
  wanted = {tuple(str(k) for k in rec["path"]): rec for rec in meta["leaves"]}
  for key, rec in wanted.items():
    name = paths.to_str(tuple(rec["path"]))
    if key not in on_disk:
      raise ValueError(
        f"Checkpoint {where} is missing the array of adapter leaf {name!r}: the checkpoint is "
        "truncated or corrupted."
      )
    arr = on_disk[key]
    shape, dtype = tuple(getattr(arr, "shape", ()) or ()), getattr(arr, "dtype", None)
    if shape != tuple(rec["shape"]) or dtype is None or jnp.dtype(dtype).name != rec["dtype"]:
      raise ValueError(
        f"Checkpoint {where} is inconsistent at adapter leaf {name!r}: the metadata says shape "
        f"{tuple(rec['shape'])} {rec['dtype']}, the stored array is {shape} {dtype}. "
        "The checkpoint is corrupted."
      )
  extra = sorted(set(on_disk) - set(wanted))
  if extra:
    raise ValueError(
      f"Checkpoint {where} stores arrays the metadata does not list (e.g. {'/'.join(extra[0])!r}); "
      "the checkpoint is corrupted."
    )


def _verify_crc(records: list[dict[str, Any]], leaves: list[Any], names: list[str], where: str) -> None:
  for rec, leaf, name in zip(records, leaves, names):
    if rec["crc32"] is None:
      continue
    got = _crc32(leaf)
    if got is not None and got != rec["crc32"]:
      raise ValueError(
        f"Checkpoint {where}: the data of {name!r} fails its checksum (crc32 {got:#010x}, saved "
        f"{rec['crc32']:#010x}); the checkpoint is corrupted. Restore another step."
      )


def _abstract_opt(template: Any, records: list[dict[str, Any]], where: str) -> Any:
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
    sharding = getattr(leaf, "sharding", None) or _default_sharding()
    out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
  return jax.tree_util.tree_unflatten(treedef, out)


# -- the manager -------------------------------------------------------------------


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in (ADAPTER_ITEM, OPT_ITEM):
    reg.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    reg.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  reg.add(META_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  reg.add(META_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return reg


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
  ignored and cleaned up when the directory is next opened.

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
    read_only: open an existing directory for restoring only.

  Raises:
    ValueError: for invalid arguments.
    FileNotFoundError: if ``read_only`` and the directory does not exist.

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
    if config is not None and not isinstance(config, LoraConfig):
      raise TypeError(f"`config` must be a jlora.LoraConfig or None; got {type(config).__name__}.")
    if max_to_keep is not None and (
      isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
      raise ValueError(f"`max_to_keep` must be None or a positive integer; got {max_to_keep!r}.")
    if (
      isinstance(save_interval_steps, bool)
      or not isinstance(save_interval_steps, int)
      or save_interval_steps < 1
    ):
      raise ValueError(f"`save_interval_steps` must be a positive integer; got {save_interval_steps!r}.")
    self._directory = epath.Path(os.fspath(directory)).absolute()
    if read_only and not self._directory.is_dir():
      raise FileNotFoundError(f"No adapter checkpoint directory at {os.fspath(self._directory)!r}.")
    self._config = config
    self._base = base
    # `read_only` is enforced here rather than with orbax's option of that name,
    # which logs warnings on every open; a reading manager writes nothing.
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep else None,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      save_root_metadata=not read_only,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options, handler_registry=_registry())

  # -- context manager / lifecycle
  def __enter__(self) -> AdapterCheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @property
  def directory(self) -> str:
    return os.fspath(self._directory)

  def all_steps(self) -> list[int]:
    """The complete steps on disk, ascending (half-written ones are not listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step, or ``None``."""
    return self._manager.latest_step()

  def wait_until_finished(self) -> None:
    """Blocks until every asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.close()

  # -- save / restore
  def save(
    self, step: int, lora: Any, *, opt_state: Any = None, base: Any = None, force: bool = False
  ) -> bool:
    """Saves ``lora`` (and ``opt_state``) as ``step``.

    Args:
      step: the training step, a non-negative int larger than any saved one.
      lora: the adapter tree.
      opt_state: optionally the optimizer state (any pytree of arrays, e.g.
        an optax state), to resume training exactly.
      base: the base tree, for the fingerprint (default: the manager's).
      force: save even if ``step`` is not a multiple of
        ``save_interval_steps``.

    Returns:
      Whether a checkpoint was written (``False`` between intervals).

    Raises:
      ValueError: if the manager has no config, the adapter does not fit
        ``base`` (naming the path), or ``step`` already exists.
    """
    if self._read_only:
      raise ValueError("This AdapterCheckpointManager was opened with `read_only=True`; it cannot save.")
    if self._config is None:
      raise ValueError(
        "This AdapterCheckpointManager has no `config`; pass "
        "`AdapterCheckpointManager(directory, config)` to save."
      )
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"`step` must be a non-negative int; got {step!r}.")
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():
      raise ValueError(
        f"Step {step} already exists in {self.directory!r}; steps are never overwritten. "
        "Save under a new step number."
      )
    meta = build_metadata(lora, self._config, base if base is not None else self._base, opt_state)
    items = {ADAPTER_ITEM: ocp.args.StandardSave(lora), META_ITEM: ocp.args.JsonSave(meta)}
    if opt_state is not None:
      items[OPT_ITEM] = ocp.args.StandardSave(opt_state)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def _read_meta(self, step: int, where: str) -> tuple[dict[str, Any], LoraConfig]:
    try:
      raw = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
      meta = raw[META_ITEM]
    except Exception as e:  # orbax/json raise many types on unreadable files
      raise ValueError(
        f"Cannot read the jlora metadata of {where} ({type(e).__name__}: {e}). The checkpoint is "
        "truncated or corrupted, or is not a jlora adapter checkpoint; restore another step."
      ) from e
    return parse_metadata(meta, where)

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
      ValueError: if the step is missing, truncated or corrupted, does not
        fit ``base``, or has no optimizer state when a template is given.
        Nothing is returned partially.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(
          f"No complete adapter checkpoint in {self.directory!r} (half-written steps are ignored)."
        )
    elif step not in self._manager.all_steps():
      raise ValueError(f"Step {step} is not in {self.directory!r}; complete steps: {self.all_steps()}.")
    where = f"step {step} of {self.directory!r}"
    meta, config = self._read_meta(step, where)
    base = base if base is not None else self._base
    if base is not None:
      check_base(meta, base, where)
    if opt_state is not None and meta["opt_state"] is None:
      raise ValueError(f"An `opt_state` template was given but {where} was saved without an optimizer state.")
    try:
      stored = self._manager.item_metadata(step)[ADAPTER_ITEM]
    except Exception as e:
      raise ValueError(
        f"Cannot read the array metadata of {where} ({type(e).__name__}: {e}); the checkpoint is "
        "truncated or corrupted."
      ) from e
    if stored is None:
      raise ValueError(f"{where} has no adapter arrays; the checkpoint is truncated or corrupted.")
    _check_stored_arrays(stored, meta, where)
    items = {ADAPTER_ITEM: ocp.args.StandardRestore(_abstract_lora(meta, shardings))}
    if opt_state is not None:
      items[OPT_ITEM] = ocp.args.StandardRestore(_abstract_opt(opt_state, meta["opt_state"], where))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise ValueError(
        f"Cannot read the arrays of {where} ({type(e).__name__}: {e}); the checkpoint is truncated "
        "or corrupted. Restore another step."
      ) from e
    lora = restored[ADAPTER_ITEM]
    lora_leaves = dict(paths.leaves_with_paths(lora))
    recs = meta["leaves"]
    _verify_crc(
      recs,
      [lora_leaves[tuple(r["path"])] for r in recs],
      [paths.to_str(tuple(r["path"])) for r in recs],
      where,
    )
    opt = None
    if opt_state is not None:
      opt = restored[OPT_ITEM]
      opt_recs = meta["opt_state"]
      _verify_crc(opt_recs, jax.tree_util.tree_leaves(opt), [r["path"] for r in opt_recs], where)
    if base is not None:
      adapters.bind(base, lora, config)
    return RestoredAdapter(lora=lora, config=config, opt_state=opt, step=int(step))


# -- one-call save / load --------------------------------------------------------------


def save_adapter(directory: str | os.PathLike, lora: Any, config: LoraConfig, *, base: Any = None) -> None:
  """Saves an adapter tree and its config to ``directory`` (blocking).

  ``directory`` holds one adapter: saving again replaces it atomically (the
  new one is written as a new step and the old one is removed only after the
  new one is complete), so a crash never leaves it without a valid adapter.
  It is an ordinary `AdapterCheckpointManager` directory.

  Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``lora_A``
  ``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``.

  Args:
    directory: where to save; created if missing.
    lora: the adapter tree.
    config: the config it was made with.
    base: the base tree; recommended: the adapter is checked against it and
      its fingerprint (paths, shapes, dtypes of the adapted kernels) is saved
      so that `load_adapter` can refuse a base that does not fit.

  Raises:
    ValueError: if the adapter does not fit ``base`` (naming the path).

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
  with AdapterCheckpointManager(directory, config, base=base, max_to_keep=1, async_save=False) as mngr:
    latest = mngr.latest_step()
    mngr.save(0 if latest is None else latest + 1, lora, force=True)


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
  """
  with AdapterCheckpointManager(directory, read_only=True) as mngr:
    restored = mngr.restore(step, base=base, shardings=shardings)
  return restored.lora, restored.config


# -- merged export -----------------------------------------------------------------------


def save_merged(
  directory: str | os.PathLike,
  tree: Any,
  lora: Any,
  config: LoraConfig,
  *,
  format: Literal["orbax", "safetensors"] = "orbax",  # noqa: A002 - mirrors the file format's name
) -> str:
  """Writes ``jlora.merge(tree, lora, config)`` as an ordinary checkpoint, to serve without jlora.

  ``"orbax"`` writes a standard orbax checkpoint of the merged tree to
  ``directory`` (restore it with ``ocp.StandardCheckpointer().restore``);
  ``"safetensors"`` writes ``directory/model.safetensors`` with one tensor
  per leaf, named by its path joined with ``/`` (Flax layout: kernels are
  ``(fan_in..., fan_out...)``). Both are written to a temporary name first
  and renamed into place.

  Args:
    directory: the output; must not exist yet (orbax) or must not hold a
      ``model.safetensors`` yet (safetensors).
    tree: the base tree.
    lora: the adapter tree.
    config: its config.
    format: ``"orbax"`` or ``"safetensors"``.

  Returns:
    The path written.

  Raises:
    FileExistsError: if the output exists.
    ValueError: for an unknown ``format`` or an adapter that does not fit.
  """
  if format not in ("orbax", "safetensors"):
    raise ValueError(f"`format` must be 'orbax' or 'safetensors'; got {format!r}.")
  merged = merge(tree, lora, config)
  directory = os.path.abspath(os.fspath(directory))
  if format == "orbax":
    if os.path.exists(directory):
      raise FileExistsError(f"{directory!r} already exists; save the merged model to a new directory.")
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(directory, merged)
    return directory
  import safetensors.numpy  # noqa: PLC0415

  out = os.path.join(directory, "model.safetensors")
  if os.path.exists(out):
    raise FileExistsError(f"{out!r} already exists; save the merged model to a new directory.")
  tensors = {}
  for path, leaf in paths.leaves_with_paths(merged):
    name = paths.to_str(path)
    if name in tensors:
      raise ValueError(f"Two leaves of the merged tree are both named {name!r} in safetensors.")
    tensors[name] = np.ascontiguousarray(np.asarray(leaf))
  os.makedirs(directory, exist_ok=True)
  tmp = out + f".tmp-{os.getpid()}"
  safetensors.numpy.save_file(tensors, tmp, metadata={"format": "flax", "producer": "jlora"})
  os.replace(tmp, out)
  return out
