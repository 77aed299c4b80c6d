"""`summary` and `count_params`: trainable and total parameter counts."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from jlora._src.core import paths, targets
from jlora._src.core.qarray import is_quantized


def count_params(tree: Any) -> int:
  """The number of scalars in the array leaves of ``tree``.

  Args:
    tree: any pytree; leaves with a ``shape`` count ``prod(shape)`` (a
      ``jax.ShapeDtypeStruct`` too, so abstract trees from ``jax.eval_shape``
      count without allocating; a quantized weight, `jlora.quantize`, the
      entries of the weight it stands for, as PEFT counts a 4-bit weight),
      Python scalars count 1.

  Returns:
    The total, an ``int``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> jlora.count_params({"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)})
    36
    >>> jlora.count_params(jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    16777216
  """
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)
  return sum(math.prod(getattr(x, "shape", ())) for x in leaves)


def _base_params(tree: Any) -> list[Any]:
  """The parameters of a base tree, as PyTorch's ``model.parameters()`` has them: a Linen variables
  dict's ``params`` collection (not ``batch_stats`` or other state), an NNX state's `nnx.Param`
  variables (not batch statistics or RNG state), or every leaf of any other tree."""
  if paths.is_collections(tree):
    return [tree["params"]]
  nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable) or is_quantized(x))
  return [x for x in nodes if not isinstance(x, nnx.Variable) or isinstance(x, nnx.Param)]


def _trained_bias_count(lora: Any, config: Any) -> int:
  """Scalars of the biases ``config.bias`` trains: PEFT trains the model's own, not a copy."""
  if config is None or config.bias == "none":
    return 0
  collections = paths.is_collections(lora)
  return sum(
    count_params(node)
    for path, node in paths.adapter_items(lora)
    if not paths.is_adapter(node)
    and str(path[-1]) == "bias"
    and (
      config.modules_to_save is None
      or not targets.name_matches(config.modules_to_save, paths.module_path(path, collections))
    )
  )


def summary(tree: Any, lora: Any, config: Any = None) -> str:
  """PEFT's ``print_trainable_parameters`` line for a base tree and its adapter.

  As in PEFT, "all params" counts the base model and the adapter together, and
  only the adapter (with any `modules_to_save` copies) is trainable. The
  biases a config's `bias` trains count as trainable but not again in "all
  params" (PEFT trains the model's own biases; it copies `modules_to_save`).
  The base counts its parameters only, as PyTorch's ``parameters()``: a Linen
  variables dict its ``params`` collection (BatchNorm statistics are buffers
  in PyTorch), an NNX state its `nnx.Param` variables; a quantized weight
  counts the entries it stands for (PEFT's count of a 4-bit weight).

  Args:
    tree: the base tree.
    lora: the adapter tree.
    config: its config; needed when the adapter tree holds copies of
      biases (``bias`` "all" or "lora_only", or `modules_to_save`).

  Returns:
    ``"trainable params: 1,048,576 || all params: 7,242,780,672 || trainable%: 0.0145"``.

  Raises:
    ValueError: if ``config`` is not given and the adapter tree holds copies
      of biases (which PEFT counts once or twice, by the config).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> jlora.summary({"w": {"kernel": jnp.zeros((8, 8))}},
    ...               {"w": {"kernel": {"lora_A": jnp.zeros((8, 2)), "lora_B": jnp.zeros((2, 8))}}})
    'trainable params: 32 || all params: 96 || trainable%: 33.3333'
  """
  if config is None:
    copies = [
      paths.to_str(p)
      for p, node in paths.adapter_items(lora)
      if not paths.is_adapter(node) and str(p[-1]) == "bias"
    ]
    if copies:
      raise ValueError(
        f"The adapter tree holds trained copies of biases ({copies[:3]}"
        + (f" and {len(copies) - 3} more" if len(copies) > 3 else "")
        + "): PEFT counts a bias that `bias` trains once (it trains the model's own) but a `modules_to_save` "
        "copy twice, and without the config summary cannot tell which these are. Pass the config: "
        "`jlora.summary(tree, lora, config)`."
      )
  trainable = count_params(lora)
  total = count_params(_base_params(tree)) + trainable - _trained_bias_count(lora, config)
  pct = 100.0 * trainable / total if total else 0.0
  return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
