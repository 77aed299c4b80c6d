"""Adapter trees: creating them (`init`) and reading them back against a base tree.

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters import dora
from jlora._src.core import agreement, layouts, paths, targets
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config, residual_init
from jlora._src.core.layouts import Layout
from jlora._src.interpret import values

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


def _override(cand: targets.Candidate, config: LoraConfig) -> Layout | None:
  """The user's `layout_pattern` layout for a kernel, checked against its rank."""
  return layouts.from_pattern(config.layout_for(cand.names), cand.shape, paths.to_str(cand.path))


def _layout_for(cand: targets.Candidate, config: LoraConfig, inferred: Layouts) -> Layout:
  """A kernel's layout: `layout_pattern`, else the model's use, else `layouts.default_layout`."""
  layout = _override(cand, config) or inferred.get(cand.path)
  return layout or layouts.default_layout(cand.module, cand.shape, paths.to_str(cand.path))


def _selected_layers(
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
    adapted, layers = _selected_layers(cand, layout, config)
    if adapted:
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


def _init_pair(spec: AdapterSpec, config: LoraConfig, key: jax.Array, dtype: Any) -> dict[str, jax.Array]:
  ka, kb = jax.random.split(key)
  fan_in = math.prod(spec.in_shape)
  f32 = jnp.float32
  uniform_a = lambda: jax.random.uniform(ka, spec.a_shape, f32, -1.0, 1.0) / math.sqrt(fan_in)  # noqa: E731
  init = config.init_lora_weights
  if residual_init(init):
    raise ValueError(
      f"`init_lora_weights`={init!r} computes the adapter from the kernel and changes the base; build it "
      "with `jlora.init_with_residual`."
    )
  if init is False:
    a = uniform_a()
    b = jax.random.uniform(kb, spec.b_shape, f32, -1.0, 1.0) / math.sqrt(spec.rank)
  elif spec.path[-1] in targets.EMBEDDING_LEAVES or "gather" in spec.layout.ops:
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
  layouts: Layouts | None = None,
  linear: Any = None,
) -> dict:
  """Builds the adapter tree of ``config`` on ``tree`` (see `jlora.init`)."""
  specs = plan(tree, config, layouts, linear)
  leaves = dict(paths.leaves_with_paths(tree))
  keys = jax.random.split(key, len(specs))
  out: dict = {}
  for spec, k in zip(specs, keys):
    dtype = config.dtype or leaves[spec.path].dtype
    pair = _init_pair(spec, config, k, dtype)
    if config.use_dora:
      kernel_view = view(spec, leaves[spec.path], pair[paths.LORA_A], pair[paths.LORA_B])
      norm = dora.initial_magnitude(kernel_view, spec.layers)
      dora.check_initial(spec.where, norm, dtype)
      pair[paths.LORA_MAGNITUDE] = norm.astype(dtype)
    paths.nested_set(out, spec.path, pair)
  add_saved_copies(out, tree, config, specs)
  return out


def saved_paths(tree: Any, config: LoraConfig, specs: list[AdapterSpec]) -> list[paths.Path]:
  """The leaves trained in full beside the adapters ``specs``: `modules_to_save` leaves and the
  biases ``config.bias`` trains, in tree order."""
  saved = targets.saved_module_paths(tree, config)
  biases = targets.bias_paths(tree, config, {spec.module for spec in specs})
  check_bias_layers(specs, biases, config, paths.is_collections(tree))
  return saved + [p for p in biases if p not in set(saved)]


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


def add_saved_copies(out: dict, tree: Any, config: LoraConfig, specs: list[AdapterSpec]) -> None:
  """Puts a trainable copy of each `saved_paths` leaf into the adapter tree ``out``."""
  leaves = dict(paths.leaves_with_paths(tree))
  for path in saved_paths(tree, config, specs):
    # A new buffer: the trainable copy never aliases the caller's array.
    paths.nested_set(out, path, jnp.array(leaves[path], copy=True))


