"""Target matching: which leaves of a tree a `LoraConfig` adapts.

PEFT's rules, on module paths (see `jlora._src.core.paths`):

* a list of names matches a module whose path equals a name or ends with
  ``/name`` (so ``proj`` does not match ``q_proj``);
* a single string is a regex that must match the whole module path;
* ``"all-linear"`` matches, when the model is known, every weight that a
  ``dot_general`` uses as a weight, whatever its leaf name (``kernel``, ``w``,
  ``weight``, a bare parameter), except the output head and embeddings, as
  PEFT defines all-linear; without the model it falls back to every leaf
  named ``kernel`` except the output head.

A weight has two names that entries match: its *module path*
(``layer_0/mlp``) and its *parameter path* (``layer_0/mlp/linear``), so one of
several weights in a module can be targeted alone, as PEFT's
``target_parameters`` does.

Only floating leaves of two or more dimensions are adaptable; biases, norm
scales and other 1-D leaves never are.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._src.core import paths
from jlora._src.core.config import ALL_LINEAR, LoraConfig

_NEVER_ADAPTED = frozenset({"bias", "scale", "mean", "var", "count"})
_HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score"})
_HEAD_LEAVES = frozenset({"reverse_embeddings"})  # keras-hub's untied output head
# Flax nn.Embed; gemma and tunix; keras (keras-hub) Embedding / ReversibleEmbedding
EMBEDDING_LEAVES = frozenset({"embedding", "input_embedding", "embeddings"})
DEFAULT_LAYER_NAMES = ("layers", "layer", "h", "blocks", "block", "decoder_layers")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """An adaptable leaf: its path, module path and abstract value."""

  path: paths.Path
  module: str
  shape: tuple[int, ...]
  dtype: Any

  @property
  def leaf_name(self) -> str:
    return str(self.path[-1])

  @property
  def param(self) -> str:
    """The parameter path: the module path and the leaf name."""
    return f"{self.module}/{self.leaf_name}" if self.module else self.leaf_name

  @property
  def names(self) -> tuple[str, str]:
    """The names target patterns match: module path and parameter path."""
    return (self.module, self.param)


def _is_adaptable(leaf_name: str, leaf: Any) -> bool:
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  if shape is None or dtype is None or len(shape) < 2:
    return False
  return leaf_name not in _NEVER_ADAPTED and jnp.issubdtype(dtype, np.floating)


def _integer_kernels(tree: Any) -> list[Candidate]:
  """Leaves of two or more dimensions with an integer dtype (quantized kernels): never adaptable."""
  collections = paths.is_collections(tree)
  return [
    Candidate(path, paths.module_path(path, collections), tuple(leaf.shape), leaf.dtype)
    for path, leaf in param_leaves(tree)
    if len(getattr(leaf, "shape", ())) >= 2
    and getattr(leaf, "dtype", None) is not None
    and jnp.issubdtype(leaf.dtype, np.integer)
    and str(path[-1]) not in _NEVER_ADAPTED
  ]


def integer_kernel_error(where: str, dtype: Any, what: str) -> ValueError:
  """The error for LoRA on an integer (quantized) kernel."""
  return ValueError(
    f"{what} {where!r}, an integer ({jnp.dtype(dtype).name}) kernel: LoRA cannot adapt an integer "
    "(quantized) kernel, since W + scale * A @ B does not fit an integer dtype (a merge would saturate "
    "or wrap around). Dequantize it to a float dtype first, or leave its module out of `target_modules` "
    "(or add it to `exclude_modules`)."
  )


def candidates(tree: Any) -> list[Candidate]:
  """Every adaptable leaf of ``tree`` (Linen: only in the ``params`` collection)."""
  collections = paths.is_collections(tree)
  return [
    Candidate(path, paths.module_path(path, collections), tuple(leaf.shape), leaf.dtype)
    for path, leaf in param_leaves(tree)
    if _is_adaptable(str(path[-1]), leaf)
  ]


def module_paths(tree: Any) -> dict[str, dict[str, tuple[int, ...]]]:
  """The modules of ``tree`` that `target_modules` can name, with their kernels' shapes.

  Args:
    tree: a Linen variables dict, an NNX state or a nested dict of arrays.

  Returns:
    ``{module_path: {leaf_name: shape}}`` for every module holding an
    adaptable (floating, two or more dimensions) leaf, in tree order.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> jlora.module_paths({"layers_0": {"q_proj": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}})
    {'layers_0/q_proj': {'kernel': (4, 8)}}
  """
  out: dict[str, dict[str, tuple[int, ...]]] = {}
  for c in candidates(tree):
    out.setdefault(c.module, {})[c.leaf_name] = c.shape
  return out


def param_leaves(tree: Any) -> list[tuple[paths.Path, Any]]:
  """The leaves of ``tree`` that hold parameters: Linen's ``params`` collection, or all."""
  collections = paths.is_collections(tree)
  return [
    (path, leaf)
    for path, leaf in paths.leaves_with_paths(tree)
    if len(path) >= 2 and (not collections or path[0] == "params")
  ]


