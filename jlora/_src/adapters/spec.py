"""Adapter specs: what is static about each adapter (`AdapterSpec`, `plan`) and its factors' shapes.

An adapter tree is a plain nested dict mirroring the paths of the base tree
(`jlora._src.core.paths`). At the path of each adapted kernel it holds
``{"lora_A": A, "lora_B": B}``; at the path of each `modules_to_save` leaf it
holds the trainable copy of that leaf.

Shapes follow the kernel's `Layout` (`jlora._src.core.layouts`): ``lora_A`` is the
kernel with its fan-out axes replaced by one rank axis, ``lora_B`` the kernel
with its fan-in axes replaced by one rank axis, both in the kernel's axis
order (a Dense ``(in, out)``: A ``(in, r)``, B ``(r, out)``). Internally the
factors are also used in *canonical* order, A ``(*stacked, *fan_in, r)`` and B
``(*stacked, r, *fan_out)`` (`canonical`).

Creating an adapter tree is `jlora._src.adapters.create`; reading one against a
base tree, `jlora._src.adapters.bind`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.core import layouts, paths, targets
from jlora._src.core.config import LoraConfig
from jlora._src.core.layouts import Layout
from jlora._src.interpret.values import grouped_update

Layouts = Mapping[paths.Path, Layout]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Everything static about one adapter (no arrays)."""

  path: paths.Path
  module: str
  kernel_shape: tuple[int, ...]
  layout: Layout
  rank: int
  scale: float
  layers: tuple[int, ...] | None  # selected indices of the layer axis (first stacked axis); None: all

  @property
  def stacked_shape(self) -> tuple[int, ...]:
    shape = tuple(self.kernel_shape[i] for i in self.layout.stacked_axes)
    if self.layers is not None:
      shape = (len(self.layers),) + shape[1:]
    return shape

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.kernel_shape[i] for i in self.layout.in_axes)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.kernel_shape[i] for i in self.layout.out_axes)

  @property
  def a_shape(self) -> tuple[int, ...]:
    """``lora_A``'s shape, in the kernel's axis order."""
    return layouts.factor_shapes(self.layout, self.kernel_shape, self.rank, self._layer_count)[0]

  @property
  def b_shape(self) -> tuple[int, ...]:
    """``lora_B``'s shape, in the kernel's axis order."""
    return layouts.factor_shapes(self.layout, self.kernel_shape, self.rank, self._layer_count)[1]

  @property
  def _layer_count(self) -> int | None:
    return None if self.layers is None else len(self.layers)

  @property
  def where(self) -> str:
    return paths.to_str(self.path)

  @property
  def param(self) -> str:
    """The parameter path (module path and leaf name), which target patterns also match."""
    return f"{self.module}/{self.path[-1]}" if self.module else str(self.path[-1])


def layout_override(cand: targets.Candidate, config: LoraConfig) -> Layout | None:
  """The user's `layout_pattern` layout for a kernel, checked against its rank."""
  return layouts.from_pattern(config.layout_for(cand.names), cand.shape, paths.to_str(cand.path))


def _layout_for(cand: targets.Candidate, config: LoraConfig, inferred: Layouts) -> Layout:
  """A kernel's layout: `layout_pattern`, else the model's use, else `layouts.default_layout`."""
  layout = layout_override(cand, config) or inferred.get(cand.path)
  return layout or layouts.default_layout(cand.module, cand.shape, paths.to_str(cand.path))


def selected_layers(
  cand: targets.Candidate, layout: Layout, config: LoraConfig
) -> tuple[bool, tuple[int, ...] | None]:
  """``(adapted, layers)`` under `layers_to_transform`: a layer index in the path selects the
  whole kernel; otherwise the first stacked axis is the layer axis and is cut to the selection."""
  ltt = config.layers_to_transform
  if ltt is None:
    return True, None
  index = targets.layer_index(cand.module, config.layers_pattern)
  if index is not None or not layout.stacked_axes:
    return index in ltt, None
  n = cand.shape[layout.stacked_axes[0]]
  layers = tuple(i for i in ltt if i < n)
  return bool(layers), (None if len(layers) == n else layers)


def plan(
  tree: Any, config: LoraConfig, layouts: Layouts | None = None, linear: Any = None
) -> list[AdapterSpec]:
  """The adapters ``config`` puts on ``tree``, in tree order.

  Args:
    tree: the base tree (Linen variables, NNX state, nested dict).
    config: the LoRA config.
    layouts: kernel layouts read off the model (see `infer_layouts`); kernels
      not listed use `config.layout_pattern` or the 2-D default ``"io"``.
    linear: the weights the model uses as linear layers, for ``"all-linear"``
      (see `targets.match_targets`).

  Raises:
    ValueError: for targets that match nothing or kernels of unknown layout.
  """
  specs = []
  layouts = layouts or {}
  for cand in targets.match_targets(tree, config, linear):
    layout = _layout_for(cand, config, layouts)
    adapted, layers = selected_layers(cand, layout, config)
    if adapted:
      check_grouped(cand, layout, config)
      specs.append(
        AdapterSpec(
          path=cand.path,
          module=cand.module,
          kernel_shape=cand.shape,
          layout=layout,
          rank=config.rank_for(cand.names),
          scale=config.scale_for(cand.names),
          layers=layers,
        )
      )
  if not specs:
    raise ValueError(
      f"`layers_to_transform`={config.layers_to_transform} selects none of the matched modules; layer "
      f"indices are read from paths like 'layers_3' or 'layers/3' (names "
      f"{config.layers_pattern or 'default'}) or from a stacked layer axis."
    )
  return specs


