"""PEFT's ``adapter_config.json``: reading and checking it, and translating configs both ways.

`read_peft_config` refuses fields jlora does not know and options that compute
something other than plain LoRA; `import_config` builds the jlora config that
reproduces an imported file; `peft_config_of` and `exported_targets` build
the JSON `export_peft` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jlora._src.core.config import BIAS_MODES, LoraConfig
from jlora._src.io import storage
from jlora._src.io.peft import common
from jlora._src.io.peft.common import CONFIG_NAME
from jlora._src.io.peft.names import is_conv1d

# PEFT LoraConfig fields that jlora reads.
_USED = frozenset(
  {
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "use_dora",
    "target_parameters",
  }
)
# Fields whose value does not change what the saved weights compute (or that
# jlora re-derives from the tensor names and the Flax model: `fan_in_fan_out`
# only says how PyTorch stores GPT-2's Conv1D weights).
_IGNORED = frozenset(
  {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "exclude_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "megatron_core",
    "runtime_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "qalora_group_size",
    "ensure_weight_tying",
  }
)
# Fields that must keep PEFT's plain-LoRA value: anything else computes
# something jlora's LoRA does not (DoRA, biases ...).
_REQUIRED = {
  "peft_type": ("LORA",),
  "lora_bias": (False,),
  "layer_replication": (None,),
  "trainable_token_indices": (None,),
  "use_qalora": (False,),
  "megatron_config": (None,),
  "alora_invocation_tokens": (None,),
  "monteclora_config": (None,),
  "use_bdlora": (None, False),
  "arrow_config": (None,),
  "kasa_config": (None,),
}
_KNOWN = _USED | _IGNORED | frozenset(_REQUIRED)


def read_peft_config(file: Any) -> dict[str, Any]:
  """The JSON object of an ``adapter_config.json`` (an `epath.Path`), checked for what jlora imports."""
  path = storage.show(file)
  if not storage.is_file(file):
    raise FileNotFoundError(f"No {CONFIG_NAME} at {path!r}; is this a PEFT adapter directory?")
  try:
    data = json.loads(storage.read_bytes(file).decode())
  except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep to parse
    raise ValueError(f"{path!r} is not valid JSON ({e}); the adapter config is corrupted.") from e
  if not isinstance(data, Mapping):
    raise ValueError(f"{path!r} must hold a JSON object; got {type(data).__name__}.")
  unknown = sorted(set(data) - _KNOWN)
  if unknown:
    raise ValueError(
      f"{path!r} has field(s) {unknown} that jlora does not know, so it cannot tell whether the "
      f"adapter computes plain LoRA; known fields: {sorted(_KNOWN)}. Remove them if they are at "
      "PEFT's defaults."
    )
  for field, allowed in _REQUIRED.items():
    if field in data and data[field] not in allowed:
      raise ValueError(
        f"{path!r}: `{field}` is {data[field]!r}; jlora imports plain LoRA adapters only "
        f"(`{field}` must be {' or '.join(map(repr, allowed))})."
      )
  if data.get("peft_type") != "LORA":
    raise ValueError(f"{path!r}: `peft_type` must be 'LORA'; got {data.get('peft_type')!r}.")
  if data.get("bias", "none") not in BIAS_MODES:
    modes = " or ".join(map(repr, BIAS_MODES))
    raise ValueError(f"{path!r}: `bias` is {data['bias']!r}; jlora reads {modes}.")
  init = data.get("init_lora_weights", True)
  if not (init is True or init is False or init == "gaussian"):
    raise ValueError(
      f"{path!r}: `init_lora_weights` is {init!r}; initialisations such as PiSSA, OLoRA, LoftQ or "
      "CorDA change the base weights, so the adapter alone does not reproduce the model: it needs the "
      "residual base, which the file does not hold. Convert it to a plain LoRA adapter in PEFT first "
      "(`save_pretrained(..., path_initial_model_for_weight_conversion=...)`; jlora's own: "
      "`jlora.export_peft(..., initial_lora=...)`)."
    )
  tp = data.get("target_parameters")
  if tp is not None and (not isinstance(tp, list) or not all(isinstance(t, str) for t in tp)):
    raise ValueError(f"{path!r}: `target_parameters` must be a list of parameter names; got {tp!r}.")
  for field in ("rank_pattern", "alpha_pattern"):
    if not isinstance(data.get(field) or {}, Mapping):
      raise ValueError(f"{path!r}: `{field}` must be a JSON object; got {data[field]!r}.")
  return dict(data)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's `get_pattern_key`: the first pattern matching the module name or a dotted suffix."""
  for key, value in patterns.items():
    regex = rf"(.*\.)?({key})$"
    try:
      hit = re.match(regex, name)
    except re.error as e:
      raise ValueError(
        f"adapter_config.json's `rank_pattern`/`alpha_pattern` key {key!r} is not a valid regex where PEFT "
        f"uses it ({regex!r}): {e}; fix or escape it in the file."
      ) from e
    if hit:
      return value
  return default