@dataclasses.dataclass(frozen=True)
class Bound:
  """One adapter of an adapter tree, bound to its base kernel (``m``: DoRA's magnitude, or ``None``)."""

  spec: AdapterSpec
  kernel: Any
  a: Any
  b: Any
  m: Any = None


def view(spec: AdapterSpec, kernel: Any, a: Any, b: Any) -> values.LoraValue:
  """The kernel and its factors as a `LoraValue` over the kernel's axes (all stacked layers)."""
  a, b = expand_layers(spec, *canonical(spec, a, b))
  lay = spec.layout
  return values.LoraValue(
    w=kernel,
    a=a,
    b=jnp.moveaxis(b, len(lay.stacked_axes), -1),
    a_axes=lay.stacked_axes + lay.in_axes,
    b_axes=lay.stacked_axes + lay.out_axes,
    scale=spec.scale,
    site=spec.where,
  )


def _read_layout(
  cand: targets.Candidate, a: Any, b: Any, config: LoraConfig, hint: Callable[[], Layouts]
) -> layouts.Reading:
  """The layout of one adapter: the `layout_pattern` override, else the one reading of the factor
  shapes, else (when several fit) the one the model's use of the kernel gives."""
  where = paths.to_str(cand.path)
  layer_axis_ok = (
    config.layers_to_transform is not None and targets.layer_index(cand.module, config.layers_pattern) is None
  )
  found = layouts.readings(cand.shape, a.shape, b.shape, layer_axis_ok)
  override = _override(cand, config)
  if override is not None:
    found = [f for f in found if f.layout == override]
  elif len(found) > 1:
    used = hint().get(cand.path)
    if used is not None:
      found = [f for f in found if f.layout == used]
  if not found:
    expected = ""
    if override is not None or len(cand.shape) == 2:
      lay = override or Layout("io")
      want = layouts.factor_shapes(lay, cand.shape, config.rank_for(cand.names))
      expected = f" (layout {lay}: lora_A {want[0]}, lora_B {want[1]})"
    raise ValueError(
      f"Adapter at {where!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
      f"not factor the kernel of shape {cand.shape}{expected}: lora_A is the kernel with its fan-out "
      "axes replaced by one rank axis, lora_B the kernel with its fan-in axes replaced by one."
    )
  if len(found) > 1:
    options = ", ".join(repr(f.layout.roles) for f in found)
    raise ValueError(
      f"The adapter at {where!r} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) fits kernel "
      f"{cand.shape} in more than one layout ({options}): its rank equals an axis size. Set "
      f"`layout_pattern` (e.g. {{{cand.module.rsplit('/', 1)[-1]!r}: {found[0].layout.roles!r}}}) to say "
      "which, or use `jlora.wrap`, which reads it from the model."
    )
  return found[0]


def _check_reading(cand: targets.Candidate, reading: layouts.Reading, config: LoraConfig) -> tuple | None:
  """The selected layers of a checked reading (rank, layer selection and count against the config)."""
  where = paths.to_str(cand.path)
  want_rank = config.rank_for(cand.names)
  if reading.rank != want_rank:
    raise ValueError(
      f"Adapter at {where!r} has rank {reading.rank} but the config gives rank {want_rank} for module "
      f"{cand.module!r}; use the config the adapter was made with."
    )
  adapted, layers = _selected_layers(cand, reading.layout, config)
  if not adapted:
    index = targets.layer_index(cand.module, config.layers_pattern)
    which = (
      f"layer {index}"
      if index is not None
      else "a kernel whose path has no layer index ('layers_3', 'layers/3') and no stacked layer axis"
    )
    raise ValueError(
      f"The adapter tree has an adapter at {where!r}, but `layers_to_transform`="
      f"{config.layers_to_transform} does not select it ({which}). Use the config the adapter was made "
      "with, or drop that entry from the adapter tree."
    )
  want = None if layers is None else len(layers)
  if reading.layers != want:
    n = cand.shape[reading.layout.stacked_axes[0]]
    raise ValueError(
      f"Adapter at {where!r} covers {reading.layers or n} of the kernel's {n} stacked layers, "
      f"but `layers_to_transform`={config.layers_to_transform} selects {want or n}."
    )
  return layers


