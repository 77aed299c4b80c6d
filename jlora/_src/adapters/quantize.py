"""Quantized base weights (QLoRA): `QuantizedArray`, `quantize` and `dequantize`.

A `QuantizedArray` is a pytree node holding the codes and scales of one
weight, so ``jit``, ``jax.eval_shape``, sharding and orbax see plain arrays.
Formats (all symmetric, absmax-scaled):

* ``"nf4"``: the 16-value NormalFloat4 code of the QLoRA paper (`NF4`), two
  codes per byte: about 0.5 byte per parameter plus the scales;
* ``"int4"``: integers in ``[-7, 7]``, two per byte;
* ``"int8"``: integers in ``[-127, 127]``, one byte each.

Scales are per block of ``block_size`` consecutive entries along the last
axis (the output features of a Dense kernel), shape ``(*shape[:-1],
shape[-1] // block_size)``, or per channel (``block_size=None``: one scale per
entry of the last axis, over all other axes). With ``double_quant=True`` the
float32 block scales are themselves quantized to int8 in blocks of 256 after
their mean is subtracted, as in QLoRA (about 0.127 fewer bits per parameter
at block size 64).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.core import paths
from jlora._src.core import targets as target_rules
from jlora._src.core.qarray import NF4, QMAX, QTYPES, SCALE_BLOCK, QuantizedArray, is_quantized


def _codes(x: jax.Array, qtype: str) -> jax.Array:
  """Codes of values already divided by their scale (in [-1, 1] for nf4, [-qmax, qmax] else)."""
  if qtype == "nf4":
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    return jnp.searchsorted(mids, x).astype(jnp.uint8)
  q = jnp.clip(jnp.round(x), -QMAX[qtype], QMAX[qtype])
  return q.astype(jnp.int8) if qtype == "int8" else (q + 8).astype(jnp.uint8)


def _pack(codes: jax.Array) -> jax.Array:
  pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def _quantize_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  flat = scales.reshape(-1)
  offset = jnp.mean(flat)
  pad = -flat.shape[0] % SCALE_BLOCK
  blocks = jnp.pad(flat - offset, (0, pad)).reshape(-1, SCALE_BLOCK)
  s = jnp.max(jnp.abs(blocks), axis=1) / 127.0
  codes = jnp.round(blocks / jnp.where(s == 0, 1.0, s)[:, None]).astype(jnp.int8)
  return codes.reshape(-1), s, offset


def quantize_array(
  x: jax.Array, *, qtype: str, block_size: int | None = 64, double_quant: bool = False
) -> QuantizedArray:
  """Quantizes one floating array of two or more dimensions (see `quantize`)."""
  shape = tuple(x.shape)
  w = jnp.asarray(x, jnp.float32)
  if block_size is None:
    scales = jnp.max(jnp.abs(w).reshape(-1, shape[-1]), axis=0) / QMAX[qtype]
    normed = w / jnp.where(scales == 0, 1.0, scales)
  else:
    blocks = w.reshape(*shape[:-1], shape[-1] // block_size, block_size)
    scales = jnp.max(jnp.abs(blocks), axis=-1) / QMAX[qtype]
    normed = (blocks / jnp.where(scales == 0, 1.0, scales)[..., None]).reshape(shape)
  codes = _codes(normed, qtype)
  if qtype != "int8":
    codes = _pack(codes)
  scales, scale_scales, offset = _quantize_scales(scales) if double_quant else (scales, None, None)
  return QuantizedArray(
    codes, scales, scale_scales, offset, qtype, shape, jnp.dtype(x.dtype).name, block_size
  )


def like(q: QuantizedArray, x: jax.Array) -> QuantizedArray:
  """``x`` quantized in ``q``'s format."""
  return quantize_array(x, qtype=q.qtype, block_size=q.block_size, double_quant=q.scale_scales is not None)


def _check_args(qtype: Any, block_size: Any, double_quant: Any) -> None:
  if qtype not in QTYPES:
    raise ValueError(f"`qtype` must be one of {QTYPES}; got {qtype!r}.")
  if block_size is not None and (
    isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
  ):
    raise ValueError(
      f"`block_size` must be a positive integer, or None for per-channel scales; got {block_size!r}."
    )
  if qtype != "int8" and block_size is not None and block_size % 2:
    raise ValueError(f"4-bit codes pack two per byte: `block_size` must be even; got {block_size}.")
  if not isinstance(double_quant, bool):
    raise TypeError(f"`double_quant` must be a bool; got {double_quant!r}.")


def _selected(tree: Any, spec: Any) -> set[paths.Path]:
  """The leaves to quantize: ``targets`` entries (PEFT's matching rules), or every linear weight."""
  cands = target_rules.candidates(tree)
  if spec is None:
    return {
      c.path
      for c in cands
      if c.leaf_name not in target_rules.EMBEDDING_LEAVES and not target_rules.is_head(c)
    }
  entries = (spec,) if isinstance(spec, str) else tuple(spec)
  names = [n for c in cands for n in c.names]
  for entry in entries:
    sub = entry if isinstance(spec, str) else (entry,)
    if not any(target_rules.name_matches(sub, n) for n in names):
      raise ValueError(
        f"`targets` entry {entry!r} matches no floating weight of two or more dimensions; "
        f"weights that exist: {[c.param for c in cands][:12]}."
      )
  return {
    c.path for c in cands if target_rules.name_matches(spec if isinstance(spec, str) else entries, c.names)
  }


