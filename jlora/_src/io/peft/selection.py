"""What the file's adapter_config.json selects, and which of the file's tensors are claimed: the PEFT
modules its `target_modules` choose, the trained copies (`modules_to_save`, biases), the tensors PEFT
ignores, and every other tensor belonging to a weight of the tree.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jlora._src.core import layouts, paths, targets
from jlora._src.io.peft import common
from jlora._src.io.peft import config as peft_config
from jlora._src.io.peft import conv as peft_conv
from jlora._src.io.peft.common import WEIGHTS_NAME
from jlora._src.io.peft.matching import Match
from jlora._src.io.peft.names import PREFIX, NameMap, PeftParameter, lora_keys, name_str


def saved_leaves(
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


def bias_leaves(
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


def selection(
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


def drop_ignored(
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


def check_peft_targets(
  pcfg: Mapping[str, Any], matches: list[Match], known: set, chosen: Callable[[str], bool], where: str
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


def check_all_claimed(unclaimed: set[str], unmapped: str | None, weights_path: str) -> None:
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
