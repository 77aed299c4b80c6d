"""Which PEFT modules of the file adapt which weights of the tree: each weight's layout, its modules'
names, and their tensors' shapes and ranks checked against the weight (`Match`), before any tensor is read.

See `jlora._src.io.peft.common` for the shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from jlora._src.core import layouts, paths, targets
from jlora._src.core.config import freeze_layout_pattern, longest_match
from jlora._src.io.peft import common
from jlora._src.io.peft import config as peft_config
from jlora._src.io.peft import conv as peft_conv
from jlora._src.io.peft import experts as peft_experts
from jlora._src.io.peft.names import Keys, NameMap, PeftParameter, name_str


@dataclasses.dataclass(frozen=True)
class Match:
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
class Unknown:
  """Why a weight has no layout; ``used``: the model uses it in a way that gives it none (a grouped
  convolution's kernel), so the file's tensors cannot stand for its layout either."""

  why: str
  used: bool


def import_layouts(
  tree: Any,
  cands: list[targets.Candidate],
  layout_pattern: Any,
  read: Callable[[], tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, str]]],
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, Unknown]]:
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
      unknown[cand.path] = Unknown(refused[cand.path], used=True)
      continue
    if layout is None:
      try:
        layout = layouts.default_layout(cand.module, cand.shape, paths.to_str(cand.path))
      except ValueError as e:
        unknown[cand.path] = Unknown(str(e), used=False)
        continue
    out[cand.path] = layout
  return out, unknown


def find_modules(
  cands: list[targets.Candidate],
  lays: tuple[Mapping[paths.Path, layouts.Layout], Mapping[paths.Path, Unknown]],
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
  cand: targets.Candidate, name_map: NameMap, info: Mapping[str, Any], keys: Keys, unknown: Unknown
) -> layouts.Layout | None:
  """The layout of a kernel of unknown layout that the file adapts: Flax's conv layout (grouped where the
  file's ``lora_A.weight`` has a multiple of the kernel's input channels) when the file holds PEFT ConvNd
  adapters for it (a ``lora_A.weight`` of 3+ dims; `peft_conv`) and the model's use does not contradict
  it, ``None`` when the file does not adapt it.

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
        layout = peft_conv.flax_layout(len(cand.shape), stacked=guess is not None)
        return peft_conv.grouped_by_file(layout, cand.shape, info[keys(name)[0]][0])
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


def check_module(
  cand: targets.Candidate,
  *,
  layout: layouts.Layout,
  hits: list[tuple[int | None, Any]],
  info: Mapping[str, Any],
  keys: Keys,
  pcfg: Mapping[str, Any],
  weights_path: str,
) -> Match:
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
      want = peft_conv.peft_shapes(entry, rank, layout.groups)
      form = "PEFT's ConvNd: lora_A (r, in, *kernel_size), lora_B (out, r / groups, 1, ...)"
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
  return Match(cand, layout, tuple(hits), embedding, rank, alpha, conv)
