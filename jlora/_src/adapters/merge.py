"""`merge` and `unmerge`: fold an adapter into its base kernels and back."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters import dora, quantize
from jlora._src.adapters.bind import bind, lora_value
from jlora._src.adapters.spec import Bound, delta
from jlora._src.core import paths
from jlora._src.core.config import LoraConfig, check_config
from jlora._src.core.qarray import is_quantized


def _concrete(arr: Any) -> np.ndarray:
  if isinstance(arr, jax.core.Tracer):
    raise TypeError(
      "`safe_merge=True` inspects the adapter's values, so it cannot run under "
      "`jax.jit`/`grad`; call `jlora.merge` outside of transformations."
    )
  return np.asarray(arr, dtype=np.float32)


def _check_finite(item: Bound, base: Any, merged: Any) -> None:
  """PEFT's ``safe_merge``: the factors, then the merged kernel in its own dtype, must be finite."""
  factors = ((paths.LORA_A, item.a), (paths.LORA_B, item.b))
  for name, arr in factors + (((paths.LORA_MAGNITUDE, item.m),) if item.m is not None else ()):
    if not bool(np.all(np.isfinite(_concrete(arr)))):
      raise ValueError(
        f"Refusing to merge: {name} of the adapter at {item.spec.where!r} contains NaN or Inf. "
        "The adapter is broken (diverged training?); nothing was merged."
      )
  if not bool(np.all(np.isfinite(_concrete(merged)))):
    dtype = jnp.dtype(merged.dtype).name
    base_ok = bool(np.all(np.isfinite(_concrete(base))))
    why = (
      f"the finite kernel plus the finite update scale * A @ B exceeds the range of {dtype} "
      f"(largest finite value {float(jnp.finfo(merged.dtype).max):g})"
      if base_ok
      else "the base kernel itself holds NaN or Inf"
    )
    if base_ok and item.m is not None:
      norm = _concrete(dora.column_norm(lora_value(item)))
      if (norm == 0).any():
        why = (
          f"DoRA divides by the norm of W + scale * A @ B per output feature, and output feature "
          f"{tuple(int(i) for i in np.argwhere(norm == 0)[0])} (over the kernel's stacked and fan-out axes) "
          "is all zeros: m / 0"
        )
    raise ValueError(
      f"Refusing to merge: the merged kernel at {item.spec.where!r} ({dtype}) would contain NaN or Inf: "
      f"{why}. Nothing was merged; serve it unmerged with `jlora.wrap`, or merge into a wider dtype "
      "(cast the base tree to float32 first)."
    )


def _dense(kernel: Any) -> jax.Array:
  return kernel.dequantize(jnp.float32) if is_quantized(kernel) else kernel.astype(jnp.float32)


def _fold(tree: Any, lora: Any, config: LoraConfig, sign: float, *, safe: bool, requantize: bool) -> Any:
  """``tree`` with each adapted kernel plus (``sign`` 1, `merge`) or minus (-1, `unmerge`) its update."""
  bound, saved = bind(tree, lora, check_config(config))
  merged = {}
  for item in bound:
    base = _dense(item.kernel)
    if item.m is not None:
      new = lora_value(item).dense()  # DoRA: m * (W + scale * A @ B) / ||W + scale * A @ B||
    else:
      new = (base + sign * delta(item.spec, item.a, item.b)).astype(item.kernel.dtype)
    if safe:
      _check_finite(item, base, new)
    if is_quantized(item.kernel) and requantize:
      new = quantize.like(item.kernel, new)
    merged[item.spec.path] = new

  def replace(key_path, leaf):
    path = paths.normalize(key_path)
    if path in saved:
      return saved[path] if sign > 0 else leaf
    if path in merged:
      return merged[path]
    return leaf.dequantize() if is_quantized(leaf) and not requantize else leaf

  return jax.tree_util.tree_map_with_path(replace, tree, is_leaf=is_quantized)


