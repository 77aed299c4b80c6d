"""PEFT files: what `export_peft` (`peft_export`) and `import_peft` (`peft_import`) share.

Shapes: a jlora adapter keeps its kernel's axis order (`jlora.Layout`); in
canonical order it is A ``(*stacked, *fan_in, r)`` and B
``(*stacked, r, *fan_out)``. PEFT's ``lora_A.weight`` is ``(r, in)`` and
``lora_B.weight`` ``(out, r)``, ``in``/``out`` being the fan-in and fan-out
axes flattened row-major in the kernel's axis order (gemma's ``q_einsum``
``(N, D, H)`` is the PyTorch ``q_proj`` Linear of ``N*H`` outputs). A kernel
with a stacked axis becomes one PEFT module per entry: per layer of a scanned
kernel, per part of a fused one (gemma's ``kv_einsum`` -> ``k_proj``,
``v_proj``). An embedding uses PEFT's ``lora_embedding_A`` ``(r, vocab)`` and
``lora_embedding_B`` ``(d, r)``. A convolution kernel (Flax's ``(*k, in, out)``,
used in ``conv_general_dilated``) uses PEFT's ConvNd format: ``lora_A.weight``
``(r, in, *k)``, ``lora_B.weight`` ``(out, r, 1, ...)``, DoRA's magnitude ``(1,
out, 1, ...)`` (`jlora._src.io.peft.conv`). Module names come from a name map
(`jlora._src.io.peft.names`).

Only the ``safetensors`` format is read or written; pickled ``.bin`` files are
never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jlora._src.api.layout_inference import infer_layouts, read_layouts
from jlora._src.core import layouts, paths, targets
from jlora._src.core.config import ALL_LINEAR
from jlora._src.io.peft.names import NameMap, PeftParameter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Flax leaf name -> (PyTorch parameter name, whether the array is transposed).
SAVED_LEAVES = {
  "kernel": ("weight", True),
  "embedding": ("weight", False),
  "bias": ("bias", False),
  "scale": ("weight", False),
}


# jlora's SHA-256 over adapter_config.json and every tensor, kept in the safetensors metadata (which
# PEFT does not read), so a flipped bit in either file is found on import.
CHECKSUM_KEY = "jlora_sha256"


def checksum(peft_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
  """SHA-256 of the config's canonical JSON and of each tensor's name, dtype, shape and bytes."""
  h = hashlib.sha256(json.dumps(peft_config, sort_keys=True).encode())
  for key in sorted(tensors):
    arr = np.ascontiguousarray(tensors[key])
    h.update(f"\n{key}|{arr.dtype.str}|{arr.shape}\n".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def is_embedding(path: paths.Path) -> bool:
  return str(path[-1]) in targets.EMBEDDING_LEAVES


# -- what PEFT selects -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeftTargets:
  """The fields of an ``adapter_config.json`` that choose PEFT's adapted modules.

  ``target_modules``: a list of names (a module's full name or a dotted
  suffix), a full-match regex, ``"all-linear"`` (expand it with `expand`
  first), or ``None``.
  """

  target_modules: Any = None
  layers_to_transform: tuple[int, ...] | None = None
  layers_pattern: tuple[str, ...] | None = None
  exclude_modules: Any = None
  modules_to_save: tuple[str, ...] | None = None

  @classmethod
  def of(cls, pcfg: Mapping[str, Any]) -> PeftTargets:
    """The selection of a PEFT config (a dict read from ``adapter_config.json``)."""
    layers, pattern = pcfg.get("layers_to_transform"), pcfg.get("layers_pattern")
    target, exclude = pcfg.get("target_modules"), pcfg.get("exclude_modules")
    return cls(
      target_modules=target if target is None or isinstance(target, str) else tuple(target),
      layers_to_transform=(layers,)
      if isinstance(layers, int)
      else (None if layers is None else tuple(layers)),
      layers_pattern=(pattern,) if isinstance(pattern, str) else (tuple(pattern) if pattern else None),
      exclude_modules=exclude if exclude is None or isinstance(exclude, str) else tuple(exclude),
      modules_to_save=tuple(pcfg.get("modules_to_save") or ()) or None,
    )

  @property
  def all_linear(self) -> bool:
    return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

  def expand(self, linear: Iterable[str]) -> PeftTargets:
    """PEFT's ``"all-linear"`` (`_maybe_include_all_linear_layers`): the names of the model's linear
    modules, the output head excluded (``linear``)."""
    return dataclasses.replace(self, target_modules=tuple(sorted(linear))) if self.all_linear else self

  def excludes(self, name: str) -> bool:
    """Whether ``exclude_modules`` or ``modules_to_save`` keep PEFT off module ``name``."""
    ex = self.exclude_modules
    if ex and (re.fullmatch(ex, name) if isinstance(ex, str) else _in_list(ex, name)):
      return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save or ())

  def selects(self, name: str) -> bool:
    """PEFT's `check_target_module_exists` for module ``name``: a full-match regex (which ignores
    ``layers_to_transform``), or a list entry equal to the name, or a dotted suffix of it in a
    layer ``layers_to_transform`` keeps; never an excluded module."""
    target = self.target_modules
    if not target or self.excludes(name):
      return False
    if isinstance(target, str):
      return re.fullmatch(target, name) is not None
    if name in target:
      return True
    if not any(name.endswith("." + t) for t in target):
      return False
    return not self.layers_to_transform or layer_of(name, self.layers_pattern) in self.layers_to_transform


def _in_list(entries: Sequence[str], name: str) -> bool:
  return name in entries or any(name.endswith("." + e) for e in entries)


def layer_of(name: str, layers_pattern: Sequence[str] | None) -> int | None:
  """PEFT's layer index of a module name: the first numbered entry (after a ``layers_pattern`` name,
  when given)."""
  found = None
  for pattern in layers_pattern or [None]:
    regex = r".*?\.[^.]*\.(\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(\d+)\."
    found = re.match(regex, name)
    if found:
      break
  return None if found is None else int(found.group(1))


def module_names(
  path: paths.Path,
  layout: layouts.Layout | None,
  shape: tuple,
  name_map: NameMap,
  entries: Sequence[int] | None = None,
) -> list:
  """``[(index, name)]``: the PEFT modules of one weight (one per entry of its first stacked axis, or
  one), or its expert parameters (`PeftParameter`: one, or one per layer of a scanned stack).

  A kernel with one stacked axis is an expert kernel when ``name_map(path, None)`` answers a
  `PeftParameter` (an error there, or a module name, means it is not: its entries are modules); one
  with two stacked axes must be (layers, experts). ``entries``: the entries of the first stacked
  axis to name (default: all).
  """
  stacked = () if layout is None else layout.stacked_axes
  if not stacked:
    return [(None, name_map(path, None))]
  if len(stacked) == 1:
    try:
      whole = name_map(path, None)
    except (ValueError, LookupError, TypeError):  # a map that names entries only
      whole = None
    if isinstance(whole, PeftParameter):
      return [(None, whole)]
  names = [(i, name_map(path, i)) for i in (range(shape[stacked[0]]) if entries is None else entries)]
  experts = len(stacked) == 2
  for i, name in names:
    if isinstance(name, PeftParameter) != experts:
      raise ValueError(
        f"The name map gives {name!r} for entry {i} of {paths.to_str(path)!r} (layout {layout}). "
        + (
          "A kernel with two stacked axes is a scanned stack of experts (layers, experts, ...): return "
          "`jlora.PeftParameter(...)` for each layer, PEFT's `target_parameters` name of the parameter."
          if experts
          else "For an expert kernel with one stacked axis (experts, ...) return the `jlora.PeftParameter` "
          "for `index=None`; entries of a stacked axis are PEFT modules (str)."
        )
      )
  return names


def model_layouts(
  apply_fn: Callable[..., Any] | None,
  tree: Any,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
  only: Sequence[paths.Path] | None = None,
) -> dict[paths.Path, layouts.Layout]:
  """Each kernel's layout, with the ops that use it, read off the model (`jlora.infer_layouts`; ``only``
  these leaves); none without ``apply_fn``. The ``apply_fn``/``example_args``/``example_kwargs`` of
  `export_peft` and `import_peft`."""
  if apply_fn is None:
    return {}

  return infer_layouts(apply_fn, tree, *example_args, only=only, **(example_kwargs or {}))


def model_layouts_or_refusals(
  apply_fn: Callable[..., Any] | None,
  tree: Any,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, str]]:
  """`model_layouts` of every kernel, and for each kernel whose use gives it no layout (an untouched
  grouped convolution's) the reason, to raise only if a file adapts it
  (`jlora._src.api.layout_inference.read_layouts`)."""
  if apply_fn is None:
    return {}, {}

  return read_layouts(apply_fn, tree, example_args, example_kwargs or {})


def name_guesses(cand: targets.Candidate) -> list[layouts.Layout | None]:
  """Layouts to name a weight of unknown layout by: plain, or fused/scanned on its first axis."""
  n = len(cand.shape)
  return [None] + ([layouts.Layout("s" + "i" * (n - 2) + "o")] if n >= 3 else [])


def safe_module_names(cand: targets.Candidate, layout: layouts.Layout | None, name_map: NameMap) -> list:
  """`module_names`, or none when the name map does not know the weight (raises `ValueError`
  or a `LookupError` such as a user map's `KeyError`)."""
  try:
    return module_names(cand.path, layout, cand.shape, name_map)
  except (ValueError, LookupError):
    return []
