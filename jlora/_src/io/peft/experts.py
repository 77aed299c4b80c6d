"""PEFT's ``ParamWrapper`` format: an expert kernel's factors as one ``target_parameters`` adapter.

PEFT (``peft.tuners.lora.layer.ParamWrapper``) adapts a 3-D parameter
``(E, P, Q)`` with ``lora_A.weight`` ``(E * r, in)`` and ``lora_B.weight``
``(out, r * E)``: rows of ``lora_A`` are expert-major (row ``e * r + j``),
columns of ``lora_B`` rank-major (column ``j * E + e``), and expert ``e``'s
delta is ``scale * lora_B_e @ lora_A_e`` of shape ``(P, Q)``, its ``in`` being
``Q`` (PEFT swaps in and out for a 3-D parameter), or ``(lora_B_e @
lora_A_e).T`` with ``in = P`` when the module sets ``is_transposed``.

jlora's expert kernel keeps the expert axis as its last stacked axis (a
scanned stack's layer axis before it) and one fan-in and one fan-out axis;
PyTorch's parameter is the kernel without the layer axis, the expert axis
first. Per layer, with jlora's canonical ``A`` ``(E, D, r)`` and ``B`` ``(E, r,
F)``: where PEFT's ``in`` is the fan-in axis, ``lora_A_e = A_e.T`` and
``lora_B_e = B_e.T`` (as for a Linear module); where it is the fan-out axis
(transformers 4.57's GptOss and Llama4 experts, stored ``(E, in, out)``
without ``is_transposed``), ``lora_A_e = B_e`` and ``lora_B_e = A_e``.
"""

from __future__ import annotations

import numpy as np

from jlora._src.core import layouts
from jlora._src.io.peft.names import PeftParameter


def _peft_in_is_fan_in(layout: layouts.Layout, p: PeftParameter, where: str) -> bool:
  """Whether PEFT's ``in`` side of the parameter is the kernel's fan-in axis."""
  if len(layout.stacked_axes) not in (1, 2) or len(layout.in_axes) != 1 or len(layout.out_axes) != 1:
    raise ValueError(
      f"Expert kernel {where!r} has layout {layout}; PEFT's `target_parameters` adapts 3-D parameters "
      "(experts, in, out): the kernel needs an expert axis (after a layer axis, if any), one fan-in and one "
      "fan-out axis. Reshape the kernel in the model, or map it to PEFT modules instead of a parameter."
    )
  in_first = layout.in_axes[0] < layout.out_axes[0]  # torch (E, P, Q): P is the fan-in axis
  return in_first == p.transposed


def peft_shapes(layout: layouts.Layout, shape: tuple[int, ...], p: PeftParameter, rank: int, where: str):
  """``(lora_A.weight, lora_B.weight)`` shapes of one layer's expert adapter."""
  experts = shape[layout.stacked_axes[-1]]
  fan_in, fan_out = shape[layout.in_axes[0]], shape[layout.out_axes[0]]
  n_in, n_out = (fan_in, fan_out) if _peft_in_is_fan_in(layout, p, where) else (fan_out, fan_in)
  return (experts * rank, n_in), (n_out, rank * experts)


def to_peft(a: np.ndarray, b: np.ndarray, layout: layouts.Layout, p: PeftParameter, where: str):
  """One layer's canonical ``A`` ``(E, D, r)``, ``B`` ``(E, r, F)`` -> PEFT's ``lora_A``, ``lora_B``."""
  in_is_fan_in = _peft_in_is_fan_in(layout, p, where)
  experts, _, rank = a.shape
  if in_is_fan_in:
    la, lb = a.transpose(0, 2, 1), b.transpose(2, 1, 0)  # (E, r, D), (F, r, E)
  else:
    la, lb = b, a.transpose(1, 2, 0)  # (E, r, F), (D, r, E)
  return la.reshape(experts * rank, -1), lb.reshape(lb.shape[0], rank * experts)


def from_peft(
  la: np.ndarray, lb: np.ndarray, layout: layouts.Layout, p: PeftParameter, *, experts: int, where: str
):
  """The inverse of `to_peft`: canonical ``A`` ``(E, D, r)``, ``B`` ``(E, r, F)``."""
  rank = la.shape[0] // experts
  la, lb = la.reshape(experts, rank, -1), lb.reshape(lb.shape[0], rank, experts)
  if _peft_in_is_fan_in(layout, p, where):
    return la.transpose(0, 2, 1), lb.transpose(2, 1, 0)
  return lb.transpose(2, 0, 1), la