def merge(
  tree: Any, lora: Any, config: LoraConfig, *, safe_merge: bool = False, requantize: bool = False
) -> Any:
  """The base tree with each adapted kernel replaced by ``W + scale * A @ B``.

  With DoRA (``use_dora``), by ``m * V / ||V||``, ``V = W + scale * A @ B``, the
  norm per output feature over the fan-in axes (PEFT's DoRA merge).

  The sum is accumulated in float32 and cast back to the kernel's dtype.
  `modules_to_save` leaves are replaced by their trained copies. The caller's
  arrays are never mutated or donated; the result is a new tree of the same
  type (Linen dict, NNX state, plain dict) ready for ``model.apply``.

  Shapes: kernel ``(*stacked, *fan_in, *fan_out)``, ``lora_A``
  ``(*stacked, *fan_in, r)``, ``lora_B`` ``(*stacked, r, *fan_out)``.

  Args:
    tree: the base tree the adapter was made for.
    lora: the adapter tree from `jlora.init` (or training).
    config: the config the adapter was made with.
    safe_merge: check that every adapter weight, and then every merged
      kernel in its own dtype, is finite, and raise instead of returning
      NaN/Inf (PEFT's ``safe_merge``: an fp16 kernel overflows when the
      update exceeds fp16's range). Needs concrete arrays.
    requantize: for a quantized base (`jlora.quantize`): quantize each merged
      kernel again in its base's format and keep the other quantized weights
      as they are. By default a quantized base merges into full precision:
      every quantized weight is dequantized, so the result serves without
      jlora (merging into the 4-bit grid loses the update's precision).

  Returns:
    The merged tree.

  Raises:
    TypeError: if ``config`` is not a `LoraConfig`, or ``lora`` not a dict.
    ValueError: naming the path, if the adapter tree does not agree with
      ``config`` and ``tree`` (an adapter missing, extra, on an integer
      kernel, or of the wrong shape), or, with ``safe_merge``, a factor or a
      merged kernel is not finite.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> bool((jlora.merge(params, lora, cfg)["q_proj"]["kernel"] == 1).all())  # B starts at zero
    True
  """
  return _fold(tree, lora, config, 1.0, safe=safe_merge, requantize=requantize)


def unmerge(tree: Any, lora: Any, config: LoraConfig) -> Any:
  """Inverse of `merge`: subtracts ``scale * A @ B`` from each adapted kernel.

  Exact up to rounding in the kernel's dtype (float32: a few ulps).
  `modules_to_save` leaves cannot be recovered from a merged tree and are left
  as they are.

  Args:
    tree: a tree produced by ``merge(base, lora, config)``.
    lora: the same adapter tree.
    config: the same config.

  Returns:
    The base tree, up to rounding.

  Raises:
    TypeError: if ``config`` is not a `LoraConfig`, or ``lora`` not a dict.
    ValueError: naming the path, if the adapter tree does not agree with
      ``config`` and ``tree`` (see `merge`); for a DoRA config (``use_dora``),
      whose merge cannot be undone.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(params, cfg, key=jax.random.key(1))
    >>> back = jlora.unmerge(jlora.merge(params, lora, cfg), lora, cfg)
    >>> bool(jnp.allclose(back["q_proj"]["kernel"], params["q_proj"]["kernel"], atol=1e-6))
    True
  """
  if check_config(config).use_dora:
    raise ValueError(
      "`unmerge` cannot undo a DoRA merge: the merged kernel m * V / ||V|| keeps only the direction of "
      "each output feature of V = W + scale * A @ B, so the norms of the original kernel are lost (PEFT "
      "caches them at merge). Keep the base tree you merged into (`jlora.merge` never changes it)."
    )
  quantized = [paths.to_str(p) for p, x in paths.leaves_with_paths(tree) if is_quantized(x)]
  if quantized:
    raise ValueError(
      f"`unmerge` got a quantized tree ({quantized[0]!r} is quantized): a quantized base is never merged "
      "into (`merge` returns full precision), so there is nothing to unmerge; keep the quantized base."
    )
  return _fold(tree, lora, config, -1.0, safe=False, requantize=False)
