"""`import_peft`: a PEFT LoRA adapter directory as a jlora adapter tree, checked before it is read.

Phases: the config (`peft_config.read_peft_config`), the tensor index (`_open_weights`),
each weight's layout (`_import_layouts`), the PEFT modules of each weight
(`_find_modules`), their shapes and ranks (`_check_module`), the jlora config
(`_import_config`), and only then the tensors (`_read_factors`). See
`jlora._src.io.peft.common` for shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from jlora._src.adapters import adapters, dora
from jlora._src.core import layouts, paths, targets
from jlora._src.core.config import LoraConfig, freeze_layout_pattern, longest_match
from jlora._src.io import processes, storage
from jlora._src.io.peft import common
from jlora._src.io.peft import config as peft_config
from jlora._src.io.peft import conv as peft_conv
from jlora._src.io.peft import experts as peft_experts
from jlora._src.io.peft.common import CONFIG_NAME, WEIGHTS_NAME
from jlora._src.io.peft.names import (
  PREFIX,
  Keys,
  NameMap,
  PeftParameter,
  default_name_map,
  hf_tree_map,
  lora_keys,
  magnitude_key,
  name_str,
)

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _open_weights(
  directory: epath.Path, files: contextlib.ExitStack
) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
  import safetensors  # noqa: PLC0415

  where, path = storage.show(directory), storage.show(directory / WEIGHTS_NAME)
  if not storage.is_file(directory / WEIGHTS_NAME):
    if storage.is_file(directory / "adapter_model.bin"):
      raise ValueError(
        f"{where!r} holds only a pickled adapter_model.bin; jlora never unpickles files. Re-save "
        "the adapter with PEFT's `save_pretrained(..., safe_serialization=True)`."
      )
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {where!r}.")
  try:
    handle = safetensors.safe_open(files.enter_context(storage.local_copy(directory / WEIGHTS_NAME)), "numpy")
    info = {}
    for key in handle.keys():
      sl = handle.get_slice(key)
      info[key] = (tuple(sl.get_shape()), sl.get_dtype())
  except Exception as e:  # safetensors raises SafetensorError and others on bad headers
    raise ValueError(
      f"{path!r} is not a readable safetensors file ({e}); it is truncated or corrupted."
    ) from e
  return handle, info


@dataclasses.dataclass(frozen=True)
class _Match:
  """A weight of the tree and the PEFT modules of the file that adapt it."""

  cand: targets.Candidate
  layout: layouts.Layout
  # (entry of the stacked axis, module name or expert parameter), in the file
  names: tuple[tuple[int | None, str | PeftParameter], ...]
  embedding: bool
  rank: int
  alpha: float
  conv: bool = False  # PEFT ConvNd adapters (`peft_conv`)

  @property
  def experts(self) -> bool:
    return isinstance(self.names[0][1], PeftParameter)

  @property
  def layer_axis(self) -> bool:
    """Whether the first stacked axis is cut to the entries in the file (`layers_to_transform`)."""
    if self.experts:
      return len(self.layout.stacked_axes) == 2
    return bool(self.layout.stacked_axes) and targets.layer_index(self.cand.module, None) is None


@dataclasses.dataclass(frozen=True)
class _Unknown:
  """Why a weight has no layout; ``used``: the model uses it in a way that gives it none (a grouped
  convolution's kernel), so the file's tensors cannot stand for its layout either."""

  why: str
  used: bool


def _import_layouts(
  tree: Any,
  cands: list[targets.Candidate],
  layout_pattern: Any,
  read: Callable[[], tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, str]]],
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, _Unknown]]:
  """Each weight's layout: ``layout_pattern``, else the model's use (``read``: the layouts, and why the
  model's use gives some weights none), else the default (`layouts.default_layout`); and, for the
  weights with none, why (an error only where the file adapts them)."""
  try:
    overrides = freeze_layout_pattern(layout_pattern or ())
  except (TypeError, ValueError) as e:
    raise ValueError(f"`layout_pattern` is invalid: {e}") from e
  inferred, refused = read()
  out, unknown = {}, {}
  for cand in cands:
    hit = longest_match(overrides, cand.names)
    layout = (
      layouts.from_pattern(hit[1], cand.shape, paths.to_str(cand.path)) if hit else inferred.get(cand.path)
    )
    if layout is None and cand.path in refused:
      unknown[cand.path] = _Unknown(refused[cand.path], used=True)
      continue
    if layout is None:
      try:
        layout = layouts.default_layout(cand.module, cand.shape, paths.to_str(cand.path))
      except ValueError as e:
        unknown[cand.path] = _Unknown(str(e), used=False)
        continue
    out[cand.path] = layout
  return out, unknown


def _find_modules(
  cands: list[targets.Candidate],
  lays: tuple[Mapping[paths.Path, layouts.Layout], Mapping[paths.Path, _Unknown]],
  name_map: NameMap,
  info: Mapping[str, Any],
  *,
  keys: Keys,
  chosen: Callable[[str], bool],
  weights_path: str,
) -> tuple[list[tuple[targets.Candidate, layouts.Layout, list[tuple[int | None, Any]]]], str | None]:
  """The weights the file adapts, with their module names (those the config selects, ``chosen``; the
  tensors of others are left unclaimed); and the first weight no name map knows."""
  known, unknown = lays
  found, unmapped = [], None
  for cand in cands:
    layout = known.get(cand.path) or _file_conv_layout(cand, name_map, info, keys, unknown[cand.path])
    if layout is None:
      continue
    names = common.safe_module_names(cand, layout, name_map)
    if not names:
      unmapped = unmapped or paths.to_str(cand.path)
      continue
    embedding = common.is_embedding(cand.path)
    hits = []
    for index, name in names:
      if not keys.has(name) or (isinstance(name, str) and not chosen(name)):
        continue
      key_a, key_b = keys(name, embedding)
      if (key_a in info) != (key_b in info):
        has, lacks = (key_a, key_b) if key_a in info else (key_b, key_a)
        raise ValueError(
          f"{weights_path!r} has {has!r} but not {lacks!r}: the adapter of {name_str(name)!r} is "
          "incomplete (the file is truncated or was edited)."
        )
      if key_a in info:
        hits.append((index, name))
    if hits:
      found.append((cand, layout, hits))
  return found, unmapped


def _file_conv_layout(
  cand: targets.Candidate, name_map: NameMap, info: Mapping[str, Any], keys: Keys, unknown: _Unknown
) -> layouts.Layout | None:
  """The layout of a kernel of unknown layout that the file adapts: Flax's conv layout when the file
  holds PEFT ConvNd adapters for it (a ``lora_A.weight`` of 3+ dims; `peft_conv`) and the model's use
  does not contradict it, ``None`` when the file does not adapt it.

  Raises:
    ValueError: if the file adapts it with other tensors, or the model uses it in a way that gives it
      no layout (``unknown.why``: the layout's error).
  """
  embedding = common.is_embedding(cand.path)
  for guess in common.name_guesses(cand):
    for _, name in common.safe_module_names(cand, guess, name_map):
      if not (keys.has(name) and keys(name, embedding)[0] in info):
        continue
      conv = isinstance(name, str) and not embedding and len(info[keys(name)[0]][0]) > 2
      if conv and not unknown.used:
        return peft_conv.flax_layout(len(cand.shape), stacked=guess is not None)
      raise ValueError(
        f"PEFT module {name_str(name)!r} adapts a kernel whose layout jlora does not know: {unknown.why}"
      )
  return None


def _conv_module(
  cand: targets.Candidate, layout: layouts.Layout, key: str, shape: tuple, weights_path: str
) -> bool:
  """Whether a kernel's PEFT module is a ConvNd adapter: the model uses the kernel in a convolution,
  or the file's ``lora_A.weight`` has 3+ dims (then the kernel must be a Flax conv kernel)."""
  if len(shape) <= 2 and not peft_conv.is_conv(layout):
    return False
  where = paths.to_str(cand.path)
  if layout.ops and not peft_conv.is_conv(layout):
    raise ValueError(
      f"{weights_path!r}: tensor {key!r} has shape {tuple(shape)}, a PEFT ConvNd adapter, but the model uses "
      f"kernel {where!r} (shape {cand.shape}) in {sorted(layout.ops)}, not in a convolution. Wrong base "
      "model or `name_map`?"
    )
  try:
    peft_conv.check_layout(layout, where)
  except ValueError as e:
    raise ValueError(
      f"{weights_path!r}: tensor {key!r} has shape {tuple(shape)}, a PEFT ConvNd adapter: {e}"
    ) from None
  return True


def _check_module(
  cand: targets.Candidate,
  *,
  layout: layouts.Layout,
  hits: list[tuple[int | None, Any]],
  info: Mapping[str, Any],
  keys: Keys,
  pcfg: Mapping[str, Any],
  weights_path: str,
) -> _Match:
  """Checks the shapes, dtypes and rank of one weight's PEFT tensors against the weight."""
  embedding = common.is_embedding(cand.path)
  in_shape = tuple(cand.shape[i] for i in layout.in_axes)
  out_shape = tuple(cand.shape[i] for i in layout.out_axes)
  if embedding and (len(in_shape) != 1 or len(out_shape) != 1):
    raise ValueError(f"Embedding {paths.to_str(cand.path)!r} must be 2-D to take PEFT's embedding LoRA.")
  where = paths.to_str(cand.path)
  rank = None
  first = hits[0][1]
  conv = (
    not embedding
    and not isinstance(first, PeftParameter)
    and _conv_module(cand, layout, keys(first)[0], info[keys(first)[0]][0], weights_path)
  )
  entry = peft_conv.entry_shape(layout, cand.shape)
  for _, name in hits:
    ks = keys(name, embedding)
    (sa, da), (sb, db) = info[ks[0]], info[ks[1]]
    if isinstance(name, PeftParameter):
      experts = cand.shape[layout.stacked_axes[-1]] if layout.stacked_axes else 1
      if rank is None and len(sa) == 2 and sa[0] % experts == 0:
        rank = sa[0] // experts
      want = peft_experts.peft_shapes(layout, cand.shape, name, rank or 0, where)
      form = "PEFT's target_parameters: lora_A (E*r, in), lora_B (out, r*E)"
    elif conv:
      rank = rank if rank is not None else (sa[0] if sa else None)
      want = peft_conv.peft_shapes(entry, rank)
      form = "PEFT's ConvNd: lora_A (r, in, *kernel_size), lora_B (out, r, 1, ...)"
    else:
      rank = rank if rank is not None else (sa[0] if len(sa) == 2 else None)
      want = ((rank, math.prod(in_shape)), (math.prod(out_shape), rank))
      form = "PEFT: lora_A (r, in), lora_B (out, r)"
    for key, got, w in zip(ks, (sa, sb), want):
      if rank is None or tuple(got) != w:
        raise ValueError(
          f"{weights_path!r}: tensor {key!r} has shape {tuple(got)}, but kernel {where!r} of shape "
          f"{cand.shape} (layout {layout}: fan-in {in_shape}, fan-out {out_shape}) needs {w} ({form}). "
          "Wrong base model or `name_map`?"
        )
    if da != db:
      raise ValueError(f"{weights_path!r}: {ks[0]!r} is {da} but {ks[1]!r} is {db}; they must match.")
  torch_name = name_str(hits[0][1])
  cfg_rank = peft_config.pattern_value(pcfg.get("rank_pattern") or {}, torch_name, pcfg.get("r", 8))
  if rank != cfg_rank:
    raise ValueError(
      f"{weights_path!r}: the adapter of {torch_name!r} has rank {rank}, but adapter_config.json gives "
      f"rank {cfg_rank} for it (`r`/`rank_pattern`); the files do not belong together."
    )
  alpha = peft_config.pattern_value(pcfg.get("alpha_pattern") or {}, torch_name, pcfg.get("lora_alpha", 8))
  return _Match(cand, layout, tuple(hits), embedding, rank, alpha, conv)


def _saved_leaves(
  tree: Any, name_map: NameMap, info: Mapping[str, Any], claimed: set[str], weights_path: str
) -> dict[paths.Path, str]:
  """`modules_to_save` leaves: any leaf whose PyTorch parameter is in the file."""
  saved = {}
  for path, leaf in targets.param_leaves(tree):
    leaf_name = str(path[-1])
    if leaf_name not in common.SAVED_LEAVES:
      continue
    try:
      key = f"{PREFIX}{name_map(path, None)}.{common.SAVED_LEAVES[leaf_name][0]}"
    except (ValueError, LookupError):  # a name map that does not know this leaf
      continue
    if key not in info or key in claimed:
      continue
    shape = tuple(getattr(leaf, "shape", ()))
    want = shape[::-1] if common.SAVED_LEAVES[leaf_name][1] else shape
    if info[key][0] != want:
      raise ValueError(
        f"{weights_path!r}: tensor {key!r} has shape {info[key][0]}, but leaf {paths.to_str(path)!r} "
        f"(shape {shape}) needs {want}."
      )
    saved[path] = key
  return saved


def _bias_leaves(
  tree: Any, pcfg: Mapping[str, Any], name_map: NameMap, info: Mapping[str, Any], weights_path: str
) -> dict[paths.Path, str]:
  """The trained biases of a file with ``bias`` "all" or "lora_only": bias leaf -> its key
  (``<module>.base_layer.bias`` for an adapted module, ``<module>.bias`` otherwise)."""
  if pcfg.get("bias", "none") == "none":
    return {}
  out = {}
  for path, leaf in targets.param_leaves(tree):
    if str(path[-1]) != "bias":
      continue
    try:
      name = name_map(path, None)
    except (ValueError, LookupError):  # a name map that does not know this leaf
      continue
    for key in (f"{PREFIX}{name}.base_layer.bias", f"{PREFIX}{name}.bias"):
      if key in info:
        if info[key][0] != tuple(leaf.shape):
          raise ValueError(
            f"{weights_path!r}: tensor {key!r} has shape {info[key][0]}, but bias {paths.to_str(path)!r} "
            f"has shape {tuple(leaf.shape)}."
          )
        out[path] = key
        break
  return out


def _selection(
  pcfg: Mapping[str, Any],
  cands: list[targets.Candidate],
  lays: Mapping[paths.Path, layouts.Layout],
  name_map: NameMap,
  *,
  info: Mapping[str, Any],
  where: str,
) -> Callable[[str], bool]:
  """Whether PEFT adapts a module, by the file's config (`common.PeftTargets`; ``"all-linear"``: the
  kernels other than the output head and convolutions, `_linear_kernel`). Without `target_modules` or
  `target_parameters` (PEFT then picks by model type, which the tree does not tell) every module.

  Raises:
    ValueError: if `target_modules` select no module of ``tree``, or are a regex with
      `layers_to_transform` (PEFT refuses both).
  """
  sel = common.PeftTargets.of(pcfg)
  if isinstance(sel.target_modules, str) and not sel.all_linear and sel.layers_to_transform is not None:
    raise ValueError(
      f"{where!r}: `layers_to_transform`={pcfg['layers_to_transform']!r} with a regex `target_modules` "
      f"({sel.target_modules!r}): PEFT refuses this config. Put the layer in the regex, or list the modules."
    )
  if sel.target_modules is None:
    return lambda name: pcfg.get("target_parameters") is None
  modules = sorted(
    {
      n
      for c in cands
      for lay in ([lays[c.path]] if c.path in lays else common.name_guesses(c))
      for _, n in common.safe_module_names(c, lay, name_map)
      if isinstance(n, str) and (not sel.all_linear or _linear_kernel(c, n, lays, info))
    }
  )
  sel = sel.expand(modules)
  if sel.target_modules and not any(sel.selects(n) for n in modules) and not pcfg.get("target_parameters"):
    raise ValueError(
      f"{where!r}: `target_modules`={pcfg['target_modules']!r} select no module of the base model "
      f"(`exclude_modules`={sel.exclude_modules!r}, `layers_to_transform`={sel.layers_to_transform!r}); "
      "PEFT refuses this adapter ('Target modules ... not found in the base model'). Wrong base model or "
      f"`name_map`? Some module names of the tree: {modules[:8]}."
    )
  return sel.selects


def _linear_kernel(
  cand: targets.Candidate, name: str, lays: Mapping[paths.Path, layouts.Layout], info: Mapping[str, Any]
) -> bool:
  """For ``"all-linear"`` (PEFT's Linear and Conv1D modules): a kernel other than the output head that
  the model does not use in a convolution; one of unknown layout (a Flax conv kernel or a DenseGeneral's,
  which shapes cannot tell apart) only where the file adapts it as a Linear (a 2-D ``lora_A``)."""
  if cand.leaf_name != "kernel" or targets.is_head(cand):
    return False
  if cand.path in lays:
    return not peft_conv.is_conv(lays[cand.path])
  key = lora_keys(name, False)[0]
  return key in info and len(info[key][0]) == 2


def _key_module(key: str) -> str | None:
  """The module of a PEFT LoRA tensor key (``None`` for other keys)."""
  found = re.fullmatch(rf"{re.escape(PREFIX)}(.+?)(?:\.base_layer)*\.(?:lora_.*|base_layer\.bias)", key)
  return None if found is None else found.group(1)


def _drop_ignored(
  unclaimed: set[str], chosen: Callable[[str], bool], pcfg: Mapping[str, Any], where: str
) -> set:
  """Warns of the LoRA tensors of modules the file's config does not select, which PEFT ignores when it
  loads the file; the other unclaimed keys."""
  ignored = sorted(k for k in unclaimed if (m := _key_module(k)) is not None and not chosen(m))
  if ignored:
    fields = ", ".join(
      f"`{f}`={pcfg.get(f)!r}" for f in ("target_modules", "exclude_modules", "layers_to_transform")
    )
    modules = sorted({_key_module(k) for k in ignored})
    warnings.warn(
      f"{where!r} holds tensors of module(s) {modules[:4]}"
      + (f" (and {len(modules) - 4} more)" if len(modules) > 4 else "")
      + f" that adapter_config.json does not select ({fields}): "
      "PEFT ignores them when it loads the adapter, and so does jlora. If they were meant to be adapted, "
      "fix the config's `target_modules`.",
      UserWarning,
      stacklevel=3,
    )
  return unclaimed - set(ignored)


def _check_peft_targets(
  pcfg: Mapping[str, Any], matches: list[_Match], known: set, chosen: Callable[[str], bool], where: str
) -> None:
  """Every module PEFT's ``target_modules`` selects, and every parameter its ``target_parameters``
  selects, must have tensors in the file."""
  present = {name_str(name) for m in matches for _, name in m.names}
  modules = {n for n in known if isinstance(n, str)} - present
  params = {n.name for n in known if isinstance(n, PeftParameter)} - present
  missing = sorted(
    [n for n in modules if pcfg.get("target_modules") and chosen(n)]
    + [n for n in params if peft_config.parameter_selected(pcfg.get("target_parameters"), n)]
  )
  if missing:
    raise ValueError(
      f"{where!r}: `target_modules`={pcfg.get('target_modules')!r} / `target_parameters`="
      f"{pcfg.get('target_parameters')!r} select {missing[0]!r}"
      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
      + f", but {WEIGHTS_NAME} has no tensors for it: the adapter is incomplete."
    )


def _import_config(
  pcfg: Mapping[str, Any],
  *,
  tree: Any,
  matches: list[_Match],
  cands: list[targets.Candidate],
  saved_modules: list[str],
  layout_pattern: Any,
  dtype: str | None,
  where: str,
) -> LoraConfig:
  """The jlora config that reproduces the file: the file's `target_modules` (or the adapted weights by
  exact path, `_as_written`), ranks and alphas by exact path."""
  per_module: dict[str, int] = {}
  for c in cands:
    per_module[c.module] = per_module.get(c.module, 0) + 1
  r, alpha = pcfg.get("r", 8), pcfg.get("lora_alpha", 8)
  names = [m.cand.module if per_module[m.cand.module] == 1 else m.cand.param for m in matches]
  layer_sets = {tuple(i for i, _ in m.names) for m in matches if m.layer_axis}
  if len(layer_sets) > 1:
    raise ValueError(
      f"Stacked kernels are adapted on different layer sets {sorted(layer_sets)}; a jlora config "
      "has one `layers_to_transform`."
    )
  ltt = None
  if layer_sets:
    (layer_set,) = layer_sets
    sizes = {m.cand.shape[m.layout.stacked_axes[0]] for m in matches if m.layer_axis}
    if layer_set != tuple(range(min(sizes))) or len(sizes) > 1:
      ltt = layer_set
  try:
    exact = LoraConfig(
      r=r,
      lora_alpha=alpha,
      lora_dropout=pcfg.get("lora_dropout", 0.0),
      use_rslora=pcfg.get("use_rslora", False),
      init_lora_weights=pcfg.get("init_lora_weights", True),
      target_modules=tuple(f"^{re.escape(n)}$"[1:-1] for n in names),
      layers_to_transform=ltt,
      rank_pattern={re.escape(n): m.rank for n, m in zip(names, matches) if m.rank != r},
      alpha_pattern={re.escape(n): m.alpha for n, m in zip(names, matches) if m.alpha != alpha},
      modules_to_save=tuple(dict.fromkeys(saved_modules)) or None,
      layout_pattern=layout_pattern or (),
      dtype=dtype,
      bias=pcfg.get("bias", "none"),
      use_dora=pcfg.get("use_dora", False),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where!r} has an invalid value: {e}") from e
  return _as_written(pcfg, exact, tree, matches)


def _as_written(pcfg: Mapping[str, Any], exact: LoraConfig, tree: Any, matches: list[_Match]) -> LoraConfig:
  """``exact`` with the file's own `target_modules` (and `exclude_modules`, `layers_to_transform`,
  `layers_pattern`) where jlora's matching of them adapts exactly the imported weights, so that
  `export_peft` writes them back as PEFT wrote them; else ``exact`` (adapted weights by path)."""
  target, layers = pcfg.get("target_modules"), pcfg.get("layers_to_transform")
  if not target:
    return exact
  stacked = {m.cand.path for m in matches if m.layer_axis}
  fields = dict(
    target_modules=target if isinstance(target, str) else tuple(target),
    exclude_modules=pcfg.get("exclude_modules") or None,
  )
  if layers is not None and not stacked:
    pattern = pcfg.get("layers_pattern") or None
    fields.update(
      layers_to_transform=[layers] if isinstance(layers, int) else layers,
      layers_pattern=[pattern] if isinstance(pattern, str) else pattern,
    )
  try:
    written = dataclasses.replace(exact, **fields)
    chosen = targets.match_targets(tree, written)
  except (TypeError, ValueError):  # fields jlora reads otherwise (PEFT's dotted names, regexes)
    return exact
  kept = {
    c.path
    for c in chosen
    if written.layers_to_transform is None
    or c.path in stacked
    or targets.layer_index(c.module, written.layers_pattern) in written.layers_to_transform
  }
  return written if kept == {m.cand.path for m in matches} else exact


def _read_factors(handle: Any, m: _Match, keys: Keys, weights_path: str) -> tuple[np.ndarray, np.ndarray]:
  """The canonical factors of one weight, read from the file (zeros for missing fused parts)."""

  def get(key: str) -> np.ndarray:
    try:
      return handle.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for a truncated file
      raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e

  in_shape = tuple(m.cand.shape[i] for i in m.layout.in_axes)
  out_shape = tuple(m.cand.shape[i] for i in m.layout.out_axes)
  parts = {}
  for index, name in m.names:
    key_a, key_b = keys(name, m.embedding)
    if m.experts:
      experts, where = m.cand.shape[m.layout.stacked_axes[-1]], paths.to_str(m.cand.path)
      parts[index] = peft_experts.from_peft(
        get(key_a), get(key_b), m.layout, name, experts=experts, where=where
      )
    elif m.conv:
      parts[index] = peft_conv.from_peft(get(key_a), get(key_b))
    else:
      parts[index] = (get(key_a).T.reshape(in_shape + (m.rank,)), get(key_b).T.reshape((m.rank,) + out_shape))
  if not m.layout.stacked_axes or (m.experts and not m.layer_axis):
    return parts[None]
  ids = [i for i, _ in m.names] if m.layer_axis else range(m.cand.shape[m.layout.stacked_axes[0]])
  zero = tuple(np.zeros_like(x) for x in next(iter(parts.values())))
  a = np.stack([parts.get(i, zero)[0] for i in ids])
  b = np.stack([parts.get(i, zero)[1] for i in ids])
  return a, b


def _read_magnitude(
  handle: Any, m: _Match, spec: adapters.AdapterSpec, kernel: Any, weights_path: str
) -> Any:
  """DoRA's magnitude of one weight in the kernel's axis order, read from the file; the parts of a
  fused weight the file does not adapt get the norms of their kernel (a DoRA no-op, as their B is 0)."""
  out_shape = tuple(m.cand.shape[i] for i in m.layout.out_axes)
  parts = {}
  for index, name in m.names:
    key = magnitude_key(name)
    try:
      arr = handle.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for a missing or truncated tensor
      raise ValueError(
        f"{weights_path!r}: cannot read DoRA's {key!r} ({e}); adapter_config.json says `use_dora` but "
        "the file lacks the magnitude vector of this module."
      ) from e
    entry = peft_conv.entry_shape(m.layout, m.cand.shape)
    if arr.size != math.prod(out_shape) or (m.conv and arr.shape != peft_conv.magnitude_shape(entry)):
      raise ValueError(
        f"{weights_path!r}: {key!r} has shape {tuple(arr.shape)}, but kernel {paths.to_str(m.cand.path)!r} "
        f"has {math.prod(out_shape)} output features ({out_shape})"
        + (f"; PEFT's ConvNd magnitude is {peft_conv.magnitude_shape(entry)}." if m.conv else ".")
      )
    parts[index] = jnp.asarray(arr.reshape(out_shape))
  if not m.layout.stacked_axes:
    return adapters.magnitude_from_canonical(spec, parts[None])
  ids = [i for i, _ in m.names] if m.layer_axis else list(range(m.cand.shape[m.layout.stacked_axes[0]]))
  if any(i not in parts for i in ids):
    zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    kernel_view = adapters.view(spec, kernel, zeros(spec.a_shape), zeros(spec.b_shape))
    norms = adapters.canonical_magnitude(spec, dora.initial_magnitude(kernel_view, None))
    parts = {i: parts.get(i, norms[i]) for i in ids}
  dtype = next(iter(parts.values())).dtype
  return adapters.magnitude_from_canonical(spec, jnp.stack([parts[i].astype(dtype) for i in ids]))


def import_peft(
  directory: str | os.PathLike,
  tree: Any,
  *,
  name_map: NameMap | None = None,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
  layout_pattern: Mapping[str, Any] | None = None,
) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter directory into a jlora adapter tree for ``tree``.

  For every adaptable weight of ``tree`` the PEFT module names are computed
  with ``name_map`` (one per entry of a stacked axis) and looked up among the
  safetensors keys; every key must be claimed by a weight (or a
  `modules_to_save` leaf) and have the shape the weight implies
  (``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)``, ``in``/``out``
  the weight's fan-in/fan-out axes flattened row-major; for PEFT's ConvNd
  adapters, whose ``lora_A.weight`` has 3+ dims, ``(r, in, *k)`` and ``(out, r,
  1, ...)`` on a Flax conv kernel ``(*k, in, out)``, with or without
  ``apply_fn``, read as jlora's ``(*k, in, r)`` and ``(r, out)``; DoRA's
  magnitude ``(1, out, 1, ...)``), and every module the
  file's ``target_modules`` selects must have tensors.

  Only the modules the file's own ``adapter_config.json`` selects are adapted,
  as PEFT selects them (`check_target_module_exists`): ``target_modules`` as a
  list of names or dotted suffixes, filtered by ``layers_to_transform`` /
  ``layers_pattern``; as a full-match regex (which ``layers_to_transform`` may
  not accompany); or ``"all-linear"`` (every kernel but the output head and
  convolutions); less ``exclude_modules`` and ``modules_to_save``. PEFT
  ignores the tensors of other modules when it loads the file; so does jlora,
  with a ``UserWarning`` naming them (not an error: PEFT loads such files, and
  jlora must read them to the model PEFT builds; not silence: trained tensors
  that are dropped point at a config that does not say what was trained).
  ``target_modules`` that select no module of ``tree`` are an error, as in
  PEFT. All tensors are checked
  before any is read: the result is complete or an error is raised. Parts of a
  fused kernel that PEFT did not adapt (``v_proj`` without ``k_proj`` on
  gemma's ``kv_einsum``) get zero factors, which compute what PEFT computes.

  The returned config keeps the file's ``target_modules`` as written
  (``["q_proj", "v_proj"]``; with its ``exclude_modules`` and
  ``layers_to_transform``) where jlora's matching of them adapts exactly the
  weights the file adapts, so `export_peft` writes them back as PEFT wrote
  them; otherwise it lists the adapted weights by exact path. Per-module
  ranks and alphas are exact-path patterns, so ``jlora.wrap``/``merge``
  reproduce PEFT's model.

  Args:
    directory: a PEFT adapter directory (``adapter_config.json`` +
      ``adapter_model.safetensors``).
    tree: the Flax base tree with the same weights as PEFT's base model.
    name_map: ``name_map(path, index) -> module name`` (or a
      `jlora.PeftParameter` for an expert kernel, read from the file's
      ``target_parameters`` adapters); default: the map of the model family
      (see `export_peft`).
    apply_fn: the model's apply function, to read each weight's layout from
      use (needed for kernels of 3+ dimensions, except convolution kernels
      the file's ConvNd tensors describe, and transposed 2-D kernels).
    example_args: example inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.
    layout_pattern: ``{pattern: layout}`` instead of ``apply_fn`` (see
      `LoraConfig.layout_pattern`).

  Returns:
    ``(lora, config)``.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: for unknown or unsupported config fields, ``target_modules``
      that select no module of ``tree``, unreadable files,
      keys no weight maps to, modules missing from the file, wrong shapes or
      dtypes (each naming the key or module; ConvNd tensors on a kernel that
      is not a Flax conv kernel, or that the model uses in no convolution),
      or N-D kernels of unknown layout.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.export_peft(d, lora, cfg, base=params)
    >>> lora2, cfg2 = jlora.import_peft(d, params)
    >>> q = lambda tree: tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    >>> bool(jnp.allclose(q(jlora.merge(params, lora2, cfg2)), q(jlora.merge(params, lora, cfg))))
    True
  """
  with processes.together("jlora.import_peft"), contextlib.ExitStack() as files:
    return _import(
      storage.resolve(directory),
      tree,
      name_map=name_map or default_name_map,
      layout_pattern=layout_pattern,
      model=(apply_fn, example_args, example_kwargs),
      files=files,
    )


def _import(
  directory: epath.Path,
  tree: Any,
  *,
  name_map: NameMap,
  layout_pattern: Any,
  model: tuple[Any, Sequence[Any], Mapping[str, Any] | None],
  files: contextlib.ExitStack,
) -> tuple[dict, LoraConfig]:
  """`import_peft` in one process (every process of a job reads the files)."""
  apply_fn, example_args, example_kwargs = model
  pcfg, handle, info = _open_checked(directory, files)
  weights_path = storage.show(directory / WEIGHTS_NAME)
  cands = targets.candidates(tree)
  name_map = hf_tree_map(name_map, [c.path for c in cands])
  read = lambda: common.model_layouts_or_refusals(apply_fn, tree, example_args, example_kwargs)  # noqa: E731
  lays, unknown = _import_layouts(tree, cands, layout_pattern, read)
  known = {n for c in cands for _, n in common.safe_module_names(c, lays.get(c.path), name_map)}
  targeted = pcfg.get("target_parameters")
  keys = Keys(
    n for n in known if isinstance(n, PeftParameter) and peft_config.parameter_selected(targeted, n.name)
  )
  config_path = storage.show(directory / CONFIG_NAME)
  chosen = _selection(pcfg, cands, lays, name_map, info=info, where=config_path)
  found, unmapped = _find_modules(
    cands, (lays, unknown), name_map, info, keys=keys, chosen=chosen, weights_path=weights_path
  )
  matches = [
    _check_module(c, layout=lay, hits=hits, info=info, keys=keys, pcfg=pcfg, weights_path=weights_path)
    for c, lay, hits in found
  ]
  claimed = {k for m in matches for _, n in m.names for k in keys(n, m.embedding)}
  if pcfg.get("use_dora", False):
    magnitudes = {magnitude_key(name_str(n)) for m in matches for _, n in m.names}
    missing = sorted(magnitudes - set(info))
    if missing:
      raise ValueError(
        f"{weights_path!r} lacks DoRA's {missing[0]!r}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + ": adapter_config.json says `use_dora`, but the file does not hold the magnitude vectors. "
        "Save the adapter again with PEFT, or set `use_dora` to false if it is a plain LoRA adapter."
      )
    claimed |= magnitudes
  biases = _bias_leaves(tree, pcfg, name_map, info, weights_path)
  claimed |= set(biases.values())
  saved = _saved_leaves(tree, name_map, info, claimed, weights_path)
  unclaimed = _drop_ignored(set(info) - claimed - set(saved.values()), chosen, pcfg, weights_path)
  _check_all_claimed(unclaimed, unmapped, weights_path)
  if not matches:
    raise ValueError(f"{weights_path!r} holds no LoRA weights (no '.lora_A.weight' keys).")
  _check_peft_targets(pcfg, matches, known, chosen, config_path)
  dtypes = {_ST_DTYPES[info[k][1]] for k in claimed - set(biases.values())}
  kernel_dtypes = {jnp.dtype(m.cand.dtype).name for m in matches}
  collections = paths.is_collections(tree)
  config = _import_config(
    pcfg,
    tree=tree,
    matches=matches,
    cands=cands,
    saved_modules=[paths.module_path(p, collections) for p in saved],
    layout_pattern=layout_pattern,
    dtype=next(iter(dtypes)) if len(dtypes) == 1 and dtypes != kernel_dtypes else None,
    where=config_path,
  )
  lora = _build_tree(
    handle, tree, config, matches=matches, keys=keys, saved=saved, biases=biases, where=weights_path
  )
  adapters.bind(tree, lora, config, lambda: {**lays, **{m.cand.path: m.layout for m in matches}})
  return lora, config


def _check_all_claimed(unclaimed: set[str], unmapped: str | None, weights_path: str) -> None:
  """Every tensor of the file must belong to a weight of the tree."""
  if unclaimed:
    first = sorted(unclaimed)[0]
    hint = f"no name map jlora knows names weight {unmapped!r}; " if unmapped else ""
    raise ValueError(
      f"{weights_path!r}: no leaf of the given tree maps to tensor {first!r}"
      + (f" (and {len(unclaimed) - 1} more)" if len(unclaimed) > 1 else "")
      + f". {hint}Pass a `name_map(path, index)` that gives PEFT's module names, or "
      "`apply_fn`/`layout_pattern` for kernels whose layout is not (in, out)."
    )


def _build_tree(
  handle: Any,
  tree: Any,
  config: LoraConfig,
  *,
  matches: list[_Match],
  keys: Keys,
  saved: Mapping[paths.Path, str],
  biases: Mapping[paths.Path, str],
  where: str,
) -> dict:
  """Reads the checked tensors into the adapter tree (factors in the kernels' axis order)."""
  lora: dict = {}
  leaves = dict(paths.leaves_with_paths(tree))
  for m in matches:
    a, b = _read_factors(handle, m, keys, where)
    spec = adapters.AdapterSpec(m.cand.path, m.cand.module, m.cand.shape, m.layout, m.rank, 1.0, None)
    a, b = adapters.from_canonical(spec, jnp.asarray(a), jnp.asarray(b))
    node = {paths.LORA_A: a, paths.LORA_B: b}
    if config.use_dora:
      node[paths.LORA_MAGNITUDE] = _read_magnitude(handle, m, spec, leaves[m.cand.path], where)
    paths.nested_set(lora, m.cand.path, node)
  for path in targets.saved_module_paths(tree, config):
    if path in saved:
      arr = _read_saved(handle, saved[path], where)
      arr = arr.T if common.SAVED_LEAVES[str(path[-1])][1] else arr
      paths.nested_set(lora, path, jnp.asarray(arr, dtype=leaves[path].dtype))
    else:  # a leaf PyTorch's module does not have: keep the base value, as PEFT's copy does
      paths.nested_set(lora, path, jnp.array(leaves[path], copy=True))
  saved_set = set(targets.saved_module_paths(tree, config))
  for path in targets.bias_paths(tree, config, {m.cand.module for m in matches}):
    if path not in saved_set:  # a bias the file lacks (PyTorch's module has none): the base value
      arr = _read_saved(handle, biases[path], where) if path in biases else leaves[path]
      paths.nested_set(lora, path, jnp.array(arr, dtype=leaves[path].dtype, copy=True))
  return lora


def _open_checked(
  directory: epath.Path, files: contextlib.ExitStack
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """The PEFT config, the tensor handle and index: dtypes and jlora's checksum checked."""
  pcfg = peft_config.read_peft_config(directory / CONFIG_NAME)
  handle, info = _open_weights(directory, files)
  for key, (_, dtype) in info.items():
    if dtype not in _ST_DTYPES:
      raise ValueError(
        f"{storage.show(directory / WEIGHTS_NAME)!r}: tensor {key!r} has dtype {dtype}; LoRA weights must "
        f"be one of {sorted(_ST_DTYPES)}."
      )
  _verify_checksum(handle, info, pcfg, directory)
  return pcfg, handle, info


def _verify_checksum(
  handle: Any, info: Mapping[str, Any], pcfg: Mapping[str, Any], directory: epath.Path
) -> None:
  """Checks jlora's checksum over both files, when the adapter was written by `export_peft`."""
  want = (handle.metadata() or {}).get(common.CHECKSUM_KEY)
  if want is None:
    return  # written by PEFT or by hand: nothing to check against
  weights_path = storage.show(directory / WEIGHTS_NAME)
  tensors = {key: _read_saved(handle, key, weights_path) for key in info}
  if common.checksum(pcfg, tensors) != want:
    raise ValueError(
      f"{storage.show(directory)!r}: {CONFIG_NAME} and {WEIGHTS_NAME} fail the checksum jlora wrote with "
      "them: a file was corrupted (or edited) after `export_peft`. Re-export the adapter, or restore the "
      "files."
    )


def _read_saved(handle: Any, key: str, weights_path: str) -> np.ndarray:
  try:
    return handle.get_tensor(key)
  except Exception as e:  # safetensors raises its own error types for a truncated file
    raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e
