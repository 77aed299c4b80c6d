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

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src import paths
from jlora._src import targets as target_rules

# NormalFloat4 (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4 = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
QTYPES = ("nf4", "int4", "int8")
_QMAX = {"nf4": 1.0, "int4": 7.0, "int8": 127.0}
_SCALE_BLOCK = 256  # double quantization: scales per int8 block


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized weight (see the module doc): codes and scales, and what they stand for.

  Attributes:
    codes: ``uint8`` (4-bit formats: two codes per byte along the last axis)
      or ``int8``.
    scales: float32 scales, or with double quantization their int8 codes.
    scale_scales: double quantization: float32 scale of each block of 256
      scales; else ``None``.
    scale_offset: double quantization: the mean subtracted from the scales.
    qtype: ``"nf4"``, ``"int4"`` or ``"int8"``.
    shape: the weight's shape.
    dtype: the weight's dtype name (what `dequantize` returns).
    block_size: entries per scale along the last axis; ``None``: per channel.
  """

  codes: jax.Array
  scales: jax.Array
  scale_scales: jax.Array | None
  scale_offset: jax.Array | None
  qtype: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(metadata=dict(static=True))
  block_size: int | None = dataclasses.field(metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held: codes and scales."""
    parts = (self.codes, self.scales, self.scale_scales, self.scale_offset)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in parts if x is not None)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The weight, ``codes * scales``, in ``dtype`` (default: the original dtype)."""
    values = _unpack(self.codes, self.qtype)
    scales = _block_scales(self)
    if self.block_size is None:
      w = values * scales
    else:
      n = self.shape[-1]
      blocks = values.reshape(*self.shape[:-1], n // self.block_size, self.block_size)
      w = (blocks * scales[..., None]).reshape(self.shape)
    return w.astype(dtype or self.dtype)


def _unpack(codes: jax.Array, qtype: str) -> jax.Array:
  if qtype == "int8":
    return codes.astype(jnp.float32)
  lo, hi = codes & 0x0F, codes >> 4
  nibbles = jnp.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
  if qtype == "nf4":
    return jnp.asarray(NF4)[nibbles]
  return nibbles.astype(jnp.float32) - 8.0


def _block_scales(q: QuantizedArray) -> jax.Array:
  if q.scale_scales is None:
    return q.scales
  n = math.prod(_scales_shape(q.shape, q.block_size))
  blocks = q.scales.reshape(-1, _SCALE_BLOCK).astype(jnp.float32) * q.scale_scales[:, None]
  return (blocks.reshape(-1)[:n] + q.scale_offset).reshape(_scales_shape(q.shape, q.block_size))


def _scales_shape(shape: Sequence[int], block_size: int | None) -> tuple[int, ...]:
  if block_size is None:
    return (shape[-1],)
  return (*shape[:-1], shape[-1] // block_size)


def _codes(x: jax.Array, qtype: str) -> jax.Array:
  """Codes of values already divided by their scale (in [-1, 1] for nf4, [-qmax, qmax] else)."""
  if qtype == "nf4":
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    return jnp.searchsorted(mids, x).astype(jnp.uint8)
  q = jnp.clip(jnp.round(x), -_QMAX[qtype], _QMAX[qtype])
  return q.astype(jnp.int8) if qtype == "int8" else (q + 8).astype(jnp.uint8)


def _pack(codes: jax.Array) -> jax.Array:
  pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def _quantize_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  flat = scales.reshape(-1)
  offset = jnp.mean(flat)
  pad = -flat.shape[0] % _SCALE_BLOCK
  blocks = jnp.pad(flat - offset, (0, pad)).reshape(-1, _SCALE_BLOCK)
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
    scales = jnp.max(jnp.abs(w).reshape(-1, shape[-1]), axis=0) / _QMAX[qtype]
    normed = w / jnp.where(scales == 0, 1.0, scales)
  else:
    blocks = w.reshape(*shape[:-1], shape[-1] // block_size, block_size)
    scales = jnp.max(jnp.abs(blocks), axis=-1) / _QMAX[qtype]
    normed = (blocks / jnp.where(scales == 0, 1.0, scales)[..., None]).reshape(shape)
  codes = _codes(normed, qtype)
  if qtype != "int8":
    codes = _pack(codes)
  scales, scale_scales, offset = _quantize_scales(scales) if double_quant else (scales, None, None)
  return QuantizedArray(
    codes, scales, scale_scales, offset, qtype, shape, jnp.dtype(x.dtype).name, block_size
  )


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


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
      if c.leaf_name not in target_rules.EMBEDDING_LEAVES and not target_rules._is_head(c.module)
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
      divide a weight's last axis, a target that matches nothing, or a tree
      that is already quantized; each naming the path.

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
  done = [paths.to_str(p) for p, x in leaves(tree) if is_quantized(x)]
  if done:
    raise ValueError(f"The tree is already quantized (at {done[0]!r}); quantize a full-precision tree once.")
  chosen = _selected(tree, targets)
  if not chosen:
    ints = [(paths.to_str(p), x.dtype) for p, x in leaves(tree) if getattr(x, "ndim", 0) >= 2]
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
    return quantize_array(leaf, qtype=qtype, block_size=block_size, double_quant=double_quant)

  return jax.tree_util.tree_map_with_path(one, tree)


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


def leaves(tree: Any) -> list[tuple[paths.Path, Any]]:
  """``(path, leaf)`` with each `QuantizedArray` as one leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  return [(paths.normalize(kp), leaf) for kp, leaf in flat]
