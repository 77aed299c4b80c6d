"""`LoraConfig`: the frozen, validated description of a LoRA adapter.

Field names and meanings follow Hugging Face PEFT's `LoraConfig` so that a
user who knows PEFT can read and write a jlora config without a dictionary.

Shape conventions: a kernel's `Layout` gives each axis a role, stacked,
fan-in or fan-out, in any storage order (a Flax Dense kernel ``(in, out)`` is
``"io"``). Its adapter keeps the kernel's axis order: ``lora_A`` is the kernel
with its fan-out axes replaced by one rank axis, ``lora_B`` the kernel with its
fan-in axes replaced by one (Dense: A ``(in, r)``, B ``(r, out)``). PEFT's
``lora_A.weight`` is ``(r, in)`` and ``lora_B.weight`` is ``(out, r)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

InitLoraWeights = bool | str  # True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora"
Bias = Literal["none", "all", "lora_only"]
BIAS_MODES = ("none", "all", "lora_only")
LayoutSpec = str | tuple[int, int]

ALL_LINEAR = "all-linear"
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def residual_init(init: Any) -> bool:
  """Whether ``init_lora_weights`` takes the adapter out of the base (PiSSA, OLoRA): the base must
  then be replaced by the residual one (`jlora.init_with_residual`)."""
  return init in ("pissa", "olora") or pissa_niter(init) is not None


def pissa_niter(init: Any) -> int | None:
  """The subspace iterations of ``"pissa_niter_<n>"`` (randomized SVD), else ``None``."""
  m = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
  return int(m.group(1)) if m else None


# The largest alpha: scales (alpha / r, alpha / sqrt(r), never above alpha) are applied in float32.
_ALPHA_MAX = float(np.finfo(np.float32).max)


def _is_alpha(value: float) -> bool:
  return math.isfinite(value) and 0 < value <= _ALPHA_MAX


def _as_str_tuple(field: str, value: Any) -> tuple[str, ...] | str | None:
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
    items = tuple(value)
    for item in items:
      if not isinstance(item, str) or not item:
        raise ValueError(f"`{field}` must hold non-empty strings; got {item!r} in {value!r}.")
    if isinstance(value, (set, frozenset)):
      items = tuple(sorted(items))
    return items
  raise TypeError(
    f"`{field}` must be a string (regex), or a list/tuple of module names; "
    f"got {type(value).__name__}: {value!r}."
  )


def _check_regex(field: str, pattern: str, *, embedded: bool = False) -> None:
  """Raises for a ``pattern`` that is not a valid regex, alone or (``embedded``) in `pattern_regex`."""
  try:
    re.compile(pattern)
    if embedded:
      re.compile(pattern_regex(pattern))
  except re.error as e:
    fix = ""
    if embedded:
      fix = (
        f" (jlora matches it as {pattern_regex(pattern)!r}, a suffix of the module path; write a flag "
        "for the pattern alone as a group, e.g. '(?i:q_proj)' instead of '(?i)q_proj')"
      )
    raise ValueError(f"`{field}` pattern {pattern!r} is not a valid regex{fix}: {e}.") from e


def pattern_regex(key: str) -> str:
  """The regex a ``rank_pattern``/``alpha_pattern``/``layout_pattern`` key becomes: it matches a whole
  module path or a ``/``-suffix of it."""
  return rf"(?:.*/)?(?:{key})"


def _freeze_mapping(field: str, value: Any, check) -> tuple[tuple[str, Any], ...]:
  if value is None:
    return ()
  if not isinstance(value, Mapping):
    if isinstance(value, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
      value = dict(value)
    else:
      raise TypeError(
        f"`{field}` must be a mapping from module-name pattern to value; got {type(value).__name__}."
      )
  items = []
  for key, val in value.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"`{field}` keys must be non-empty strings; got {key!r}.")
    _check_regex(field, key, embedded=True)
    items.append((key, check(key, val)))
  return tuple(items)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Configuration of a LoRA adapter (PEFT's vocabulary).

  Attributes:
    r: adapter rank, a positive integer.
    lora_alpha: scaling numerator; the update is ``(lora_alpha / r) * A @ B``
      (or ``lora_alpha / sqrt(r)`` with ``use_rslora``). Finite, > 0 and at
      most float32's largest value (the scale is applied in float32).
    lora_dropout: dropout rate in ``[0, 1)`` on the input of the LoRA branch
      (applied by the wrapped apply only when a ``lora_dropout_key`` is given).
    target_modules: which modules to adapt. A list/tuple of names: a module
      matches if its path equals a name or ends with ``/name`` (PEFT's suffix
      rule; ``"proj"`` does not match ``q_proj``). A single string: a regex
      that must fully match the module path. ``"all-linear"``: every ``kernel``
      of two or more dimensions except the output head (``lm_head``, ``head``,
      ``classifier``, ``score``) and, when `jlora.init` is given the model,
      except convolution kernels (PEFT adapts only linear layers here).
    exclude_modules: modules never adapted, with the same matching rules.
    layers_to_transform: layer indices to adapt (an int or a sequence). A
      layer's index is read from a path entry ``<layers_pattern>_<i>`` (Linen
      lists) or ``<layers_pattern>/<i>`` (NNX lists, plain dicts), or, for a
      kernel stacked over layers (``nn.scan``), from its stacked axis.
    layers_pattern: the name(s) of the layer container (``"layers"``, ``"h"``
      ...). ``None`` accepts the usual names.
    rank_pattern: ``{pattern: rank}`` overriding ``r`` for matching modules
      (pattern is a regex matched against the module path or a suffix of it;
      the longest matching pattern wins).
    alpha_pattern: ``{pattern: alpha}`` overriding ``lora_alpha``, likewise.
    use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
    init_lora_weights: ``True`` (A: Kaiming-uniform as PyTorch's Linear,
      ``bound = 1/sqrt(fan_in)``; B: zeros), ``"gaussian"`` (A ~ N(0, 1/r);
      B zeros), ``False`` (both random; the adapter is not a no-op — for
      tests), or PEFT's ``"pissa"`` (the top-r singular vectors of the
      kernel), ``"pissa_niter_<n>"`` (the same by randomized SVD with ``n``
      subspace iterations) and ``"olora"`` (QR): these move the principal part
      of the kernel into the adapter, so the base must be replaced by the
      residual one: build them with `jlora.init_with_residual`.
    modules_to_save: modules whose parameters are trained in full alongside
      the adapter (e.g. a classifier head); same matching rules as
      ``target_modules`` lists.
    layout_pattern: ``{pattern: layout}``: the layout of matching kernels,
      overriding what jlora reads from the model. A layout is a string with
      one role per kernel axis in storage order, ``s`` (stacked), ``i``
      (fan-in) or ``o`` (fan-out): ``"oi"`` for a 2-D kernel stored
      ``(out, in)``, ``"oio"`` for gemma's ``q_einsum`` ``(N, D, H)``, ``"iso"``
      for a scanned kernel stored ``(in, L, out)``; or ``(stacked, fan_in)``:
      that many leading stacked axes, then fan-in axes, then fan-out (see
      `jlora.Layout`).
    dtype: dtype name of the adapter weights; ``None`` follows the kernel.
    bias: PEFT's ``bias``: ``"none"``; ``"all"`` (every leaf named ``bias``
      is trained: a copy of it joins the adapter tree at its own path, as a
      `modules_to_save` leaf does); ``"lora_only"`` (the biases of the adapted
      modules only).
    use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each adapted
      kernel becomes ``m * (W + scale * A @ B) / ||W + scale * A @ B||``, the
      norm taken per output feature over the fan-in axes and not
      differentiated; the trained magnitude ``m`` (``lora_magnitude``, the
      kernel's shape without its fan-in axes) starts at ``||W||``.

  Raises:
    ValueError, TypeError: at construction, naming the bad field.

  Example:
    >>> import jlora
    >>> cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    >>> cfg.scale_for("layers_0/attn/q_proj")
    2.0
  """

  r: int = 8
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  target_modules: tuple[str, ...] | str | None = None
  exclude_modules: tuple[str, ...] | str | None = None
  layers_to_transform: tuple[int, ...] | int | None = None
  layers_pattern: tuple[str, ...] | str | None = None
  rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
  alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
  use_rslora: bool = False
  init_lora_weights: InitLoraWeights = True
  modules_to_save: tuple[str, ...] | None = None
  layout_pattern: Mapping[str, LayoutSpec] | tuple[tuple[str, LayoutSpec], ...] = ()
  dtype: str | None = None
  bias: Bias = "none"
  use_dora: bool = False

  def __post_init__(self) -> None:
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
      raise ValueError(f"`r` must be a positive integer; got {self.r!r}.")
    set_("lora_alpha", _checked_alpha(self.lora_alpha))
    set_("lora_dropout", _checked_dropout(self.lora_dropout))
    for name, value in _module_fields(self).items():
      set_(name, value)
    if self.layers_to_transform is not None:
      set_("layers_to_transform", _checked_layers(self.layers_to_transform))
    elif self.layers_pattern is not None:
      raise ValueError("`layers_pattern` is only used with `layers_to_transform`; set both or neither.")
    set_("rank_pattern", _freeze_mapping("rank_pattern", self.rank_pattern, _pattern_rank))
    set_("alpha_pattern", _freeze_mapping("alpha_pattern", self.alpha_pattern, _pattern_alpha))
    set_("layout_pattern", freeze_layout_pattern(self.layout_pattern))
    _check_options(self)

  # -- per-module values -----------------------------------------------------

  # A weight has two names patterns can match: its module path
  # (``layer_0/mlp``) and its parameter path (``layer_0/mlp/linear``); pass
  # either, or both as a tuple.

  def rank_for(self, names: str | Sequence[str]) -> int:
    """The rank of the adapter at ``names`` (``rank_pattern`` or ``r``)."""
    return _lookup(self.rank_pattern, names, self.r)

  def alpha_for(self, names: str | Sequence[str]) -> float:
    """The alpha of the adapter at ``names`` (``alpha_pattern`` or ``lora_alpha``)."""
    return _lookup(self.alpha_pattern, names, self.lora_alpha)

  def scale_for(self, names: str | Sequence[str]) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``) at ``names``."""
    r = self.rank_for(names)
    alpha = self.alpha_for(names)
    return alpha / math.sqrt(r) if self.use_rslora else alpha / r

  def layout_for(self, names: str | Sequence[str]) -> LayoutSpec | None:
    """The user's layout override (``layout_pattern``) at ``names``, if any."""
    return _lookup(self.layout_pattern, names, None)

  # -- serialisation ---------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """A JSON-compatible dict; ``LoraConfig.from_dict`` inverts it exactly."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name in ("rank_pattern", "alpha_pattern"):
        value = dict(value)
      elif f.name == "layout_pattern":
        value = {k: v if isinstance(v, str) else list(v) for k, v in value}
      elif isinstance(value, tuple):
        value = list(value)
      out[f.name] = value
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
    """Builds a config from ``to_dict`` output.

    Raises:
      ValueError: on unknown fields (listing the known ones) or invalid values.
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"A LoRA config must be a JSON object; got {type(data).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"Unknown LoraConfig field(s) {unknown}; known fields: {sorted(known)}.")
    kwargs = dict(data)
    if "layout_pattern" in kwargs and isinstance(kwargs["layout_pattern"], Mapping):
      kwargs["layout_pattern"] = {
        k: v if isinstance(v, str) else tuple(v) for k, v in kwargs["layout_pattern"].items()
      }
    return cls(**kwargs)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


def _checked_alpha(alpha: Any) -> float:
  """`lora_alpha` as a float, or the error saying why it cannot be one."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
    raise TypeError(f"`lora_alpha` must be a number; got {alpha!r}.")
  if not _is_alpha(alpha):
    raise ValueError(
      f"`lora_alpha` must be a finite number > 0 and at most {_ALPHA_MAX:.4g} (the scale is applied in "
      f"float32, where a larger one is inf and a fresh adapter's update inf * 0 = NaN); got "
      f"{alpha!r}."
    )
  return float(alpha)


