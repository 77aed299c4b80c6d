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
out, 1, ...)`` (`jlora._src.peft_conv`). Module names come from a name map
(`jlora._src.peft_names`).

Only the ``safetensors`` format is read or written; pickled ``.bin`` files are
never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jlora._src import layouts, paths, targets
from jlora._src.peft_names import NameMap, PeftParameter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Flax leaf name -> (PyTorch parameter name, whether the array is transposed).
SAVED_LEAVES = {
  "kernel": ("weight", True),
  "embedding": ("weight", False),
  "bias": ("bias", False),
  "scale": ("weight", False),
}
# PEFT's default layer containers (`peft.utils.constants.LAYERS_PATTERN`-like), for `layers_to_transform`.
PEFT_LAYER_NAMES = ("layers", "h", "blocks", "layer")


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


def peft_selects(target_modules: Any, layers: Sequence[int] | None, name: str) -> bool:
  """PEFT's `check_target_module_exists` for one module name (suffix or full-match regex, then
  the layer filter)."""
  if isinstance(target_modules, str):
    hit = re.fullmatch(target_modules, name) is not None
  else:
    hit = any(name == t or name.endswith("." + t) for t in target_modules or ())
  if not hit or layers is None:
    return hit
  m = re.search(rf"\.(?:{'|'.join(PEFT_LAYER_NAMES)})\.(\d+)\.", name)
  return m is not None and int(m.group(1)) in layers


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
  from jlora._src.wrap import infer_layouts  # noqa: PLC0415  (the interpreter loads only when needed)

  return infer_layouts(apply_fn, tree, *example_args, only=only, **(example_kwargs or {}))


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
