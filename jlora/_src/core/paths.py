"""Key paths: naming the leaves of any pytree (Linen dicts, NNX state, plain dicts).

A leaf's *path* is its JAX key path with each entry reduced to its key
(``DictKey('q_proj')`` -> ``'q_proj'``, ``SequenceKey(0)`` -> ``0``), and the
trailing ``.value`` of a Flax NNX ``Variable`` dropped. The last entry is the
*leaf name* (``kernel``, ``embedding``, ``bias`` ...); the rest, joined by
``/``, is the *module path* that target patterns are matched against. In a
Linen variables dict (``{"params": ...}``) the collection name is not part of
the module path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax

from jlora._src.core.qarray import is_quantized

PathKey = str | int
Path = tuple[PathKey, ...]

LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_MAGNITUDE = "lora_magnitude"  # DoRA's magnitude vector (PEFT's ``lora_magnitude_vector``)


def _entry(k: Any) -> PathKey:
  if isinstance(k, jax.tree_util.DictKey):
    key = k.key
    return key if isinstance(key, (str, int)) else str(key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return k.key
  return str(k)


def normalize(key_path: tuple[Any, ...]) -> Path:
  """A JAX key path as a tuple of plain keys (NNX's trailing ``.value`` dropped)."""
  path = tuple(_entry(k) for k in key_path)
  if (
    len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value"
  ):
    path = path[:-1]
  return path


def to_str(path: Path) -> str:
  """``('params', 'layers_0', 'q_proj', 'kernel')`` -> ``'params/layers_0/q_proj/kernel'``."""
  return "/".join(str(k) for k in path)


def is_collections(tree: Any) -> bool:
  """Whether ``tree`` is a Linen variables dict (it has a ``"params"`` collection)."""
  return isinstance(tree, Mapping) and "params" in tree


def module_path(path: Path, collections: bool) -> str:
  """The module path of a leaf path: without the leaf name (and Linen collection)."""
  start = 1 if collections else 0
  return to_str(path[start:-1])


def leaves_with_paths(tree: Any) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of ``tree``, in flattening order; a quantized weight
  (`QuantizedArray`) is one leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  return [(normalize(kp), leaf) for kp, leaf in flat]


def nested_set(root: dict, path: Path, value: Any) -> None:
  node = root
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value


def is_adapter(node: Any) -> bool:
  """Whether ``node`` is one adapter: a mapping with exactly ``lora_A`` and ``lora_B``, and DoRA's
  ``lora_magnitude`` where the adapter has one."""
  return isinstance(node, Mapping) and set(node.keys()) in (
    {LORA_A, LORA_B},
    {LORA_A, LORA_B, LORA_MAGNITUDE},
  )


def adapter_items(lora: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
  """Walks an adapter tree: yields ``(path, {"lora_A", "lora_B"})`` for adapters and
  ``(path, array)`` for fully trained (``modules_to_save``) leaves."""
  if is_adapter(lora):
    yield prefix, lora
  elif isinstance(lora, Mapping):
    for k in sorted(lora.keys(), key=lambda x: (isinstance(x, str), str(x))):
      yield from adapter_items(lora[k], prefix + (k,))
  elif lora is not None:
    yield prefix, lora
