"""The interpreter's fallback: a kernel view as a plain array, ``W + scale * A @ B``, with a warning.

A rule that cannot factor a use returns ``None``, and the interpreter
materialises the kernel views among the equation's inputs for that use only
(`materialize`); control-flow rules do the same for values that leave their
bodies (`plain_outputs`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from jlora._src.interpret import values as V
from jlora._src.interpret.context import Context
from jlora._src.interpret.rules import routing
from jlora._src.interpret.values import LoraValue, Probe, QuantView

__all__ = ["MaterializationWarning", "materialize", "plain_outputs"]


class MaterializationWarning(UserWarning):
  """An adapted kernel had to be materialised as ``W + scale * A @ B`` for one use.

  The result is still exact; the warning (once per kernel) says that this use
  costs a kernel-sized temporary and gradient. Turn it into an error where that
  must never happen: ``warnings.simplefilter("error", jlora.MaterializationWarning)``.

  Example:
    >>> import warnings, jax, jax.numpy as jnp, jlora
    >>> params = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("w",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> fn = lambda p, x: jnp.sin(p["w"]["kernel"]) + x    # an elementwise use: not a product
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = jlora.wrap(fn, cfg)(params, lora, 1.0)
    >>> [w.category.__name__ for w in caught]
    ['MaterializationWarning']
  """


def materialize(x: Any, ctx: Context, why: str) -> Any:
  """A plain array for ``x``; warns once per kernel when ``x`` is a `LoraValue`.

  Raises:
    ValueError: for a bank's kernel (`jlora.stack`), which is never materialised per example, and a
      grouped convolution's (`LoraValue.check_is_kernel`).
  """
  if isinstance(x, (Probe, QuantView)):
    return V.dense_weight(x.w)
  if not isinstance(x, LoraValue):
    return x
  if x.routed is not None:
    raise routing.unroutable(x, why)
  x.check_is_kernel()
  if x.site not in ctx.warned:
    ctx.warned.add(x.site)
    warnings.warn(
      f"jlora: the adapted kernel {x.site!r} reaches {why}, which the factorized path does "
      "not cover; W + scale*A@B is materialised for that use (correct, but it costs a "
      "kernel-sized temporary and a kernel-sized gradient).",
      MaterializationWarning,
      stacklevel=2,
    )
  return x.dense()


def plain_outputs(outs: Sequence[Any], ctx: Context, why: str) -> list[Any]:
  """``outs`` as plain arrays (materialising, with a warning, any kernel view among them)."""
  return [materialize(o, ctx, why) for o in outs]
