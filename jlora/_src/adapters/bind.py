"""Reading an adapter tree against a base tree (`bind`), and a bound adapter as the interpreter's `LoraValue`.

See `jlora._src.adapters.spec` for the tree and its shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.adapters import dora
from jlora._src.adapters.bank import BankConfig
from jlora._src.adapters.spec import (
  AdapterSpec,
  Bound,
  Layouts,
  canonical,
  check_bias_layers,
  expand_layers,
  layout_override,
  selected_layers,
)
from jlora._src.core import agreement, layouts, paths, targets
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config
from jlora._src.core.layouts import Layout
from jlora._src.interpret import values


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
  override = layout_override(cand, config)
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
  adapted, layers = selected_layers(cand, reading.layout, config)
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
    dora.check_magnitude_presence(path, node, config)
    cand = targets.Candidate(path, paths.module_path(path, collections), tuple(kernel.shape), kernel.dtype)
    agreement.check_targeted(cand, expect, config)
    reading = _read_layout(cand, a, b, config, hint)
    layers = _check_reading(cand, reading, config)
    spec = AdapterSpec(
      path, cand.module, cand.shape, reading.layout, reading.rank, config.scale_for(cand.names), layers
    )
    m = node.get(paths.LORA_MAGNITUDE)
    if m is not None:
      dora.check_magnitude_shape(spec, m)
    bound.append(Bound(spec, kernel, a, b, m))
  agreement.check_complete(expect, {item.spec.path for item in bound}, saved, config)
  check_bias_layers([item.spec for item in bound], saved, config, collections)
  return bound, saved


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


def lora_value(item: Bound, routed: tuple[float, ...] | None = None) -> values.LoraValue:
  """The interpreter's view of a bound adapter: its kernel and factors as a `LoraValue` over the
  kernel's axes (all stacked layers; unselected layers get zero factors), with DoRA's scale ``g`` when
  ``item`` has a magnitude. For a bank (``routed``: the adapters' scales), ``item``'s factors hold all
  N adapters on a leading axis, laid side by side on the rank axis.

  Raises:
    ValueError: for a DoRA or grouped convolution's adapter in a bank.
  """
  spec = item.spec
  lay = spec.layout
  if routed is not None and lay.groups > 1:
    raise ValueError(
      f"The adapter at {spec.where!r} adapts a grouped convolution (`feature_group_count`={lay.groups}), "
      "whose grouped lora_B holds rank / groups features per group: a bank (`jlora.stack`) lays adapters "
      "side by side on the rank axis, which would mix their groups. Leave the module out of the banked "
      "adapters (`exclude_modules`), or apply those adapters alone."
    )

  def canonical_factors(a: Any, b: Any) -> tuple[Any, Any]:
    a, b = expand_layers(spec, *canonical(spec, a, b))
    return a, jnp.moveaxis(b, len(lay.stacked_axes), -1)

  if routed is None:
    a, b = canonical_factors(item.a, item.b)
  else:
    fold = lambda f: jnp.moveaxis(f, 0, -2).reshape(*f.shape[1:-1], -1)  # noqa: E731
    a, b = map(fold, jax.vmap(canonical_factors)(item.a, item.b))
  value = values.LoraValue(
    w=item.kernel,
    a=a,
    b=b,
    a_axes=lay.stacked_axes + lay.in_axes,
    b_axes=lay.stacked_axes + lay.out_axes,
    scale=spec.scale,
    site=spec.where,
    routed=routed,
    groups=lay.groups,
  )
  if item.m is None:
    return value
  if routed is not None:
    raise ValueError(
      f"The adapter at {spec.where!r} is a DoRA adapter (`use_dora=True`): a bank of adapters "
      "(`jlora.stack`) routes plain LoRA adapters only; stack adapters made without `use_dora`, or "
      "apply this one alone."
    )
  return dataclasses.replace(value, g=dora.scale(value, item.m, spec.layers))


def bind_bank(
  tree: Any, lora: Any, bank: BankConfig, layouts: Callable[[], Layouts] | None = None
) -> list[Bound]:
  """Binds a bank's stacked tree: adapter 0's part is checked against the base (as one adapter of
  ``bank.lora_config``), and each bound item then carries all N adapters' factors (see `lora_value`).

  Raises:
    ValueError: if a leaf lacks the leading adapter axis, or as `bind`.
  """
  n = bank.num_adapters
  leaves = paths.leaves_with_paths(lora)
  for path, leaf in leaves:
    if getattr(leaf, "ndim", 0) < 1 or leaf.shape[0] != n:
      raise ValueError(
        f"The bank's adapter tree has {tuple(getattr(leaf, 'shape', ()))} at {paths.to_str(path)!r}, but its "
        f"config stacks {n} adapters: every leaf needs a leading adapter axis of size {n}. Pass `bank.lora` "
        "with its own `bank.config`."
      )
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), lora)  # shapes suffice
  bound, _ = bind(tree, one, bank.lora_config, layouts)
  full = dict(leaves)
  return [
    dataclasses.replace(
      item, a=full[(*item.spec.path, paths.LORA_A)], b=full[(*item.spec.path, paths.LORA_B)]
    )
    for item in bound
  ]
