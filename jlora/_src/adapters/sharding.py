"""Sharding adapters: deriving their placement from the base kernels'.

An adapter follows its kernel: each factor axis that is a kernel axis takes
that axis's mesh axes, and the rank axis is replicated. For a Dense kernel
``(in, out)`` with ``PartitionSpec(s_in, s_out)``, ``lora_A`` ``(in, r)`` gets
``PartitionSpec(s_in, None)`` and ``lora_B`` ``(r, out)`` gets
``PartitionSpec(None, s_out)``; stacked axes keep theirs in both, in any
storage order (see `jlora.Layout`).

So ``x @ A`` needs the same collectives as the
contraction ``x @ W`` and ``(x @ A) @ B`` produces the output sharded as
``x @ W`` does. `modules_to_save` copies take their base leaf's spec. When
`layers_to_transform` shortens a stacked axis, that axis keeps its kernel's
mesh axes only if their size divides the new length (known only with a
mesh); otherwise it is replicated.

The base placement can be given as `jax.sharding.PartitionSpec` or
`jax.sharding.NamedSharding` trees, read off sharded arrays or
``jax.ShapeDtypeStruct(..., sharding=...)``, or taken from Flax's
``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes (logical axis names
are turned into mesh axes with Flax's `logical_to_mesh_axes` and the given
or contextual rules).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax.core import meta
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from jlora._src.adapters.bind import bind
from jlora._src.adapters.spec import AdapterSpec, b_rank_axis
from jlora._src.core import layouts, paths
from jlora._src.core.config import LoraConfig, longest_match
from jlora._src.core.qarray import is_quantized

Spec = PartitionSpec | NamedSharding
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _is_spec_leaf(x: Any) -> bool:
  return isinstance(x, (meta.AxisMetadata, PartitionSpec, Sharding)) or is_quantized(x)


def _leaf_spec(
  x: Any, where: str, rules: LogicalRules | None
) -> tuple[PartitionSpec | None, Mesh | None] | None:
  """``(spec, mesh)`` of one base leaf; ``None`` if the leaf says nothing about placement."""
  if isinstance(x, spmd.LogicallyPartitioned):
    return spmd.logical_to_mesh_axes(x.names, rules if rules is not None else x.rules), x.mesh
  if isinstance(x, meta.Partitioned):
    return x.get_partition_spec(), x.mesh
  if isinstance(x, PartitionSpec):
    return (spmd.logical_to_mesh_axes(tuple(x), rules) if rules is not None else x), None
  if is_quantized(x):  # a quantized weight is placed as its codes are (same rank as the weight)
    x = x.codes
  sharding = x if isinstance(x, Sharding) else getattr(x, "sharding", None)
  if sharding is None:
    return None
  if isinstance(sharding, NamedSharding):
    return sharding.spec, sharding.mesh
  if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
    return PartitionSpec(), None
  raise TypeError(
    f"Base leaf {where!r} has a {type(sharding).__name__}; jlora derives adapter placement from "
    "`NamedSharding`s or `PartitionSpec`s. Place the base params with `NamedSharding(mesh, spec)`."
  )


def _base_specs(source: Any, rules: LogicalRules | None) -> dict[paths.Path, tuple[Any, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(source, is_leaf=_is_spec_leaf)
  out = {}
  for key_path, leaf in flat:
    path = paths.normalize(key_path)
    found = _leaf_spec(leaf, paths.to_str(path), rules)
    if found is not None:
      out[path] = found
  return out


def _mesh_axes_size(mesh: Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _check_spec(spec: PartitionSpec, ndim: int, mesh: Mesh | None, what: str) -> None:
  if len(spec) > ndim:
    raise ValueError(f"{what} has {len(spec)} entries for an array of {ndim} dimensions.")
  if mesh is not None:
    for entry in spec:
      for name in entry if isinstance(entry, tuple) else (entry,):
        if name is not None and name not in mesh.shape:
          raise ValueError(
            f"{what} names mesh axis {name!r}, which the mesh {dict(mesh.shape)} does not have."
            " Logical axis names need `rules=` (Flax logical axis rules)."
          )


def _derive(
  spec: AdapterSpec, kernel_spec: PartitionSpec, mesh: Mesh | None
) -> tuple[PartitionSpec, PartitionSpec]:
  n = len(spec.kernel_shape)
  _check_spec(kernel_spec, n, mesh, f"The spec {kernel_spec} of kernel {spec.where!r} {spec.kernel_shape}")
  entries = list(kernel_spec) + [None] * (n - len(kernel_spec))
  layer_axis = spec.layout.stacked_axes[0] if spec.layers is not None else None
  if layer_axis is not None and entries[layer_axis] is not None:
    if mesh is None or len(spec.layers) % _mesh_axes_size(mesh, entries[layer_axis]):
      entries[layer_axis] = None  # the shortened layer axis cannot follow the kernel's: replicate it
  a, b = (
    PartitionSpec(*(None if t == layouts.RANK else entries[t] for t in spec.layout.factor_axes(side)))
    for side in "ab"
  )
  return a, b


def _as_spec(value: Any, what: str) -> PartitionSpec:
  if isinstance(value, PartitionSpec):
    return value
  if isinstance(value, (tuple, list)):
    return PartitionSpec(*value)
  raise TypeError(f"{what} must be a PartitionSpec (or a tuple of its entries); got {value!r}.")


def _check_overrides(overrides: Mapping[str, Any], modules: list[str]) -> dict[str, tuple[Any, Any]]:
  if not isinstance(overrides, Mapping):
    raise TypeError(f"`overrides` must map module patterns to (lora_A spec, lora_B spec); got {overrides!r}.")
  out = {}
  for pattern, pair in overrides.items():
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"`overrides` keys must be non-empty module patterns; got {pattern!r}.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"`overrides` pattern {pattern!r} is not a valid regex: {e}.") from e
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(
        f"`overrides[{pattern!r}]` must be a pair (lora_A spec, lora_B spec), e.g. "
        f"(P('fsdp', None), P(None, 'tp')); got {pair!r}."
      )
    a = _as_spec(pair[0], f"`overrides[{pattern!r}][0]`")
    b = _as_spec(pair[1], f"`overrides[{pattern!r}][1]`")
    if not any(re.fullmatch(rf"(?:.*/)?(?:{pattern})", m) for m in modules):
      raise ValueError(
        f"`overrides` pattern {pattern!r} matches no adapted module. Adapted modules: "
        f"{modules[:12]}{' ...' if len(modules) > 12 else ''}. A pattern is a regex matched "
        "against the module path or a '/'-suffix of it."
      )
    out[pattern] = (a, b)
  return out


def _lookup(
  base: Mapping[paths.Path, tuple[Any, Any]], mesh: Mesh | None, path: paths.Path
) -> tuple[PartitionSpec, Mesh | None]:
  """The kernel spec and mesh of a base leaf (``mesh`` wins where both are given and agree)."""
  where = paths.to_str(path)
  if path not in base:
    raise ValueError(
      f"The base placement has no spec for {where!r}, which the adapter adapts. Pass `specs=` "
      "(a PartitionSpec/NamedSharding tree mirroring the base tree, e.g. "
      "`nn.get_partition_spec(variables)`) or a base tree of sharded arrays."
    )
  spec, leaf_mesh = base[path]
  if mesh is not None and leaf_mesh is not None and leaf_mesh.shape_tuple != mesh.shape_tuple:
    raise ValueError(
      f"The placement of {where!r} is on mesh {dict(leaf_mesh.shape)}, but `mesh` is "
      f"{dict(mesh.shape)}; pass one mesh."
    )
  return (spec if spec is not None else PartitionSpec()), (mesh or leaf_mesh)


def adapter_specs(
  tree: Any,
  lora: Any,
  config: LoraConfig,
  *,
  specs: Any = None,
  mesh: Mesh | None = None,
  rules: LogicalRules | None = None,
  overrides: Mapping[str, tuple[Any, Any]] | None = None,
) -> Any:
  """The placement of an adapter tree, derived from its base kernels' placement.

  Shapes: kernel ``(*stacked, *fan_in, *fan_out)`` with spec
  ``P(*s_stacked, *s_in, *s_out)`` gives ``lora_A`` ``(*stacked, *fan_in, r)``
  the spec ``P(*s_stacked, *s_in, None)`` and ``lora_B``
  ``(*stacked, r, *fan_out)`` the spec ``P(*s_stacked, None, *s_out)``: A
  follows the kernel's fan-in axes, B its fan-out axes, the rank axis is
  replicated. `modules_to_save` copies take their base leaf's spec. A
  stacked axis shortened by `layers_to_transform` is replicated unless the
  mesh is known and its sharding divides the new length.

  Args:
    tree: the base tree (arrays, ``jax.ShapeDtypeStruct`` or Flax boxed
      values): gives each kernel's shape and, when ``specs`` is ``None``, its
      placement (``.sharding`` of arrays and ``ShapeDtypeStruct``; the names of
      ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes).
    lora: the adapter tree, or its abstract value
      (``jax.eval_shape(lambda: jlora.init(...))``).
    config: the config the adapter was made with.
    specs: the base placement, a tree mirroring ``tree`` (it may stop at
      leaves) of ``PartitionSpec``, ``NamedSharding`` or Flax boxes, e.g.
      ``nn.get_partition_spec(abstract_variables)``.
    mesh: the device mesh. With a mesh (or ``NamedSharding`` inputs, which
      carry theirs) the result holds ``NamedSharding`` values; without one it holds
      ``PartitionSpec`` values.
    rules: Flax logical axis rules (``(("embed", "fsdp"), ...)``) turning
      logical axis names into mesh axes. ``nn.LogicallyPartitioned`` boxes use
      these, else their own rules, else those of an enclosing
      ``nn.logical_axis_rules`` context.
    overrides: ``{pattern: (lora_A spec, lora_B spec)}`` replacing the derived
      specs of matching modules (regex on the module path or a ``/``-suffix of
      it; the longest matching pattern wins).

  Returns:
    A tree with the structure of ``lora`` holding ``NamedSharding`` values (with a
    mesh) or ``PartitionSpec`` values.

  Raises:
    ValueError: naming the path, if an adapted kernel has no placement in
      ``specs``/``tree``, a spec has more entries than its array has
      dimensions or names an axis the mesh lacks, an override matches no
      adapted module, or two meshes disagree.
    TypeError: for a base sharding that is not a ``NamedSharding``.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"q_proj": {"kernel": jnp.zeros((16, 32))}}
    >>> cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> jlora.adapter_specs(params, lora, cfg, specs={"q_proj": {"kernel": P("fsdp", "tp")}})
    {'q_proj': {'kernel': {'lora_A': P('fsdp', None), 'lora_B': P(None, 'tp')}}}
  """
  base = _base_specs(tree if specs is None else specs, rules)
  bound, saved = bind(tree, lora, config)
  modules = [item.spec.module for item in bound]
  checked = _check_overrides(overrides, modules) if overrides else {}

  lookup = functools.partial(_lookup, base, mesh)

  def place(spec: PartitionSpec, m: Mesh | None) -> Spec:
    return NamedSharding(m, spec) if m is not None else spec

  out: dict = {}
  for item in bound:
    kernel_spec, m = lookup(item.spec.path)
    a, b = _derive(item.spec, kernel_spec, m)
    hit = longest_match(checked.items(), (item.spec.module, item.spec.param))
    if hit is not None:
      pattern, (a, b) = hit
      where = item.spec.where
      _check_spec(a, len(item.spec.a_shape), m, f"`overrides[{pattern!r}][0]` (lora_A of {where!r})")
      _check_spec(b, len(item.spec.b_shape), m, f"`overrides[{pattern!r}][1]` (lora_B of {where!r})")
    node = {paths.LORA_A: place(a, m), paths.LORA_B: place(b, m)}
    if item.m is not None:  # DoRA's magnitude: placed as lora_B without its rank axis
      entries = list(b) + [None] * (len(item.spec.b_shape) - len(b))
      del entries[b_rank_axis(item.spec)]
      node[paths.LORA_MAGNITUDE] = place(PartitionSpec(*entries), m)
    paths.nested_set(out, item.spec.path, node)
  for path, leaf in saved.items():
    spec, m = lookup(path)
    _check_spec(spec, len(leaf.shape), m, f"The spec {spec} of {paths.to_str(path)!r}")
    paths.nested_set(out, path, place(spec, m))
  return out
