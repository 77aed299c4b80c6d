"""PEFT's ``ConvNd`` format: a convolution kernel's factors as PEFT's ``Conv1d``/``Conv2d``/``Conv3d`` LoRA.

PEFT (``peft.tuners.lora.layer._ConvNd``) adapts a PyTorch ``nn.ConvNd``,
whose weight is ``(out, in, *k)``, with two convolutions: ``lora_A`` of the
base's kernel size, stride and padding with ``r`` output channels
(``lora_A.weight`` ``(r, in, *k)``), then ``lora_B``, a ``1x1`` convolution
(``lora_B.weight`` ``(out, r, 1, ...)``, one ``1`` per spatial axis). DoRA's
``lora_magnitude_vector`` is the weight's norm over ``(in, *k)`` kept as
``(1, out, 1, ...)`` (``_DoraConvNdLayer.get_weight_norm``).

jlora reads a kernel as a convolution's when the model uses it in
``conv_general_dilated`` (`jlora.Layout.ops`); it must be stored as Flax's
``nn.Conv`` stores it, ``(*k, in, out)`` (HWIO, layout ``"i…io"``; ``"si…io"``
under ``nn.scan``, one PEFT module per layer), so that its canonical factors
are A ``(*k, in, r)`` and B ``(r, out)``. Then ``lora_A.weight`` is A with its
rank axis first and ``in`` before the spatial axes, and ``lora_B.weight`` is
``B.T`` with ``1``-sized spatial axes. A grouped convolution's kernel
(``feature_group_count`` G, kernel ``(*k, in / G, out)``) takes PEFT's grouped
adapter (layout ``groups=G`` on its ``in`` axis): ``lora_A`` a convolution over
all ``in`` channels, ``(r, in, *k)``, and ``lora_B`` a grouped 1x1 convolution,
``(out, r / G, 1, ...)``; the same transposes carry them. A kernel whose storage
order reads the same roles but another axis order (``(in, *k, out)``) cannot
be told from Flax's; it is read as Flax's.
"""

from __future__ import annotations

import numpy as np

from jlora._src.core import layouts

CONV_OP = "conv_general_dilated"
MAX_SPATIAL = 3  # PEFT adapts Conv1d, Conv2d and Conv3d


def is_conv(layout: layouts.Layout | None) -> bool:
  """Whether the model uses the kernel in a convolution (a layout read off the model)."""
  return layout is not None and CONV_OP in layout.ops


def flax_layout(ndim: int, stacked: bool = False) -> layouts.Layout:
  """Flax's conv kernel layout: ``"i…io"`` (``(*k, in, out)``), after a leading stacked axis."""
  return layouts.Layout(layouts.STACKED * stacked + layouts.IN * (ndim - 1 - stacked) + layouts.OUT)


def grouped_by_file(
  layout: layouts.Layout, kernel_shape: tuple[int, ...], a_shape: tuple[int, ...]
) -> layouts.Layout:
  """Flax's conv ``layout`` as a grouped convolution's when PEFT's ``lora_A.weight`` ``(r, in, *k)``
  has G > 1 times the kernel's ``in / G`` input channels (the file's shape tells G without the model)."""
  cin = kernel_shape[-2]
  groups, rest = divmod(a_shape[1], cin) if len(a_shape) > 1 else (1, 0)
  if groups < 2 or rest:
    return layout
  return layouts.Layout(layout.roles, groups=groups, group_axis=layout.ndim - 2)


def check_layout(layout: layouts.Layout, where: str) -> int:
  """The number of spatial axes of a conv kernel in Flax's storage order.

  Raises:
    ValueError: if the kernel is not stored ``(*k, in, out)`` (after one
      leading stacked axis), has no or more than three spatial axes, or is
      used dilated (PEFT's ``lora_A`` ignores the base's dilation).
  """
  if layouts.DILATED_CONV in layout.ops:
    raise ValueError(
      f"Convolution kernel {where!r} is used with a dilated kernel (`kernel_dilation`/`rhs_dilation` > 1): "
      "PEFT builds its ConvNd `lora_A` with the base's kernel size, stride and padding but not its dilation "
      "(peft.tuners.lora.layer._ConvNd.update_layer), so PEFT would compute another function than the "
      "adapter's `W + scale * A @ B`; its files cannot carry this adapter. Exclude the kernel, or share the "
      "merged weights (`jlora.save_merged`)."
    )
  stacked = layout.roles.startswith(layouts.STACKED)
  spatial = layout.ndim - 2 - stacked
  flax = flax_layout(layout.ndim, stacked).roles
  if (
    layout.roles != flax
    or layout.group_axis not in (None, layout.ndim - 2)
    or not 1 <= spatial <= MAX_SPATIAL
  ):
    raise ValueError(
      f"Convolution kernel {where!r} has layout {layout}; PEFT's ConvNd LoRA is written from kernels stored "
      "as Flax's `nn.Conv` stores them, (*kernel_size, in, out) (layout 'i…io', 1 to 3 spatial axes; "
      "'si…io' under `nn.scan`). Store the kernel in that order (transpose it in the model), or exclude it."
    )
  return spatial


def entry_shape(layout: layouts.Layout, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of one PEFT module's kernel: ``kernel_shape`` without its stacked axes."""
  return tuple(n for i, n in enumerate(kernel_shape) if i not in layout.stacked_axes)


def peft_shapes(
  kernel_shape: tuple[int, ...], rank: int, groups: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(lora_A.weight, lora_B.weight)`` shapes for one Flax conv kernel ``(*k, in / groups, out)`` (not
  stacked) of a convolution with ``feature_group_count=groups``."""
  *k, cin, cout = kernel_shape
  return (rank, cin * groups, *k), (cout, rank // groups) + (1,) * len(k)


def magnitude_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  """PEFT's DoRA ``lora_magnitude_vector`` shape for one Flax conv kernel: ``(1, out, 1, ...)``."""
  return (1, kernel_shape[-1]) + (1,) * (len(kernel_shape) - 2)


def to_peft(
  a: np.ndarray, b: np.ndarray, m: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """One kernel's canonical ``A`` ``(*k, in, r)``, ``B`` ``(r, out)`` and magnitude ``(out,)`` ->
  PEFT's ``lora_A.weight`` ``(r, in, *k)``, ``lora_B.weight`` ``(out, r, 1, ...)`` and
  ``lora_magnitude_vector`` ``(1, out, 1, ...)`` (a grouped convolution's: ``B`` ``(r / G, out)``,
  ``lora_B.weight`` ``(out, r / G, 1, ...)``)."""
  spatial = a.ndim - 2
  la = np.transpose(a, (spatial + 1, spatial, *range(spatial)))
  lb = b.T.reshape(b.shape[1], b.shape[0], *(1,) * spatial)
  return la, lb, None if m is None else m.reshape(1, -1, *(1,) * spatial)


def from_peft(la: np.ndarray, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of `to_peft` for the factors: canonical ``A`` ``(*k, in, r)``, ``B`` ``(r, out)``."""
  spatial = la.ndim - 2
  a = np.transpose(la, (*range(2, spatial + 2), 1, 0))
  return a, lb.reshape(lb.shape[0], lb.shape[1]).T
