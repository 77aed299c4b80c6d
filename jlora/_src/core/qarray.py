"""`QuantizedArray`: a quantized weight as a pytree node (see `jlora._src.adapters.quantize` for the formats).

Kept apart from `quantize` so that the tree walkers (`jlora._src.core.paths`) can
treat a quantized weight as one leaf without importing the quantizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
QMAX = {"nf4": 1.0, "int4": 7.0, "int8": 127.0}
SCALE_BLOCK = 256  # double quantization: scales per int8 block


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
  def format(self) -> str:
    """``"nf4/64"``, ``"int8/channel"``, ``"nf4/64/dq"`` (double quantization)."""
    parts = [self.qtype, str(self.block_size or "channel")] + (
      ["dq"] if self.scale_scales is not None else []
    )
    return "/".join(parts)

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
  blocks = q.scales.reshape(-1, SCALE_BLOCK).astype(jnp.float32) * q.scale_scales[:, None]
  return (blocks.reshape(-1)[:n] + q.scale_offset).reshape(_scales_shape(q.shape, q.block_size))


def _scales_shape(shape: Sequence[int], block_size: int | None) -> tuple[int, ...]:
  if block_size is None:
    return (shape[-1],)
  return (*shape[:-1], shape[-1] // block_size)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)