def _base_leaf(leaves: Mapping[paths.Path, Any], path: paths.Path) -> Any:
  """The base leaf under an adapter-tree entry, or an error naming the path."""
  if path in leaves:
    return leaves[path]
  where = paths.to_str(path)
  if path and path[-1] in (paths.LORA_A, paths.LORA_B) and path[:-1] in leaves:
    raise ValueError(
      f"The adapter at {paths.to_str(path[:-1])!r} is not a dict of exactly 'lora_A' and 'lora_B' (it has "
      f"{path[-1]!r} but lacks the other, or holds more keys); make it with `jlora.init`."
    )
  close = [paths.to_str(p) for p in leaves if p[-2:] == path[-2:]][:3]
  raise ValueError(
    f"The adapter tree has an entry at {where!r} but the base tree has no leaf there"
    + (f" (similar paths: {close})" if close else "")
    + ". Was the adapter made for another model, or for a tree with another top level "
    "(a Linen variables dict vs. its 'params')?"
  )


def _saved_leaf(
  path: paths.Path, node: Any, kernel: Any, expect: agreement.Expected, config: LoraConfig
) -> Any:
  """A `modules_to_save` copy, checked against the config and its base leaf."""
  agreement.check_saved(path, expect, config)
  if getattr(node, "shape", None) != getattr(kernel, "shape", None):
    raise ValueError(
      f"Saved-module leaf {paths.to_str(path)!r} has shape {getattr(node, 'shape', None)}, but the base "
      f"leaf has shape {kernel.shape}."
    )
  return node


def bind(
  tree: Any,
  lora: Any,
  config: LoraConfig,
  layouts: Callable[[], Layouts] | None = None,
  linear: Callable[[], Collection[paths.Path]] | None = None,
) -> tuple[list[Bound], dict[paths.Path, Any]]:
  """Pairs each adapter of ``lora`` with its kernel in ``tree``, reading its layout.

  The adapter tree must agree with ``config`` both ways (`jlora._src.core.agreement`):
  an adapter on every kernel the config adapts, none elsewhere, and a copy of
  exactly the `modules_to_save` leaves.

  Args:
    tree: the base tree.
    lora: the adapter tree.
    config: its config.
    layouts: called (at most once) when an adapter's shapes fit more than one
      layout, to get the layouts the model's use gives.
    linear: for ``"all-linear"``, called (once) to get the weights the model
      uses as linear layers, each of which must then have an adapter;
      without it (the model unknown) none is required.

  Returns:
    The bound adapters, and ``{path: array}`` for the `modules_to_save` leaves.

  Raises:
    TypeError: if ``config`` is not a `LoraConfig` or ``lora`` not a mapping.
    ValueError: naming the path, if ``lora`` holds no adapter, an adapter has
      no kernel in ``tree``, sits on an integer kernel or one the config does
      not adapt, has shapes that do not fit its kernel, or if an adapter or
      saved copy the config calls for is missing.
  """
  config = check_config(config)
  items = agreement.check_adapter_tree(lora)
  leaves = dict(paths.leaves_with_paths(tree))
  collections = paths.is_collections(tree)
  all_linear = config.target_modules == ALL_LINEAR
  expect = agreement.expected(tree, config, linear() if linear is not None and all_linear else None)
  cache: list[Layouts] = []

  def hint() -> Layouts:
    if not cache:
      cache.append(layouts() if layouts is not None else {})
    return cache[0]

  bound, saved = [], {}
  for path, node in items:
    kernel = _base_leaf(leaves, path)
    if not paths.is_adapter(node):
      saved[path] = _saved_leaf(path, node, kernel, expect, config)
      continue
    a, b = node[paths.LORA_A], node[paths.LORA_B]
    _check_magnitude_presence(path, node, config)
    cand = targets.Candidate(path, paths.module_path(path, collections), tuple(kernel.shape), kernel.dtype)
    agreement.check_targeted(cand, expect, config)
    reading = _read_layout(cand, a, b, config, hint)
    layers = _check_reading(cand, reading, config)
    spec = AdapterSpec(
      path, cand.module, cand.shape, reading.layout, reading.rank, config.scale_for(cand.names), layers
    )
    m = node.get(paths.LORA_MAGNITUDE)
    if m is not None:
      _check_magnitude_shape(spec, m)
    bound.append(Bound(spec, kernel, a, b, m))
  agreement.check_complete(expect, {item.spec.path for item in bound}, saved, config)
  check_bias_layers([item.spec for item in bound], saved, config, collections)
  return bound, saved


