"""Adapter trees: creating them (`init`) and reading them back against a base tree.

An adapter tree is a plain nested dict mirroring the paths of the base tree
(`jlora._src.paths`). At the path of each adapted kernel it holds
``{"lora_A": A, "lora_B": B}``; at the path of each `modules_to_save` leaf it
holds the trainable copy of that leaf.

Shapes: a kernel ``(*stacked, *fan_in, *fan_out)`` has ``A`` of shape
``(*stacked', *fan_in, r)`` and ``B`` of shape ``(*stacked', r, *fan_out)``,
where ``stacked'`` is the stacked (layer) axes, the first one shortened to
the selected layers when `layers_to_transform` picks some of them. The
stacked and fan-in axis counts are therefore read back from the shapes alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src import paths, targets
from jlora._src.config import ALL_LINEAR, LoraConfig

_CONV = "conv_general_dilated"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a kernel's axes split: ``stacked`` leading layer axes, then ``fan_in``
  contracted axes, then the fan-out axes. ``ops`` names the primitives that
  use the kernel, when the layout was read off a model (`infer_layouts`)."""

  stacked: int
  fan_in: int
  ops: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Everything static about one adapter (no arrays)."""

  path: paths.Path
  module: str
  kernel_shape: tuple[int, ...]
  stacked: int
  fan_in: int
  rank: int
  scale: float
  layers: tuple[int, ...] | None  # selected indices of stacked axis 0; None: all

  @property
  def stacked_shape(self) -> tuple[int, ...]:
    shape = self.kernel_shape[: self.stacked]
    if self.layers is not None:
      shape = (len(self.layers),) + shape[1:]
    return shape

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[self.stacked : self.stacked + self.fan_in]

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[self.stacked + self.fan_in :]

  @property
  def a_shape(self) -> tuple[int, ...]:
    return self.stacked_shape + self.in_shape + (self.rank,)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return self.stacked_shape + (self.rank,) + self.out_shape

  @property
  def num_params(self) -> int:
    return math.prod(self.a_shape) + math.prod(self.b_shape)

  @property
  def where(self) -> str:
    return paths.to_str(self.path)


def _layout_for(cand: targets.Candidate, config: LoraConfig, inferred: Mapping[paths.Path, Layout]) -> Layout:
  override = config.layout_for(cand.module)
  if override is not None:
    layout = Layout(*override)
  elif cand.path in inferred:
    layout = inferred[cand.path]
  elif len(cand.shape) == 2:
    layout = Layout(0, 1)
  else:
    raise ValueError(
      f"Kernel {paths.to_str(cand.path)!r} has shape {cand.shape}: its stacked, fan-in and "
      "fan-out axes cannot be told from the shape alone. Pass `apply_fn=model.apply, "
      "example_args=(inputs,)` to `jlora.init` so it reads how the model contracts the "
      f"kernel, or set `layout_pattern={{{cand.module.split('/')[-1]!r}: (stacked, fan_in)}}`."
    )
  if layout.stacked + layout.fan_in >= len(cand.shape):
    raise ValueError(
      f"Layout {layout} of kernel {paths.to_str(cand.path)!r} with shape {cand.shape} leaves "
      "no fan-out axis; `stacked + fan_in` must be less than the kernel's rank."
    )
  return layout


def plan(
  tree: Any, config: LoraConfig, layouts: Mapping[paths.Path, Layout] | None = None
) -> list[AdapterSpec]:
  """The adapters ``config`` puts on ``tree``, in tree order.

  Args:
    tree: the base tree (Linen variables, NNX state, nested dict).
    config: the LoRA config.
    layouts: kernel layouts read off the model (see `infer_layouts`); kernels
      not listed use `config.layout_pattern` or the 2-D default.

  Raises:
    ValueError: for targets that match nothing or kernels of unknown layout.
  """
  specs = []
  ltt = config.layers_to_transform
  layouts = layouts or {}
  for cand in targets.match_targets(tree, config):
    if config.target_modules == ALL_LINEAR and _CONV in getattr(layouts.get(cand.path), "ops", ()):
      continue  # "all-linear" means linear layers, as in PEFT: convolutions are not adapted
    layout = _layout_for(cand, config, layouts)
    layers = None
    if ltt is not None:
      if layout.stacked:
        layers = tuple(i for i in ltt if i < cand.shape[0])
        if not layers:
          continue
        if len(layers) == cand.shape[0]:
          layers = None
      elif targets.layer_index(cand.module, config.layers_pattern) not in ltt:
        continue
    specs.append(
      AdapterSpec(
        path=cand.path,
        module=cand.module,
        kernel_shape=cand.shape,
        stacked=layout.stacked,
        fan_in=layout.fan_in,
        rank=config.rank_for(cand.module),
        scale=config.scale_for(cand.module),
        layers=layers,
      )
    )
  if not specs and ltt is None:
    raise ValueError(
      "`target_modules='all-linear'` matched only convolution kernels, which PEFT's all-linear does "
      "not adapt; name them in `target_modules` to adapt them."
    )
  if not specs:
    raise ValueError(
      f"`layers_to_transform`={ltt} selects none of the matched modules; layer indices are "
      f"read from paths like 'layers_3' or 'layers/3' (names {config.layers_pattern or 'default'}) "
      "or from a stacked layer axis."
    )
  return specs


def _init_pair(spec: AdapterSpec, config: LoraConfig, key: jax.Array, dtype: Any) -> dict[str, jax.Array]:
  ka, kb = jax.random.split(key)
  fan_in = math.prod(spec.in_shape)
  f32 = jnp.float32
  uniform_a = lambda: jax.random.uniform(ka, spec.a_shape, f32, -1.0, 1.0) / math.sqrt(fan_in)  # noqa: E731
  init = config.init_lora_weights
  if init is False:
    a = uniform_a()
    b = jax.random.uniform(kb, spec.b_shape, f32, -1.0, 1.0) / math.sqrt(spec.rank)
  elif spec.path[-1] == "embedding":
    # PEFT's Embedding adapter: A zeros, B standard normal.
    a = jnp.zeros(spec.a_shape, f32)
    b = jax.random.normal(kb, spec.b_shape, f32)
  elif init == "gaussian":
    a = jax.random.normal(ka, spec.a_shape, f32) / spec.rank
    b = jnp.zeros(spec.b_shape, f32)
  else:
    a = uniform_a()
    b = jnp.zeros(spec.b_shape, f32)
  return {paths.LORA_A: a.astype(dtype), paths.LORA_B: b.astype(dtype)}


def init_adapters(
  tree: Any,
  config: LoraConfig,
  *,
  key: jax.Array,
  layouts: Mapping[paths.Path, Layout] | None = None,
) -> dict:
  """Builds the adapter tree of ``config`` on ``tree`` (see `jlora.init`)."""
  specs = plan(tree, config, layouts)
  leaves = dict(paths.leaves_with_paths(tree))
  keys = jax.random.split(key, len(specs))
  out: dict = {}
  for spec, k in zip(specs, keys):
    dtype = config.dtype or leaves[spec.path].dtype
    paths.nested_set(out, spec.path, _init_pair(spec, config, k, dtype))
  for path in targets.saved_module_paths(tree, config):
    # A new buffer: the trainable copy never aliases the caller's array.
    paths.nested_set(out, path, jnp.array(leaves[path], copy=True))
  return out


@dataclasses.dataclass(frozen=True)
class Bound:
  """One adapter of an adapter tree, bound to its base kernel."""

  spec: AdapterSpec
  kernel: Any
  a: Any
  b: Any


def bind(tree: Any, lora: Any, config: LoraConfig) -> tuple[list[Bound], dict[paths.Path, Any]]:
  """Pairs each adapter of ``lora`` with its kernel in ``tree``, checking shapes.

  Returns:
    The bound adapters, and ``{path: array}`` for the `modules_to_save` leaves.

  Raises:
    ValueError: naming the path, if an adapter has no kernel in ``tree`` or
      shapes that do not fit it.
  """
  leaves = dict(paths.leaves_with_paths(tree))
  collections = paths.is_collections(tree)
  bound, saved = [], {}
  for path, node in paths.adapter_items(lora):
    where = paths.to_str(path)
    if path not in leaves:
      close = [paths.to_str(p) for p in leaves if p[-2:] == path[-2:]][:3]
      raise ValueError(
        f"The adapter tree has an entry at {where!r} but the base tree has no leaf there"
        + (f" (similar paths: {close})" if close else "")
        + ". Was the adapter made for another model, or for a tree with another top level "
        "(a Linen variables dict vs. its 'params')?"
      )
    kernel = leaves[path]
    if not paths.is_adapter(node):
      if getattr(node, "shape", None) != getattr(kernel, "shape", None):
        raise ValueError(
          f"Saved-module leaf {where!r} has shape {getattr(node, 'shape', None)}, but the base "
          f"leaf has shape {kernel.shape}."
        )
      saved[path] = node
      continue
    a, b = node[paths.LORA_A], node[paths.LORA_B]
    kshape = tuple(kernel.shape)
    stacked = a.ndim + b.ndim - 2 - len(kshape)
    fan_in = a.ndim - 1 - stacked
    ok = (
      stacked >= 0
      and fan_in >= 1
      and b.ndim - 1 - stacked >= 1
      and a.shape[-1] == b.shape[stacked]
      and tuple(a.shape[stacked:-1]) == kshape[stacked : stacked + fan_in]
      and tuple(b.shape[stacked + 1 :]) == kshape[stacked + fan_in :]
      and tuple(a.shape[:stacked]) == tuple(b.shape[:stacked])
      and tuple(a.shape[1:stacked]) == kshape[1:stacked]
    )
    if not ok:
      raise ValueError(
        f"Adapter at {where!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
        f"not factor the kernel of shape {kshape}: expected A (*stacked, *fan_in, r) and "
        "B (*stacked, r, *fan_out)."
      )
    module = paths.module_path(path, collections)
    layers = None
    if stacked and a.shape[0] != kshape[0]:
      ltt = config.layers_to_transform or ()
      layers = tuple(i for i in ltt if i < kshape[0])
      if len(layers) != a.shape[0]:
        raise ValueError(
          f"Adapter at {where!r} covers {a.shape[0]} of the kernel's {kshape[0]} stacked layers, "
          f"but `layers_to_transform`={config.layers_to_transform} selects {len(layers)}."
        )
    rank = int(a.shape[-1])
    if rank != config.rank_for(module):
      raise ValueError(
        f"Adapter at {where!r} has rank {rank} but the config gives rank "
        f"{config.rank_for(module)} for module {module!r}; use the config the adapter was made with."
      )
    spec = AdapterSpec(path, module, kshape, stacked, fan_in, rank, config.scale_for(module), layers)
    bound.append(Bound(spec, kernel, a, b))
  return bound, saved


def delta(spec: AdapterSpec, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """``scale * A @ B`` in the kernel's shape, accumulated in float32, cast to ``dtype``.

  Unselected stacked layers (`layers_to_transform`) get zeros.
  """
  a2 = a.astype(jnp.float32).reshape(spec.stacked_shape + (math.prod(spec.in_shape), spec.rank))
  b2 = b.astype(jnp.float32).reshape(spec.stacked_shape + (spec.rank, math.prod(spec.out_shape)))
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * spec.scale
  d = d.reshape(spec.stacked_shape + spec.in_shape + spec.out_shape)
  if spec.layers is not None:
    full = jnp.zeros(spec.kernel_shape, jnp.float32)
    d = full.at[jnp.asarray(spec.layers)].set(d)
  return d.astype(dtype)


def expand_layers(spec: AdapterSpec, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``A``, ``B`` over all stacked layers: zeros in ``B`` for unselected layers."""
  if spec.layers is None:
    return a, b
  n = spec.kernel_shape[0]
  idx = jnp.asarray(spec.layers)
  a_full = jnp.zeros((n,) + a.shape[1:], a.dtype).at[idx].set(a)
  b_full = jnp.zeros((n,) + b.shape[1:], b.dtype).at[idx].set(b)
  return a_full, b_full