def all_module_paths(tree: Any) -> list[str]:
  collections = paths.is_collections(tree)
  return list(dict.fromkeys(paths.module_path(path, collections) for path, _ in param_leaves(tree)))


def name_matches(spec: tuple[str, ...] | str, names: str | tuple[str, ...]) -> bool:
  """PEFT's rule: a list matches by path suffix, a string as a full-match regex; any of ``names``."""
  names = (names,) if isinstance(names, str) else names
  if isinstance(spec, str):
    return any(re.fullmatch(spec, n) is not None for n in names)
  return any(n == entry or n.endswith("/" + entry) for entry in spec for n in names)


def layer_index(module: str, layers_pattern: tuple[str, ...] | None) -> int | None:
  """The layer index in a module path: ``layers_3`` or ``layers/3`` -> 3."""
  names = layers_pattern or DEFAULT_LAYER_NAMES
  parts = module.split("/")
  for i, part in enumerate(parts):
    for name in names:
      if part == name and i + 1 < len(parts) and parts[i + 1].isdigit():
        return int(parts[i + 1])
      m = re.fullmatch(rf"{re.escape(name)}_(\d+)", part)
      if m:
        return int(m.group(1))
  return None


def _unmatched_error(field: str, spec: str, modules: list[str]) -> ValueError:
  modules = [m for m in modules if m]  # a top-level module's path is '': its parameter paths are listed
  names = sorted({m.split("/")[-1] for m in modules})
  close = difflib.get_close_matches(spec.rsplit("/", maxsplit=1)[-1], names, n=5, cutoff=0.5)
  sample = modules[:12]
  msg = f"`{field}` entry {spec!r} matches no module of the tree."
  if close:
    msg += f" Close module names: {close}."
  msg += (
    f" Some module paths that exist: {sample}"
    + (" ..." if len(modules) > len(sample) else "")
    + ". A list entry matches a module whose path equals it or ends with '/<entry>'; "
    "a string is a regex that must match the whole path."
  )
  return ValueError(msg)


def is_head(cand: Candidate) -> bool:
  """Whether a weight is the model's output head (a module named like PEFT's heads)."""
  return cand.module.rsplit("/", maxsplit=1)[-1] in _HEAD_NAMES or cand.leaf_name in _HEAD_LEAVES


def _check_entries(tree: Any, config: LoraConfig, cands: list[Candidate], modules: list[str]) -> None:
  """Raises for a `target_modules` entry (a list's names, or the one regex) that matches an integer
  (quantized) kernel, no module, or only modules with no adaptable kernel."""
  spec = config.target_modules
  entries = (spec,) if isinstance(spec, str) else spec
  params = [c.param for c in cands]
  skip = tuple(m for m in (config.exclude_modules, config.modules_to_save) if m is not None)
  integer = [c for c in _integer_kernels(tree) if not any(name_matches(m, c.names) for m in skip)]
  floats = {c.module for c in cands}
  for entry in entries:
    sub = entry if isinstance(spec, str) else (entry,)
    # An integer kernel named by its parameter path, or the only kernel of a module named.
    ints = [
      c
      for c in integer
      if name_matches(sub, c.param) or (name_matches(sub, c.module) and c.module not in floats)
    ]
    if ints:
      what = f"`target_modules` entry {entry!r} matches"
      raise integer_kernel_error(paths.to_str(ints[0].path), ints[0].dtype, what)
    if not any(name_matches(sub, m) for m in modules + params):
      raise _unmatched_error("target_modules", entry, modules + params)
    if not any(name_matches(sub, c.names) for c in cands):
      raise ValueError(
        f"`target_modules` entry {entry!r} matches modules with no adaptable kernel "
        f"(only 1-D leaves such as biases or norm scales, which are never adapted): "
        f"{[m for m in modules if name_matches(sub, m)][:8]}."
      )