def _checked_dropout(rate: Any) -> float:
  """`lora_dropout` as a float in [0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(f"`lora_dropout` must be a number in [0, 1); got {rate!r}.")
  return float(rate)


def _module_fields(config: LoraConfig) -> dict[str, Any]:
  """`target_modules`, `exclude_modules`, `layers_pattern` and `modules_to_save`, normalized (tuples of
  names, a regex string, ``"all-linear"`` or ``None``) and checked."""
  if config.target_modules is None:
    raise ValueError(
      "`target_modules` is required: a list of module names such as "
      "('q_proj', 'v_proj'), a regex string, or 'all-linear'."
    )
  out = {}
  for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
    value = _as_str_tuple(name, getattr(config, name))
    if isinstance(value, tuple) and not value:
      value = None if name != "target_modules" else value
    if name == "target_modules" and value == ():
      raise ValueError("`target_modules` must name at least one module; got an empty list.")
    if isinstance(value, str):
      if not value:
        raise ValueError(f"`{name}` must not be an empty string.")
      if name in ("layers_pattern", "modules_to_save"):
        value = (value,)
      elif value != ALL_LINEAR or name != "target_modules":
        _check_regex(name, value)
    out[name] = value
  if out["exclude_modules"] == ALL_LINEAR:
    raise ValueError("`exclude_modules` cannot be 'all-linear'.")
  if isinstance(out["target_modules"], tuple) and out["modules_to_save"] is not None:
    both = [m for m in out["target_modules"] if m in out["modules_to_save"]]
    if both:
      raise ValueError(
        f"`target_modules` and `modules_to_save` both name {both}: a module is either adapted with "
        "LoRA (`target_modules`) or trained in full (`modules_to_save`), not both; remove it from one."
      )
  return out


def _checked_layers(ltt: Any) -> tuple[int, ...]:
  """`layers_to_transform` as a sorted tuple of distinct non-negative layer indices."""
  if isinstance(ltt, bool) or not isinstance(ltt, (int, Sequence, set, frozenset)) or isinstance(ltt, str):
    raise TypeError(
      "`layers_to_transform` must be an int or a list of ints (layer indices, e.g. 3 or [0, 1]); "
      f"got {type(ltt).__name__}: {ltt!r}."
    )
  given = ltt
  ltt = (ltt,) if isinstance(ltt, int) else tuple(ltt)
  if not ltt or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ltt):
    raise ValueError(f"`layers_to_transform` must be non-negative layer indices; got {given!r}.")
  if len(set(ltt)) != len(ltt):
    raise ValueError(f"`layers_to_transform` has repeated indices: {ltt!r}.")
  return tuple(sorted(ltt))


def _pattern_rank(key: str, val: Any) -> int:
  """A `rank_pattern` value, checked."""
  if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
    raise ValueError(f"`rank_pattern[{key!r}]` must be a positive integer; got {val!r}.")
  return val


def _pattern_alpha(key: str, val: Any) -> float:
  """An `alpha_pattern` value, checked, as a float."""
  if isinstance(val, bool) or not isinstance(val, (int, float)) or not _is_alpha(val):
    raise ValueError(
      f"`alpha_pattern[{key!r}]` must be a finite number > 0 and at most {_ALPHA_MAX:.4g} (the float32 "
      f"range, as `lora_alpha`); got {val!r}."
    )
  return float(val)


def _check_options(config: LoraConfig) -> None:
  """Checks the remaining fields: `use_rslora`, `init_lora_weights`, `use_dora`, `bias`, `dtype`."""
  if not isinstance(config.use_rslora, bool):
    raise TypeError(f"`use_rslora` must be a bool; got {config.use_rslora!r}.")
  init = config.init_lora_weights
  if not (init is True or init is False or init == "gaussian" or residual_init(init)):
    raise ValueError(
      "`init_lora_weights` must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' (n a "
      f"non-negative integer), 'olora'; got {init!r}."
    )
  if not isinstance(config.use_dora, bool):
    raise TypeError(f"`use_dora` must be a bool; got {config.use_dora!r}.")
  if config.bias not in BIAS_MODES:
    raise ValueError(f"`bias` must be one of {BIAS_MODES}; got {config.bias!r}.")
  if config.dtype is not None and config.dtype not in _DTYPES:
    raise ValueError(f"`dtype` must be None or one of {_DTYPES}; got {config.dtype!r}.")


def check_config(config: Any, where: str = "config") -> LoraConfig:
  """``config`` if it is a `LoraConfig`; else a `TypeError` that says how to build one."""
  if isinstance(config, LoraConfig):
    return config
  fix = "jlora.LoraConfig(r=..., target_modules=...)"
  if isinstance(config, Mapping):
    fix = "jlora.LoraConfig(**d), or jlora.LoraConfig.from_dict(d) for a saved `to_dict()`"
  raise TypeError(f"`{where}` must be a jlora.LoraConfig; got {type(config).__name__}. Build one with {fix}.")


def longest_match(items: Iterable[tuple[str, Any]], names: str | Sequence[str]) -> tuple[str, Any] | None:
  """``(pattern, value)`` of the longest pattern matching one of ``names`` or a ``/``-suffix of it."""
  names = (names,) if isinstance(names, str) else tuple(names)
  best = None
  for key, value in items:
    if any(re.fullmatch(pattern_regex(key), name) for name in names):
      if best is None or len(key) > len(best[0]):
        best = (key, value)
  return best


def _check_layout(key: str, val: Any) -> LayoutSpec:
  if isinstance(val, str):
    if val and not set(val) - set("sio") and "i" in val and "o" in val:
      return val
  elif (
    isinstance(val, (tuple, list))
    and len(val) == 2
    and all(isinstance(v, int) and not isinstance(v, bool) for v in val)
    and val[0] >= 0
    and val[1] >= 1
  ):
    return (int(val[0]), int(val[1]))
  raise ValueError(
    f"`layout_pattern[{key!r}]` must be a string of axis roles ('s' stacked, 'i' fan-in, "
    "'o' fan-out, one per kernel axis, with at least one 'i' and one 'o', e.g. 'oi'), or "
    f"(stacked, fan_in) with stacked >= 0 and fan_in >= 1; got {val!r}."
  )


def freeze_layout_pattern(value: Any) -> tuple[tuple[str, LayoutSpec], ...]:
  """A validated, frozen ``layout_pattern`` (see `LoraConfig`)."""
  return _freeze_mapping("layout_pattern", value, _check_layout)


def _lookup(items: tuple[tuple[str, Any], ...], names: str | Sequence[str], default: Any) -> Any:
  found = longest_match(items, names)
  return default if found is None else found[1]
