"""`init`: the public entry point that builds an adapter tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jlora._src import adapters, targets
from jlora._src.config import LoraConfig
from jlora._src.wrap import infer_layouts


def init(
  tree: Any,
  config: LoraConfig,
  *,
  key: jax.Array,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """Creates the trainable LoRA adapter tree for ``tree``.

  The result is a new plain nested dict mirroring the paths of the adapted
  kernels only: ``{"lora_A": A, "lora_B": B}`` at each kernel's path, plus
  trainable copies of `modules_to_save` leaves. ``tree`` is neither copied
  nor modified. Each adapter draws from its own split of ``key``.

  Shapes: kernel ``(*stacked, *fan_in, *fan_out)`` -> ``lora_A``
  ``(*stacked, *fan_in, r)`` and ``lora_B`` ``(*stacked, r, *fan_out)``; the
  stacked axis shrinks to the selected layers under `layers_to_transform`.
  2-D kernels are ``(in, out)``. For kernels of three or more dimensions the
  split is read from how the model contracts them: pass ``apply_fn`` and
  example inputs (arrays or ``jax.ShapeDtypeStruct``; nothing is computed),
  or set ``config.layout_pattern``.

  Args:
    tree: the base tree: Linen variables (``{"params": ...}``), an NNX
      ``State``, or a nested dict of arrays.
    config: the LoRA config.
    key: a PRNG key.
    apply_fn: the model's apply function, ``apply_fn(tree, *example_args,
      **example_kwargs)``; needed only to read N-D kernel layouts.
    example_args: example positional inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.

  Returns:
    The adapter tree.

  Raises:
    ValueError: if a target matches nothing (listing close names and real
      module paths), or an N-D kernel's layout is unknown or ambiguous.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"layers_0": {"q_proj": {"kernel": jnp.zeros((16, 32))},
    ...                        "k_proj": {"kernel": jnp.zeros((16, 32))}}}
    >>> cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> jax.tree_util.tree_map(jnp.shape, lora)
    {'layers_0': {'q_proj': {'kernel': {'lora_A': (16, 4), 'lora_B': (4, 32)}}}}
  """
  layouts = None
  if apply_fn is not None:
    wanted = [c.path for c in targets.match_targets(tree, config) if len(c.shape) >= 3]
    if wanted:
      layouts = infer_layouts(apply_fn, tree, *example_args, only=wanted, **(example_kwargs or {}))
  return adapters.init_adapters(tree, config, key=key, layouts=layouts)