def quantize(
  tree: Any,
  *,
  qtype: str,
  block_size: int | None = 64,
  targets: Any = None,
  double_quant: bool = False,
) -> Any:
  """Quantizes a base tree's weights, for LoRA on a quantized base (QLoRA).

  Args:
    tree: the base tree (Linen variables, NNX state, nested dict).
    qtype: ``"nf4"``, ``"int4"`` or ``"int8"`` (module doc).
    block_size: entries per scale along the last axis (must divide it), or
      ``None`` for per-channel scales.
    targets: which weights: ``None`` (default) quantizes every floating
      weight of two or more dimensions except embeddings and the output head;
      or module names / a regex, matched as `LoraConfig.target_modules`.
    double_quant: quantize the scales too (needs ``block_size``).

  Returns:
    A tree of the same structure with `QuantizedArray` nodes in place of the
    quantized weights; the input is not modified.

  Raises:
    ValueError: for an unknown ``qtype``, a ``block_size`` that does not
      divide a weight's last axis, a target that matches nothing, a tree
      that is already quantized, or a weight with a NaN or infinite entry
      (under ``jit``, where it cannot raise, such an entry makes its block
      dequantize to non-finite values); each naming the path.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}
    >>> q = jlora.quantize(params, qtype="nf4", block_size=64)
    >>> kernel = q["q_proj"]["kernel"]
    >>> kernel.codes.shape, kernel.codes.dtype, kernel.scales.shape
    ((128, 32), dtype('uint8'), (128, 1))
    >>> err = jnp.abs(jlora.dequantize(q)["q_proj"]["kernel"] - params["q_proj"]["kernel"]).mean()
    >>> bool(err < 0.1)
    True
  """
  _check_args(qtype, block_size, double_quant)
  if double_quant and block_size is None:
    raise ValueError("`double_quant=True` quantizes block scales: it needs a `block_size`.")
  done = [paths.to_str(p) for p, x in paths.leaves_with_paths(tree) if is_quantized(x)]
  if done:
    raise ValueError(f"The tree is already quantized (at {done[0]!r}); quantize a full-precision tree once.")
  chosen = _selected(tree, targets)
  if not chosen:
    ints = [
      (paths.to_str(p), x.dtype) for p, x in paths.leaves_with_paths(tree) if getattr(x, "ndim", 0) >= 2
    ]
    why = f" (leaf {ints[0][0]!r} is {ints[0][1]}; integer arrays are not quantized)" if ints else ""
    raise ValueError(f"The tree has no floating weight of two or more dimensions to quantize{why}.")

  def one(key_path: Any, leaf: Any) -> Any:
    path = paths.normalize(key_path)
    if path not in chosen:
      return leaf
    if block_size is not None and leaf.shape[-1] % block_size:
      raise ValueError(
        f"`block_size`={block_size} does not divide the last axis (size {leaf.shape[-1]}) of "
        f"{paths.to_str(path)!r} {tuple(leaf.shape)}; choose a block size that divides it, exclude the "
        "weight with `targets=`, or use `block_size=None` for per-channel scales."
      )
    if qtype != "int8" and leaf.shape[-1] % 2:
      raise ValueError(
        f"{paths.to_str(path)!r} {tuple(leaf.shape)} has an odd last axis; 4-bit codes pack two per byte."
      )
    _check_finite(leaf, path)
    return quantize_array(leaf, qtype=qtype, block_size=block_size, double_quant=double_quant)

  return jax.tree_util.tree_map_with_path(one, tree)


def _check_finite(leaf: Any, path: paths.Path) -> None:
  """Raises for a concrete weight with a NaN or infinite entry, which no code can stand for.

  A traced weight (`quantize` under ``jit``) cannot raise: there a non-finite
  entry makes its block's scale non-finite, so the block dequantizes to
  non-finite values, never to a finite stand-in.
  """
  if isinstance(leaf, jax.core.Tracer):
    return
  finite = np.isfinite(np.asarray(leaf, np.float32))
  if not finite.all():
    at = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise ValueError(
      f"{paths.to_str(path)!r} {tuple(leaf.shape)} has {int((~finite).sum())} non-finite entries (the first, "
      f"at index {at}, is {np.asarray(leaf)[at]}); no code stands for NaN or inf: fix the weight (or leave "
      "it out with `targets=`) before quantizing."
    )


def dequantize(tree: Any) -> Any:
  """The tree with every `QuantizedArray` replaced by its dequantized array.

  Args:
    tree: a tree from `quantize` (other leaves pass through).

  Returns:
    A tree of plain arrays, each in its weight's original dtype.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"w": {"kernel": jnp.ones((4, 8))}}, qtype="int8", block_size=8)
    >>> jlora.dequantize(q)["w"]["kernel"].dtype
    dtype('float32')
  """
  return jax.tree_util.tree_map(
    lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized
  )
