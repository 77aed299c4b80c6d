"""`summary` and `count_params`: trainable and total parameter counts."""

from __future__ import annotations

import math
from typing import Any

import jax


def count_params(tree: Any) -> int:
  """The number of scalars in the array leaves of ``tree``.

  Args:
    tree: any pytree; leaves with a ``shape`` count ``prod(shape)`` (a
      ``jax.ShapeDtypeStruct`` too, so abstract trees from ``jax.eval_shape``
      count without allocating), Python scalars count 1.

  Returns:
    The total, an ``int``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> jlora.count_params({"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)})
    36
    >>> jlora.count_params(jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16))
    16777216
  """
  return sum(math.prod(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(tree))


def summary(tree: Any, lora: Any) -> str:
  """PEFT's ``print_trainable_parameters`` line for a base tree and its adapter.

  As in PEFT, "all params" counts the base model and the adapter together, and
  only the adapter (with any `modules_to_save` copies) is trainable.

  Args:
    tree: the base tree.
    lora: the adapter tree.

  Returns:
    ``"trainable params: 1,048,576 || all params: 7,242,780,672 || trainable%: 0.0145"``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> jlora.summary({"w": {"kernel": jnp.zeros((8, 8))}},
    ...               {"w": {"kernel": {"lora_A": jnp.zeros((8, 2)), "lora_B": jnp.zeros((2, 8))}}})
    'trainable params: 32 || all params: 96 || trainable%: 33.3333'
  """
  trainable = count_params(lora)
  total = count_params(tree) + trainable
  pct = 100.0 * trainable / total if total else 0.0
  return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
