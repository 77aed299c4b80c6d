"""Agreement between an adapter tree and its config: what the config puts on a base tree, both ways.

`adapters.bind` reads each adapter against its kernel; this module checks the
tree as a whole: every adapter sits on a kernel the config adapts, every kernel
the config surely adapts has one, and the `modules_to_save` copies are exactly
the leaves the config names. Pure Python over paths (no arrays are read), so
under ``jax.jit`` it runs once, at trace time.

``"all-linear"`` selects by the model's use. Without the model (`merge`,
export, checkpoints) an adapter may sit on any kernel other than the output
head, and none is required; with it (`wrap`) the weights the model uses as
linear layers in this call must each have one.

It also owns the wrapped apply's call order, ``apply(tree, lora, *args)``: its
signature (`call_signature`) and naming a swap of its arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Mapping
from typing import Any

import jax

from jlora._src.core import paths, targets
from jlora._src.core.config import ALL_LINEAR, LoraConfig

_SHOWN = 5  # paths listed in one message


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a config puts on a base tree."""

  targeted: Mapping[paths.Path, targets.Candidate]  # kernels an adapter may sit on (before layer selection)
  required: tuple[paths.Path, ...]  # kernels that must have one, in tree order
  saved: frozenset[paths.Path]  # `modules_to_save` leaves and trained biases: one trained copy each
  # `bias="lora_only"`: bias path -> the kernels of its module; its copy is required when one of
  # them has an adapter.
  bias_of: Mapping[paths.Path, frozenset[paths.Path]] = dataclasses.field(default_factory=dict)


def expected(tree: Any, config: LoraConfig, linear: Collection[paths.Path] | None) -> Expected:
  """What ``config`` puts on ``tree``; ``linear``: the model's linear weights, when known."""
  if config.target_modules == ALL_LINEAR:
    allowed = targets.match_targets(tree, config, {c.path for c in targets.candidates(tree)})
    required = [c for c in allowed if linear is not None and c.path in linear]
  else:
    allowed = required = targets.match_targets(tree, config)
  saved = set(targets.saved_module_paths(tree, config))
  bias_of: dict[paths.Path, frozenset[paths.Path]] = {}
  if config.bias == "all":
    saved.update(targets.bias_paths(tree, config))
  elif config.bias == "lora_only":
    by_module: dict[str, set[paths.Path]] = {}
    for c in allowed:
      by_module.setdefault(c.module, set()).add(c.path)
    collections = paths.is_collections(tree)
    for path in targets.bias_paths(tree, config, by_module):
      if path not in saved:
        bias_of[path] = frozenset(by_module[paths.module_path(path, collections)])
  return Expected(
    {c.path: c for c in allowed},
    tuple(c.path for c in required if _surely_selected(c, config)),
    frozenset(saved) | frozenset(bias_of),
    bias_of,
  )


def _surely_selected(cand: targets.Candidate, config: LoraConfig) -> bool:
  """Whether `layers_to_transform` surely keeps ``cand``: always when unset, by the layer index in
  its path when there is one; a kernel stacked over layers is checked when its adapter is read."""
  if config.layers_to_transform is None:
    return True
  index = targets.layer_index(cand.module, config.layers_pattern)
  return index is not None and index in config.layers_to_transform


def targeting(config: LoraConfig) -> str:
  """The config fields that choose the adapted kernels, for messages."""
  out = f"`target_modules`={config.target_modules!r}"
  for name in ("exclude_modules", "layers_to_transform", "modules_to_save"):
    if getattr(config, name) is not None:
      out += f", `{name}`={getattr(config, name)!r}"
  return out


def why_not_targeted(cand: targets.Candidate, config: LoraConfig) -> str:
  """Why ``config`` adapts no kernel at ``cand`` (which is not in `Expected.targeted`)."""
  if config.modules_to_save is not None and targets.name_matches(config.modules_to_save, cand.module):
    return (
      f"its module is in `modules_to_save`={config.modules_to_save!r}, which trains it in full (the adapter "
      "tree holds a plain copy of the leaf there, not lora_A/lora_B)"
    )
  if config.exclude_modules is not None and targets.name_matches(config.exclude_modules, cand.names):
    return f"`exclude_modules`={config.exclude_modules!r} excludes it"
  if len(cand.shape) < 2:
    return f"it is a {len(cand.shape)}-D leaf (a bias or norm scale), which LoRA never adapts"
  if config.target_modules == ALL_LINEAR:
    return "'all-linear' never adapts the output head (lm_head, head, classifier, score)"
  return f"no `target_modules` entry matches it ({config.target_modules!r})"


def check_targeted(cand: targets.Candidate, expect: Expected, config: LoraConfig) -> None:
  """Refuses an adapter on an integer kernel or on one ``config`` does not adapt."""
  where = paths.to_str(cand.path)
  if not jax.numpy.issubdtype(cand.dtype, jax.numpy.floating):
    raise targets.integer_kernel_error(where, cand.dtype, "The adapter tree has an adapter on")
  if cand.path not in expect.targeted:
    raise ValueError(
      f"The adapter tree has an adapter at {where!r}, but the config does not adapt that kernel: "
      f"{why_not_targeted(cand, config)}. Use the config the adapter was made with, or drop that entry "
      "from the adapter tree."
    )