def b_rank_axis(spec: AdapterSpec) -> int:
  """Where ``lora_B`` holds its rank axis (at the place of the kernel's first fan-in axis)."""
  first_in = min(spec.layout.in_axes)
  return sum(1 for ax in spec.layout.stacked_axes + spec.layout.out_axes if ax < first_in)


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


def _check_magnitude_presence(path: paths.Path, node: Any, config: LoraConfig) -> None:
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


def _check_magnitude_shape(spec: AdapterSpec, m: Any) -> None:
  want = magnitude_shape(spec)
  if tuple(getattr(m, "shape", ())) != want:
    raise ValueError(
      f"The adapter at {spec.where!r} has {paths.LORA_MAGNITUDE} of shape {tuple(getattr(m, 'shape', ()))}, "
      f"but its kernel {spec.kernel_shape} and lora_B {spec.b_shape} call for {want} (lora_B's shape "
      "without its rank axis)."
    )


def bound_adapters(
  lora: Any, config: LoraConfig, base: Any, layouts: Layouts | None = None
) -> tuple[list[Bound], dict]:
  """The adapters of ``lora`` (bound to ``base`` when given, else read from their factor shapes)
  and its saved copies: for what needs no model (export, combination, PiSSA conversion).
  ``layouts``: layouts read off the model, for factor shapes that fit several (`bind`)."""
  if base is not None:
    return bind(base, lora, config, None if layouts is None else lambda: layouts)
  saved = {p: x for p, x in paths.adapter_items(lora) if not paths.is_adapter(x)}
  return _read_without_base(lora, config), saved


def _read_without_base(lora: Any, config: LoraConfig) -> list[Bound]:
  """Adapter specs read from the factor shapes alone (no base tree)."""
  collections = paths.is_collections(lora)
  bound = []
  for path, node in paths.adapter_items(lora):
    if not paths.is_adapter(node):
      continue
    module = paths.module_path(path, collections)
    cand = targets.Candidate(path, module, (), None)
    a, b = node[paths.LORA_A], node[paths.LORA_B]
    pattern = config.layout_for(cand.names)
    found = [
      (lay, shape)
      for lay, shape in layouts.kernels_for(a.shape, b.shape, config.rank_for(cand.names))
      if _fits(pattern, lay, shape, paths.to_str(cand.path))
    ]
    if len(found) != 1:
      raise ValueError(
        f"Cannot tell the layout of the adapter at {paths.to_str(path)!r} (lora_A {tuple(a.shape)}, "
        f"lora_B {tuple(b.shape)}) from its shapes; pass `base=` (the base tree)."
      )
    layout, shape = found[0]
    layers = None
    if layout.stacked_axes and config.layers_to_transform is not None:
      if targets.layer_index(module, config.layers_pattern) is None:
        layers = tuple(config.layers_to_transform[: shape[layout.stacked_axes[0]]])
    spec = AdapterSpec(
      path, module, shape, layout, config.rank_for(cand.names), config.scale_for(cand.names), layers
    )
    bound.append(Bound(spec, None, a, b, node.get(paths.LORA_MAGNITUDE)))
  return bound


def _fits(pattern: Any, layout: layouts.Layout, shape: tuple[int, ...], where: str) -> bool:
  """Whether a `layout_pattern` value allows ``layout`` for a candidate kernel of ``shape``."""
  try:
    return layouts.from_pattern(pattern, shape, where) in (None, layout)
  except ValueError:  # a pattern of another rank: not this candidate
    return False


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
  """
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
