"""Flax NNX models: a split that cannot alias the model, and a merged model for serving.

Since flax 0.12 the ``State`` that ``nnx.split(model)`` and ``nnx.state(model)``
return holds the model's own ``Variable`` objects, and ``nnx.merge(graphdef,
state)`` builds a model around those same objects. Whatever later changes the
model (``nnx.update``, an ``nnx.Optimizer`` step, a BatchNorm call in training
mode) changes that state too: ``nnx.update(model, jlora.merge(state, lora,
cfg))`` puts the merged kernels into the frozen base, and the wrapped apply then
adds the adapter a second time.

`nnx_split` and `nnx_merge` never share a ``Variable`` with anything the caller
holds. They share the arrays, which JAX never changes in place, so nothing is
copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jlora._src.adapters.merge import merge
from jlora._src.core.config import LoraConfig


def _detach(state: Any) -> Any:
  # Rebuilding the tree makes a new Variable around each array, so the result
  # shares no mutable container with its source.
  return jax.tree_util.tree_map(lambda x: x, state)


def _check_module(model: Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"`model` must be a `flax.nnx.Module`; got {type(model).__name__}. For Flax Linen, wrap "
      "`model.apply`; for a plain function, wrap it directly."
    )


def nnx_split(model: nnx.Module) -> tuple[Any, Any, Callable[..., Any]]:
  """Splits an NNX model into a graphdef, a detached state and a pure apply function.

  Like ``nnx.split(model)``, but the state shares no ``Variable`` with
  ``model``: training, updating or merging into ``model`` afterwards leaves it
  as it was. Use it as the frozen base tree of `jlora.init`, `jlora.wrap` and
  `jlora.merge`.

  Args:
    model: a ``flax.nnx.Module``. It is not changed.

  Returns:
    ``(graphdef, state, apply_fn)``: ``graphdef`` and ``state`` as
    ``nnx.split`` gives them (``state`` detached), and
    ``apply_fn(state, *args, **kwargs)``, which calls a model built from
    ``graphdef`` and a detached copy of ``state`` — the function to pass to
    `jlora.wrap` (and to `jlora.init` as ``apply_fn=``). It returns only the
    model's output: changes the call makes to the model's own state (batch
    statistics, RNG counters) are dropped, and ``state`` is never changed.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.q_proj = nnx.Linear(4, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.q_proj(x)
    >>> model = Block(nnx.Rngs(0))
    >>> graphdef, state, apply_fn = jlora.nnx_split(model)
    >>> state["q_proj"]["kernel"] is model.q_proj.kernel  # True for nnx.split(model)
    False
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(state, cfg, key=jax.random.key(1))
    >>> y = jlora.wrap(apply_fn, cfg)(state, lora, jnp.ones((2, 4)))
    >>> y.shape
    (2, 3)
  """
  _check_module(model)
  graphdef, state = nnx.split(model)

  def apply_fn(state: Any, *args: Any, **kwargs: Any) -> Any:
    return nnx.merge(graphdef, _detach(state))(*args, **kwargs)

  return graphdef, _detach(state), apply_fn


def nnx_merge(graphdef: Any, state: Any, lora: Any, config: LoraConfig, *, safe_merge: bool = False) -> Any:
  """A new NNX model with the adapter merged into its kernels, for serving.

  ``nnx.merge(graphdef, jlora.merge(state, lora, config))`` around fresh
  ``Variable`` objects: ``state`` and ``lora`` stay as they were whatever is
  done to the returned model, so training can go on from them. Kernels are
  ``W + scale * A @ B`` as in `jlora.merge` (accumulated in float32, cast
  back to the kernel's dtype).

  Args:
    graphdef: the graphdef from `nnx_split` (or ``nnx.split``).
    state: the base state the adapter was made for.
    lora: the adapter tree from `jlora.init` (or training).
    config: the config the adapter was made with.
    safe_merge: first check every adapter weight is finite (see `jlora.merge`).

  Returns:
    An ``nnx.Module`` that computes what ``jlora.wrap(apply_fn, config)(state,
    lora, ...)`` computes, with no adapter at run time.

  Raises:
    ValueError: if the adapter does not fit ``state`` (naming the path), or,
      with ``safe_merge``, holds a non-finite value.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.q_proj = nnx.Linear(4, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.q_proj(x)
    >>> graphdef, state, apply_fn = jlora.nnx_split(Block(nnx.Rngs(0)))
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(state, cfg, key=jax.random.key(1))
    >>> serving = jlora.nnx_merge(graphdef, state, lora, cfg)
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.allclose(serving(x), jlora.wrap(apply_fn, cfg)(state, lora, x), rtol=1e-5, atol=1e-6))
    True
  """
  return nnx.merge(graphdef, _detach(merge(state, lora, config, safe_merge=safe_merge)))