def check_grouped(cand: targets.Candidate, layout: Layout, config: LoraConfig) -> None:
  """Refuses what PEFT refuses on a grouped convolution (``layout.groups`` > 1): a rank that is not a
  multiple of the groups, and DoRA (whose magnitude is the norm of the merged kernel, which a grouped
  convolution's update cannot be merged into).

  Raises:
    ValueError: naming the kernel, its groups and the fix.
  """
  if layout.groups == 1:
    return
  where, rank = paths.to_str(cand.path), config.rank_for(cand.names)
  if rank % layout.groups:
    raise ValueError(
      f"Kernel {where!r} is a grouped convolution's (`feature_group_count`={layout.groups}), whose adapter "
      f"is, as PEFT's, lora_A to r features and a grouped 1x1 lora_B of r / {layout.groups} features per "
      f"group: rank {rank} is not a multiple of {layout.groups}. Choose such a rank for it (`r` or "
      f"`rank_pattern`), or leave it out (`exclude_modules=({cand.module!r},)`)."
    )
  if config.use_dora:
    raise ValueError(
      f"Kernel {where!r} is a grouped convolution's (`feature_group_count`={layout.groups}): DoRA's "
      "magnitude is the norm of the merged kernel, and a grouped convolution's LoRA update (PEFT's: "
      "lora_A over all input features, a grouped 1x1 lora_B) cannot be merged into its kernel. Leave it "
      "out of the DoRA "
      f"adapter (`exclude_modules=({cand.module!r},)`), or use plain LoRA (`use_dora=False`)."
    )


def check_bias_layers(
  specs: Collection[AdapterSpec], saved: Collection[paths.Path], config: LoraConfig, collections: bool
) -> None:
  """Refuses ``bias="lora_only"`` on a stacked kernel that `layers_to_transform` adapts in part: PEFT
  trains the biases of the selected layers only, and a trained copy is the whole stacked leaf."""
  if config.bias != "lora_only":
    return
  cut = {spec.module: spec for spec in specs if spec.layers is not None}
  for path in saved:
    spec = cut.get(paths.module_path(path, collections))
    if spec is not None and str(path[-1]) == "bias":
      raise ValueError(
        f"bias='lora_only' with layers_to_transform={config.layers_to_transform} adapts only layers "
        f"{list(spec.layers)} of the stacked kernel at {spec.where!r}, but its trained bias "
        f"{paths.to_str(path)!r} would be the whole stacked leaf, every layer (PEFT trains the selected "
        "layers' biases only). Use bias='all' (every bias of every layer), bias='none', or adapt every "
        "layer of this kernel."
      )


@dataclasses.dataclass(frozen=True)
class Bound:
  """One adapter of an adapter tree, bound to its base kernel (``m``: DoRA's magnitude, or ``None``)."""

  spec: AdapterSpec
  kernel: Any
  a: Any
  b: Any
  m: Any = None


def b_rank_axis(spec: AdapterSpec) -> int:
  """Where ``lora_B`` holds its rank axis (at the place of the kernel's first fan-in axis)."""
  first_in = min(spec.layout.in_axes)
  return sum(1 for ax in spec.layout.stacked_axes + spec.layout.out_axes if ax < first_in)


def canonical(spec: AdapterSpec, a: Any, b: Any) -> tuple[Any, Any]:
  """The factors in canonical order: A ``(*stacked, *fan_in, r)``, B ``(*stacked, r, *fan_out)``."""
  return jnp.transpose(a, spec.layout.canonical_perm("a")), jnp.transpose(b, spec.layout.canonical_perm("b"))


def from_canonical(spec: AdapterSpec, a: Any, b: Any) -> tuple[Any, Any]:
  """The inverse of `canonical`: factors in the kernel's axis order."""
  inv = lambda side: tuple(np.argsort(spec.layout.canonical_perm(side)))  # noqa: E731
  return jnp.transpose(a, inv("a")), jnp.transpose(b, inv("b"))


def delta(spec: AdapterSpec, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """``scale * A @ B`` in the kernel's shape, accumulated in float32, cast to ``dtype``.

  Unselected stacked layers (`layers_to_transform`) get zeros.

  Raises:
    ValueError: for a grouped convolution's adapter, whose update is no kernel (PEFT refuses to merge
      it too).
  """
  if spec.layout.groups > 1:
    raise grouped_update(spec.where, spec.layout.groups)
  a, b = expand_layers(spec, *canonical(spec, a, b))
  stacked = tuple(spec.kernel_shape[i] for i in spec.layout.stacked_axes)
  a2 = a.astype(jnp.float32).reshape(stacked + (math.prod(spec.in_shape), spec.rank))
  b2 = b.astype(jnp.float32).reshape(stacked + (spec.rank, math.prod(spec.out_shape)))
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * spec.scale
  d = d.reshape(stacked + spec.in_shape + spec.out_shape)
  return jnp.transpose(d, tuple(np.argsort(spec.layout.kernel_perm()))).astype(dtype)


def expand_layers(spec: AdapterSpec, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Canonical ``A``, ``B`` over all stacked layers: zeros in ``B`` for unselected layers."""
  if spec.layers is None:
    return a, b
  n = spec.kernel_shape[spec.layout.stacked_axes[0]]
  idx = jnp.asarray(spec.layers)
  a_full = jnp.zeros((n,) + a.shape[1:], a.dtype).at[idx].set(a)
  b_full = jnp.zeros((n,) + b.shape[1:], b.dtype).at[idx].set(b)
  return a_full, b_full