def match_targets(
  tree: Any, config: LoraConfig, linear: Collection[paths.Path] | None = None
) -> list[Candidate]:
  """The leaves ``config`` adapts, in tree order, before layout and layer selection.

  Args:
    tree: the base tree.
    config: the LoRA config.
    linear: the paths of the weights the model uses in a ``dot_general``
      (and not in a convolution or a lookup), when the model is known: what
      ``"all-linear"`` adapts. ``None``: ``"all-linear"`` falls back to the
      leaves named ``kernel``.

  Raises:
    ValueError: if a `target_modules` entry matches no module (listing close
      names and a sample of real module paths), matches an integer
      (quantized) kernel, or matches only modules with no adaptable kernel.
  """
  cands = candidates(tree)
  modules = all_module_paths(tree)
  spec = config.target_modules
  if spec == ALL_LINEAR:
    chosen = [
      c
      for c in cands
      if (c.path in linear if linear is not None else c.leaf_name == "kernel") and not is_head(c)
    ]
  else:
    _check_entries(tree, config, cands, modules)
    chosen = [c for c in cands if name_matches(spec, c.names)]
  if config.exclude_modules is not None:
    chosen = [c for c in chosen if not name_matches(config.exclude_modules, c.names)]
  if config.modules_to_save is not None:
    chosen = [c for c in chosen if not name_matches(config.modules_to_save, c.names)]
  # A top-level leaf's module path is '': show parameter paths where a module path is empty.
  shown = [m for m in modules if m] or [c.param for c in cands]
  if not chosen and spec == ALL_LINEAR and linear is not None:
    raise ValueError(
      "`target_modules='all-linear'` found no weight the model uses as a linear layer other than "
      "the output head (convolutions and embedding lookups are not linear layers, as in PEFT); "
      f"name the modules to adapt in `target_modules`. Module paths: {shown[:12]}."
    )
  if not chosen and spec == ALL_LINEAR and not any(c.leaf_name == "kernel" and not is_head(c) for c in cands):
    raise ValueError(
      "`target_modules='all-linear'` without the model only sees leaves named `kernel` (it cannot tell "
      "which other weights are used as linear layers), and this tree has none outside the output head; "
      f"its weights: {[c.param for c in cands][:12]}. Pass the model to `jlora.init` "
      "(`apply_fn=model.apply, example_args=(x,)`) so 'all-linear' finds every weight the model uses as a "
      "linear layer whatever its name, or name the weights in `target_modules`."
    )
  if not chosen:
    raise ValueError(
      f"`target_modules`={spec!r} with `exclude_modules`={config.exclude_modules!r} and "
      f"`modules_to_save`={config.modules_to_save!r} leaves nothing to adapt (a module in "
      "`modules_to_save` is trained in full, not adapted). Some module paths that exist: "
      f"{shown[:12]}."
    )
  return chosen


def saved_module_paths(tree: Any, config: LoraConfig) -> list[paths.Path]:
  """Leaf paths trained in full because their module is in `modules_to_save`.

  Raises:
    ValueError: if a `modules_to_save` entry matches no module.
  """
  if config.modules_to_save is None:
    return []
  collections = paths.is_collections(tree)
  modules = all_module_paths(tree)
  for entry in config.modules_to_save:
    if not any(name_matches((entry,), m) for m in modules):
      raise _unmatched_error("modules_to_save", entry, modules)
  return [
    path
    for path, _ in param_leaves(tree)
    if name_matches(config.modules_to_save, paths.module_path(path, collections))
  ]


def bias_paths(tree: Any, config: LoraConfig, modules: Collection[str] | None = None) -> list[paths.Path]:
  """The biases ``config.bias`` trains (PEFT's ``bias``): with ``"all"`` every parameter leaf named
  ``bias``, with ``"lora_only"`` those of the given adapted ``modules`` (module paths), with
  ``"none"`` none."""
  if config.bias == "none":
    return []
  collections = paths.is_collections(tree)
  return [
    path
    for path, leaf in param_leaves(tree)
    if str(path[-1]) == "bias"
    and hasattr(leaf, "shape")
    and (config.bias == "all" or paths.module_path(path, collections) in (modules or ()))
  ]