def exported_targets(
  config: LoraConfig, exported: Sequence[str], known: set[str] | None
) -> tuple[Any, list[int] | None, str | None]:
  """``(target_modules, layers_to_transform, layers_pattern)`` for PEFT: the user's own list, or
  the short names, where they select exactly the exported modules among the ``known`` ones;
  otherwise the full names."""
  want = set(exported)
  if not want:
    return [], None, None  # expert parameters only: `None` would make PEFT pick its default modules
  short = sorted({n.rsplit(".", 1)[-1] for n in exported})
  options: list[tuple[Any, list[int] | None]] = []
  if not isinstance(config.target_modules, str):
    options.append((list(config.target_modules), None))
  options.append((short, None))
  if config.layers_to_transform is not None:
    options += [(t, list(config.layers_to_transform)) for t, _ in list(options)]
  for target, layers in options if known is not None else ():
    sel = common.PeftTargets(
      target_modules=target, layers_to_transform=None if layers is None else tuple(layers)
    )
    if {n for n in known | want if sel.selects(n)} == want:
      return target, layers, None
  return sorted(want), None, None


def parameter_selected(target_parameters: Sequence[str] | None, name: str) -> bool:
  """PEFT's `_inject_parameters` match of one parameter name: a full name or a dotted suffix."""
  return any(name == t or name.endswith("." + t) for t in target_parameters or ())


def exported_parameters(exported: Sequence[str], known: set[str] | None) -> list[str] | None:
  """``target_parameters`` for PEFT: the parameters' short names where they select exactly the
  exported ones among the ``known`` ones; otherwise their full names (``None`` for none)."""
  if not exported:
    return None
  short = sorted({n.rsplit(".", 1)[-1] for n in exported})
  want = set(exported)
  if known is not None and {n for n in known | want if parameter_selected(short, n)} == want:
    return short
  return sorted(exported)


def peft_config_of(
  config: LoraConfig,
  *,
  ranks: Mapping[str, int],
  alphas: Mapping[str, float],
  saved_modules: Sequence[str],
  targets: tuple[Any, list[int] | None, str | None],
  parameters: list[str] | None,
  base_model_name_or_path: str | None,
  task_type: str | None,
) -> dict[str, Any]:
  """The ``adapter_config.json`` of an export: per-module (and per-parameter) ranks and alphas by
  exact name; ``target_parameters`` for expert kernels."""
  target, layers, layers_pattern = targets
  return {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "revision": None,
    "inference_mode": True,
    "r": config.r,
    "lora_alpha": int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha,
    "lora_dropout": config.lora_dropout,
    "use_rslora": config.use_rslora,
    "init_lora_weights": config.init_lora_weights,
    "target_modules": target,
    "target_parameters": parameters,
    "exclude_modules": None,
    "layers_to_transform": layers,
    "layers_pattern": layers_pattern,
    "rank_pattern": {re.escape(n): r for n, r in sorted(ranks.items()) if r != config.r},
    "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != config.lora_alpha},
    "modules_to_save": sorted(set(saved_modules)) or None,
    "bias": config.bias,
    "fan_in_fan_out": any(is_conv1d(n) for n in ranks),
    "use_dora": config.use_dora,
    "lora_bias": False,
  }
