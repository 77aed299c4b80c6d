"""Freezing the base with optax when one combined tree is trained.

The combined tree is ``{"base": tree, "lora": lora}`` (`combine`). Training the
adapter tree on its own needs none of this: any optax optimizer works on it
directly. These helpers are for training loops that carry a single tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

BASE = "base"
LORA = "lora"


def combine(tree: Any, lora: Any) -> dict[str, Any]:
  """``{"base": tree, "lora": lora}``: one tree holding the base and its adapter.

  Nothing is copied. Train it with `freeze_base` (or `optax.masked` over
  `trainable_mask`) and split it back with `split`.

  Args:
    tree: the base tree (Linen variables, NNX state or a plain dict).
    lora: its adapter tree from `jlora.init`.

  Returns:
    ``{"base": tree, "lora": lora}``, holding the caller's own arrays.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> c = jlora.combine({"w": jnp.ones(2)}, {"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}})
    >>> sorted(c)
    ['base', 'lora']
  """
  return {BASE: tree, LORA: lora}


def _check(combined: Any) -> None:
  if not (isinstance(combined, Mapping) and set(combined.keys()) == {BASE, LORA}):
    keys = sorted(map(str, combined.keys())) if isinstance(combined, Mapping) else type(combined).__name__
    raise TypeError(
      f"Expected a combined tree {{'base': tree, 'lora': lora}} from `jlora.combine`; got {keys}. "
      "To train an adapter tree alone, pass it to the optax optimizer directly."
    )


def split(combined: Any) -> tuple[Any, Any]:
  """Inverse of `combine`: ``(tree, lora)``.

  Args:
    combined: ``{"base": tree, "lora": lora}`` (see `combine`), e.g. after
      ``optax.apply_updates``.

  Returns:
    ``(tree, lora)``, the two halves as they are (nothing is copied).

  Raises:
    TypeError: if ``combined`` is not a dict with exactly the keys ``"base"``
      and ``"lora"``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> base, lora = {"w": jnp.ones(2)}, {"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}}
    >>> jlora.split(jlora.combine(base, lora)) == (base, lora)
    True
    >>> jlora.split(lora)
    Traceback (most recent call last):
    TypeError: Expected a combined tree {'base': tree, 'lora': lora} from `jlora.combine`; got ['w']. ...
  """
  _check(combined)
  return combined[BASE], combined[LORA]


def trainable_mask(combined: Any) -> dict[str, Any]:
  """A boolean tree for `optax.masked`: ``True`` on every adapter leaf
  (``lora_A``, ``lora_B`` and `modules_to_save` copies), ``False`` on the base.

  Args:
    combined: ``{"base": tree, "lora": lora}`` (see `combine`).

  Returns:
    A tree of bools with the structure of ``combined``.

  Raises:
    TypeError: if ``combined`` is not a combined tree.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> c = jlora.combine({"w": jnp.ones(2)}, {"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}})
    >>> jlora.trainable_mask(c)
    {'base': {'w': False}, 'lora': {'w': {'lora_A': True, 'lora_B': True}}}
  """
  _check(combined)
  return {
    BASE: jax.tree_util.tree_map(lambda _: False, combined[BASE]),
    LORA: jax.tree_util.tree_map(lambda _: True, combined[LORA]),
  }


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optimizer`` on the adapter leaves of a combined tree; zero updates on the base.

  Built on `optax.partition`: the base gets `optax.set_to_zero` and keeps no
  optimizer state, so after any number of ``optax.apply_updates`` the base
  params are bit-identical to what they were.

  Args:
    optimizer: any optax optimizer (e.g. ``optax.adamw(1e-3)``).

  Returns:
    A `GradientTransformation` over ``{"base": tree, "lora": lora}``.

  Raises:
    TypeError: from its ``init`` and ``update``, if the params are not a
      combined tree (an adapter tree alone needs no freezing: pass it to
      ``optimizer`` directly).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> c = jlora.combine({"w": jnp.ones(2)}, {"w": {"lora_A": jnp.ones((2, 1)), "lora_B": jnp.ones((1, 2))}})
    >>> opt = jlora.freeze_base(optax.sgd(0.1))
    >>> updates, _ = opt.update(jax.tree_util.tree_map(jnp.ones_like, c), opt.init(c), c)
    >>> updates["base"]["w"].tolist()
    [0.0, 0.0]
  """

  def labels(params: Any) -> dict[str, Any]:
    mask = trainable_mask(params)
    return jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)

  return optax.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