def check_saved(path: paths.Path, expect: Expected, config: LoraConfig) -> None:
  """Refuses a plain array in the adapter tree where the config expects no `modules_to_save` copy."""
  where = paths.to_str(path)
  if path in expect.targeted:
    raise ValueError(
      f"The adapter tree holds a plain array at {where!r}, where the config adapts the kernel with LoRA "
      "({'lora_A': ..., 'lora_B': ...} expected). Was it built by hand, or with another config? Make it "
      "with `jlora.init`."
    )
  if path not in expect.saved:
    raise ValueError(
      f"The adapter tree holds a full copy of {where!r}, but `modules_to_save`="
      f"{config.modules_to_save!r} does not name its module"
      + (f" and `bias`={config.bias!r} does not train it" if str(path[-1]) == "bias" else "")
      + ", so merging it would silently replace a base leaf. Use the config the adapter was made with, "
      "or drop that entry."
    )


def check_complete(
  expect: Expected, adapted: Collection[paths.Path], saved: Collection[paths.Path], config: LoraConfig
) -> None:
  """Refuses an adapter tree that lacks adapters or `modules_to_save` copies the config calls for."""
  missing = [paths.to_str(p) for p in expect.required if p not in adapted]
  if missing:
    how = "`jlora.init`"
    if config.target_modules == ALL_LINEAR:
      how += (
        " given the model (`apply_fn=`, `example_args=`), so it finds every weight used as a linear layer"
      )
    raise ValueError(
      f"The adapter tree has no adapter for {_some(missing)}, which the config targets "
      f"({targeting(config)}): the kernel would be left unadapted. Use the config the adapter was made "
      f"with, or make the missing adapters with {how}."
    )
  adapted = set(adapted)
  want = {p for p in expect.saved if p not in expect.bias_of or expect.bias_of[p] & adapted}
  missing = [paths.to_str(p) for p in sorted(want - set(saved), key=paths.to_str)]
  if missing:
    raise ValueError(
      f"The adapter tree has no trained copy of {_some(missing)}, whose module `modules_to_save`="
      f"{config.modules_to_save!r} names (or which `bias`={config.bias!r} trains). Use the config the "
      "adapter was made with, or make the adapter with `jlora.init`, which copies these leaves."
    )
  extra = [paths.to_str(p) for p in saved if p in expect.bias_of and not expect.bias_of[p] & adapted]
  if extra:
    raise ValueError(
      f"The adapter tree holds a trained copy of bias {_some(extra)}, but `bias`='lora_only' trains only "
      "the biases of adapted modules and its module has no adapter. Drop that entry, or use `bias='all'`."
    )


def _some(names: list[str]) -> str:
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return f"{names[:_SHOWN]}{more}"


def has_adapter(tree: Any) -> bool:
  """Whether ``tree`` holds at least one ``{"lora_A", "lora_B"}`` adapter (stops at the first)."""
  return any(paths.is_adapter(node) for _, node in paths.adapter_items(tree))


def describe(x: Any) -> str:
  """A short description of a value, for messages."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
  return type(x).__name__


def check_adapter_tree(lora: Any) -> list[tuple[paths.Path, Any]]:
  """The entries of an adapter tree, after refusing one that is none (wrong type, empty, no adapter)."""
  if not isinstance(lora, Mapping):
    raise TypeError(
      f"`lora` must be the adapter tree (a nested dict from `jlora.init`, with {{'lora_A', 'lora_B'}} at "
      f"each adapted kernel); got {describe(lora)}."
    )
  items = list(paths.adapter_items(lora))
  if not any(paths.is_adapter(node) for _, node in items):
    what = "is empty" if not items else "holds no adapter (no {'lora_A', 'lora_B'} dict)"
    hint = " Is it the base tree? The base comes first, the adapter tree second." if items else ""
    raise ValueError(
      f"The adapter tree {what}: nothing would be adapted.{hint} Pass the tree `jlora.init` made (and "
      "training updated)."
    )
  return items


def check_call_order(tree: Any, lora: Any, args: tuple[Any, ...]) -> None:
  """Names a swap of the base and adapter trees in a wrapped apply's call, when ``lora`` holds no
  adapter; cheap in the usual case (it stops at the first adapter of ``lora``)."""
  if has_adapter(lora):
    return
  call = "apply(tree, lora, *args, **kwargs)"
  if has_adapter(tree):
    raise ValueError(
      f"The first argument of the wrapped apply is an adapter tree (it holds lora_A/lora_B) and the second "
      f"is {describe(lora)}: the base and adapter trees are swapped. Call it as {call}, the base first."
    )
  for i, arg in enumerate(args):
    if has_adapter(arg):
      raise ValueError(
        f"The adapter tree was passed as argument {i + 3} of the wrapped apply, and its second argument is "
        f"{describe(lora)}. Call it as {call}: the base tree, then the adapter tree, then the model's inputs."
      )


def call_signature(fn: Any, plain: inspect.Signature) -> inspect.Signature:
  """The signature of ``wrap(fn, cfg)``: ``fn``'s, with ``lora`` after its first parameter (of the
  same kind) and a keyword-only ``lora_dropout_key`` before ``**kwargs``; ``plain`` when ``fn``'s
  signature cannot be read or extended (no first positional parameter, a name clash)."""
  try:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    first = params[0]
    if first.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
      return plain
    lora = inspect.Parameter("lora", first.kind, annotation=Any)
    key = inspect.Parameter(
      "lora_dropout_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=jax.Array | None
    )
    rest = params[1:]
    at = len(rest) - (1 if rest and rest[-1].kind is inspect.Parameter.VAR_KEYWORD else 0)
    return sig.replace(parameters=[first, lora, *rest[:at], key, *rest[at:]])
  except (TypeError, ValueError, IndexError):
    return plain
