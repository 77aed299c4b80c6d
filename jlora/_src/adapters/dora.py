"""DoRA (weight-decomposed LoRA), as PEFT's ``use_dora``: its magnitude and norms, factorized.

A DoRA kernel is ``m * V / ||V||`` with ``V = W + scale * A @ B``: ``||V||`` is
the L2 norm of each output feature over the kernel's fan-in axes (per stacked
layer), not differentiated (the DoRA paper, section 4.3, and PEFT), and ``m``
the trained magnitude (``lora_magnitude``: the kernel's shape without its
fan-in axes, i.e. ``lora_B``'s without its rank axis), which starts at
``||W + scale * A @ B||`` of the adapter at init (``||W||`` when ``B`` is zero).

The norm never forms ``A @ B`` at the kernel's size:
``||V||^2 = ||W||^2 + 2 scale sum_r B * (A^T W) + scale^2 sum_r B * ((A^T A) B)``,
with ``A^T W`` of size ``r x out`` and ``A^T A`` of size ``r x r``. Arrays here
follow `LoraValue`'s layout: ``a`` over ``a_axes`` plus the rank, ``b`` over
``b_axes`` plus the rank, norms and scales over ``b_axes``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters.spec import AdapterSpec, b_rank_axis
from jlora._src.core import paths
from jlora._src.core.config import LoraConfig
from jlora._src.interpret import values as V
from jlora._src.interpret.contractions import contract

_HIGHEST = dict(precision=jax.lax.Precision.HIGHEST)


def column_norm(value: V.LoraValue) -> jax.Array:
  """``||W + scale * A @ B||`` per output feature of the view ``value``, over ``b_axes``, in
  ``value.accumulate_dtype`` (float32, float64 for float64 inputs).

  Computed from ``||W||^2``, ``A^T W`` and ``A^T A`` (never an ``in x out`` update),
  under ``stop_gradient``.
  """
  acc = value.accumulate_dtype
  w = value.base.astype(acc)  # no gradient reaches the norm (stop_gradient below)
  a = jax.lax.stop_gradient(value.a).astype(acc)
  b = jax.lax.stop_gradient(value.b).astype(acc)
  lab = V.letters(len(value.shape) + 2)
  r, q = lab[-2], lab[-1]
  k_lab = "".join(lab[: len(value.shape)])
  a_lab = "".join(lab[i] for i in value.a_axes)
  b_lab = "".join(lab[i] for i in value.b_axes)
  shared = "".join(c for c in a_lab if c in b_lab)
  w_sq = contract(w, k_lab, w, k_lab, b_lab, **_HIGHEST)  # no kernel-sized square: XLA fuses it
  # The rank axis leads: W's layout, one A^T W product row per rank (5x faster on CPU than rank last).
  atw = contract(a, a_lab + r, w, k_lab, r + b_lab, **_HIGHEST)
  ata = contract(a, a_lab + r, a, a_lab + q, shared + r + q, **_HIGHEST)
  atab = contract(ata, shared + r + q, b, b_lab + q, r + b_lab, **_HIGHEST)
  b_r = jnp.moveaxis(b, -1, 0)
  s = value.scale
  norm_sq = w_sq + 2.0 * s * jnp.sum(b_r * atw, axis=0) + s * s * jnp.sum(b_r * atab, axis=0)
  return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(norm_sq, 0.0)))


def initial_magnitude(value: V.LoraValue, layers: tuple[int, ...] | None) -> jax.Array:
  """PEFT's magnitude at init, ``||W + scale * A @ B||`` per output feature.

  Args:
    value: the whole kernel as a view (`bind.lora_value`): its axes are the kernel's.
    layers: the stacked layers the adapter covers (`layers_to_transform`), or
      ``None`` for all.

  Returns:
    ``lora_magnitude``: the kernel's shape without its fan-in axes, in the
    kernel's axis order (``lora_B``'s shape without its rank axis).
  """
  norm = column_norm(value)
  if layers is not None:
    norm = norm[jnp.asarray(layers)]
  return jnp.transpose(norm, [value.b_axes.index(ax) for ax in sorted(value.b_axes)])


def check_initial(where: str, norm: jax.Array, dtype: Any) -> None:
  """Raises if a concrete initial magnitude ``norm`` (`initial_magnitude`) cannot start DoRA.

  A zero norm is an all-zero output feature of the kernel (a column of a Dense
  kernel, a feature of an embedding): ``m / ||W||`` is then ``0 / 0``, NaN in
  the output and in every factor's gradient (PEFT divides without an epsilon
  too). A norm past ``dtype``'s range would be stored as ``inf``. A NaN norm
  is a NaN or inf in the kernel. Under a trace (``jit``) nothing is checked.

  Args:
    where: the kernel's path, for the message.
    norm: the magnitude before its cast, in the kernel's axis order.
    dtype: the dtype the magnitude is stored in (the adapter's).

  Raises:
    ValueError: naming the kernel, the output feature's index and the fix.
  """
  if isinstance(norm, jax.core.Tracer):
    return
  host = np.asarray(norm).astype(np.float64)
  shape = tuple(host.shape)
  first = lambda bad: tuple(int(i) for i in np.argwhere(bad)[0])  # noqa: E731
  if np.isnan(host).any():
    raise ValueError(
      f"DoRA: kernel {where!r} holds NaN or inf, so the norm of its output feature {first(np.isnan(host))} "
      f"(index into `lora_magnitude`, shape {shape}) is NaN; fix the base weights, or leave the kernel out "
      "of `target_modules`."
    )
  if (host == 0).any():
    raise ValueError(
      f"DoRA: output feature {first(host == 0)} of kernel {where!r} is all zeros (index into "
      f"`lora_magnitude`, shape {shape}; a Dense kernel's column, an embedding's feature): its norm is 0, "
      "so DoRA's m / ||W|| is 0 / 0 and the output and every factor's gradient would be NaN (PEFT "
      "divides without an epsilon too). Leave the kernel out of the DoRA adapter (`exclude_modules`, or a "
      "plain LoRA config for it), or start from weights with no all-zero feature."
    )
  big = host > float(jnp.finfo(dtype).max)
  if big.any():
    at = first(big)
    raise ValueError(
      f"DoRA: the norm of output feature {at} of kernel {where!r} is {host[at]:.6g}, past the largest "
      f"{jnp.dtype(dtype).name} ({float(jnp.finfo(dtype).max):g}), so its magnitude would be stored as inf. "
      "Keep the adapter in float32: `LoraConfig(..., dtype='float32')`."
    )


def scale(value: V.LoraValue, m: jax.Array, layers: tuple[int, ...] | None) -> jax.Array:
  """DoRA's ``m / ||W + scale * A @ B||`` for the whole kernel ``value``, over its ``b_axes``.

  Args:
    value: the whole kernel as a view (`bind.lora_value`).
    m: ``lora_magnitude``, in the kernel's axis order (see `initial_magnitude`).
    layers: as in `initial_magnitude`; layers left out get exactly 1 (their ``B`` is zero).

  Returns:
    The scale, laid out as ``value.b`` without its rank axis (`LoraValue.g`).
  """
  norm = column_norm(value)
  kernel_order = sorted(value.b_axes)
  m = jnp.transpose(m, [kernel_order.index(ax) for ax in value.b_axes]).astype(norm.dtype)
  if layers is None:
    return m / norm
  idx = jnp.asarray(layers)
  return jnp.ones_like(norm).at[idx].set(m / norm[idx])


def magnitude_shape(spec: AdapterSpec) -> tuple[int, ...]:
  """DoRA's ``lora_magnitude`` shape: ``lora_B``'s without its rank axis (the kernel without its
  fan-in axes; a Dense ``(in, out)``: ``(out,)``; a scanned ``(L, in, out)``: ``(L, out)``)."""
  rank_at = b_rank_axis(spec)
  return spec.b_shape[:rank_at] + spec.b_shape[rank_at + 1 :]


def _magnitude_perm(spec: AdapterSpec) -> list[int]:
  kernel_order = sorted(spec.layout.stacked_axes + spec.layout.out_axes)
  return [kernel_order.index(ax) for ax in spec.layout.stacked_axes + spec.layout.out_axes]


def canonical_magnitude(spec: AdapterSpec, m: Any) -> Any:
  """DoRA's magnitude in canonical order, ``(*stacked, *fan_out)`` (from the kernel's axis order)."""
  return jnp.transpose(m, _magnitude_perm(spec))


def magnitude_from_canonical(spec: AdapterSpec, m: Any) -> Any:
  """The inverse of `canonical_magnitude`."""
  return jnp.transpose(m, tuple(np.argsort(_magnitude_perm(spec))))


def check_magnitude_presence(path: paths.Path, node: Any, config: LoraConfig) -> None:
  """Raises unless the adapter ``node`` at ``path`` holds a magnitude exactly when the config is DoRA's."""
  has = paths.LORA_MAGNITUDE in node
  if has != config.use_dora:
    what = "has" if has else "lacks"
    fix = (
      "set `use_dora=True` in the config" if has else "make the adapter with `use_dora=True` (`jlora.init`)"
    )
    raise ValueError(
      f"The adapter at {paths.to_str(path)!r} {what} DoRA's {paths.LORA_MAGNITUDE!r} but the config has "
      f"`use_dora={config.use_dora}`: {fix}, or use the config the adapter was made with."
    )


def check_magnitude_shape(spec: AdapterSpec, m: Any) -> None:
  """Raises unless ``m`` has `magnitude_shape` of ``spec``."""
  want = magnitude_shape(spec)
  if tuple(getattr(m, "shape", ())) != want:
    raise ValueError(
      f"The adapter at {spec.where!r} has {paths.LORA_MAGNITUDE} of shape {tuple(getattr(m, 'shape', ()))}, "
      f"but its kernel {spec.kernel_shape} and lora_B {spec.b_shape} call for {want} (lora_B's shape "
      "without its rank axis)."
    )
