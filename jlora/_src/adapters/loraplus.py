"""LoRA+: a larger learning rate for the ``B`` factors (PEFT's `create_loraplus_optimizer`).

LoRA+ (Hayou et al., 2024) trains ``B`` with ``loraplus_lr_ratio`` times the
learning rate of ``A``. The parameter groups are PEFT's:

* ``A``: every ``lora_A``, and `modules_to_save` copies of two or more
  dimensions: ``learning_rate``, weight decay ``loraplus_weight_decay``;
* ``B``: every ``lora_B``, and 1-D `modules_to_save` copies:
  ``learning_rate * loraplus_lr_ratio``, weight decay
  ``loraplus_weight_decay``, except biases and norm scales, which get none;
* ``embedding``: both factors of an embedding's adapter:
  ``loraplus_lr_embedding``, weight decay ``loraplus_weight_decay``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from jlora._src.core import paths, targets

_NO_DECAY = frozenset({"bias", "scale"})


def _label(path: paths.Path, leaf: Any) -> str:
  if len(path) >= 2 and path[-1] in (paths.LORA_A, paths.LORA_B):
    if str(path[-2]) in targets.EMBEDDING_LEAVES:
      return "embedding"
    return "a" if path[-1] == paths.LORA_A else "b"
  if path and path[-1] == paths.LORA_MAGNITUDE:  # PEFT's magnitude vectors are 1-D: group B
    return "b"
  if getattr(leaf, "ndim", 0) == 1:  # a trained 1-D leaf (modules_to_save): PEFT's group B
    return "b_no_decay" if str(path[-1]) in _NO_DECAY else "b"
  return "a"


def loraplus_labels(lora: Any) -> Any:
  """The LoRA+ group of every leaf of an adapter tree.

  Args:
    lora: an adapter tree.

  Returns:
    A tree of the same structure holding ``"a"``, ``"b"``, ``"b_no_decay"``
    or ``"embedding"`` (see the module doc).
  """
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: _label(paths.normalize(kp), leaf), lora)


def _scaled(learning_rate: float | optax.Schedule, ratio: float) -> float | optax.Schedule:
  if callable(learning_rate):
    return lambda count: ratio * learning_rate(count)
  return ratio * learning_rate


def loraplus(
  optimizer: Callable[..., optax.GradientTransformation],
  *,
  learning_rate: float | optax.Schedule,
  loraplus_lr_ratio: float,
  loraplus_lr_embedding: float = 1e-6,
  loraplus_weight_decay: float = 0.0,
  **kwargs: Any,
) -> optax.GradientTransformation:
  """An optax optimizer for an adapter tree with LoRA+'s learning rates (PEFT's groups; module doc).

  Use it as any optax optimizer on the adapter tree, or inside
  `jlora.freeze_base` for a combined tree.

  Args:
    optimizer: an optax optimizer factory taking ``learning_rate`` (and
      ``weight_decay``, when ``loraplus_weight_decay`` is not zero), e.g.
      ``optax.adamw``.
    learning_rate: the learning rate of ``A`` (a float or an optax schedule).
    loraplus_lr_ratio: ``B``'s learning rate over ``A``'s (LoRA+ suggests 16).
    loraplus_lr_embedding: the learning rate of embedding adapters.
    loraplus_weight_decay: the weight decay of every group but biases and
      norm scales.
    **kwargs: passed on to ``optimizer`` (``b1``, ``eps`` ...).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: if ``loraplus_lr_ratio`` is not positive, or weight decay is
      asked of an optimizer without a ``weight_decay`` argument.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> opt = jlora.loraplus(optax.sgd, learning_rate=0.1, loraplus_lr_ratio=16.0)
    >>> grads = jax.tree_util.tree_map(jnp.ones_like, lora)
    >>> updates, _ = opt.update(grads, opt.init(lora), lora)
    >>> step = lambda name: round(float(updates["q_proj"]["kernel"][name][0, 0]), 6)
    >>> step("lora_A"), step("lora_B")
    (-0.1, -1.6)
  """
  if not (isinstance(loraplus_lr_ratio, (int, float)) and loraplus_lr_ratio > 0):
    raise ValueError(f"`loraplus_lr_ratio` must be a positive number; got {loraplus_lr_ratio!r}.")
  takes_decay = "weight_decay" in inspect.signature(optimizer).parameters
  if loraplus_weight_decay and not takes_decay:
    raise ValueError(
      f"`loraplus_weight_decay`={loraplus_weight_decay} needs an optimizer with a `weight_decay` argument "
      f"(such as optax.adamw); {getattr(optimizer, '__name__', optimizer)!r} has none."
    )

  def make(lr: float | optax.Schedule, decay: float) -> optax.GradientTransformation:
    return optimizer(learning_rate=lr, **({"weight_decay": decay} if takes_decay else {}), **kwargs)

  b_lr = _scaled(learning_rate, loraplus_lr_ratio)
  transforms = {
    "a": make(learning_rate, loraplus_weight_decay),
    "b": make(b_lr, loraplus_weight_decay),
    "b_no_decay": make(b_lr, 0.0),
    "embedding": make(loraplus_lr_embedding, loraplus_weight_decay),
  }
  return optax.multi_transform(transforms, loraplus_labels)
