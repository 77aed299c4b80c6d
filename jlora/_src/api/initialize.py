"""`init`: the public entry point that builds an adapter tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.adapters import dora, sharding
from jlora._src.adapters.create import init_adapters
from jlora._src.adapters.spec import plan
from jlora._src.api.layout_inference import infer_layouts, linear_weights, read_uses
from jlora._src.core import layouts as layouts_
from jlora._src.core import paths, targets
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config, residual_init
from jlora._src.core.qarray import is_quantized


def init(
  tree: Any,
  config: LoraConfig,
  *,
  key: jax.Array,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
  shardings: Any = None,
) -> dict:
  """Creates the trainable LoRA adapter tree for ``tree``.

  The result is a new plain nested dict mirroring the paths of the adapted
  kernels only: ``{"lora_A": A, "lora_B": B}`` at each kernel's path, plus
  trainable copies of `modules_to_save` leaves. ``tree`` is neither copied
  nor modified. Each adapter draws from its own split of ``key``.

  Shapes follow the kernel's `jlora.Layout` (which axes are stacked, fan-in,
  fan-out, in any storage order): ``lora_A`` is the kernel with its fan-out
  axes replaced by one rank axis, ``lora_B`` the kernel with its fan-in axes
  replaced by one (Dense ``(in, out)``: A ``(in, r)``, B ``(r, out)``; scanned
  ``(L, in, out)``: A ``(L, in, r)``, B ``(L, r, out)``); the layer axis
  shrinks to the selected layers under `layers_to_transform`. Pass
  ``apply_fn`` and example inputs (arrays or ``jax.ShapeDtypeStruct``; nothing
  is computed) so jlora reads each layout from how the model uses the kernel,
  and so ``"all-linear"`` finds every weight used as a linear layer whatever
  its name; without the model, 2-D kernels are read as ``(in, out)``, others
  need ``config.layout_pattern``, and ``"all-linear"`` adapts leaves named
  ``kernel``.

  Args:
    tree: the base tree: Linen variables (``{"params": ...}``), an NNX
      ``State``, or a nested dict of arrays.
    config: the LoRA config.
    key: a PRNG key.
    apply_fn: the model's apply function, ``apply_fn(tree, *example_args,
      **example_kwargs)``, to read kernel layouts and linear weights from use.
    example_args: example positional inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.
    shardings: where to create the adapter. ``None`` (default): by eager
      computation, on the default device. A tree of ``jax.sharding.Sharding``
      mirroring the adapter tree (from `jlora.adapter_specs`), or one
      ``Sharding`` for every leaf: the adapter is created under
      ``jax.jit(..., out_shardings=shardings)``, so each device computes only
      its own shard and no device ever holds the whole adapter. A
      ``jax.sharding.Mesh``: the same, with the shardings derived from the
      placement ``tree`` carries (sharded arrays, ``jax.ShapeDtypeStruct``
      with ``sharding=``, or Flax ``nn.Partitioned`` boxes under the current
      ``nn.logical_axis_rules``) by `jlora.adapter_specs`. With a sharding,
      the base ``tree`` may be abstract (``jax.ShapeDtypeStruct`` leaves)
      unless it has `modules_to_save` leaves (or biases, `bias`) to copy.

  Returns:
    The adapter tree.

  Raises:
    TypeError: if ``config`` is not a `LoraConfig`.
    ValueError: if a target matches nothing (listing close names and real
      module paths), an N-D kernel's layout is unknown or ambiguous,
      ``shardings`` does not have the adapter tree's structure, or
      ``init_lora_weights`` is PiSSA or OLoRA, which change the base: use
      `jlora.init_with_residual`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"layers_0": {"q_proj": {"kernel": jnp.zeros((16, 32))},
    ...                        "k_proj": {"kernel": jnp.zeros((16, 32))}}}
    >>> cfg = jlora.LoraConfig(r=4, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> jax.tree_util.tree_map(jnp.shape, lora)
    {'layers_0': {'q_proj': {'kernel': {'lora_A': (16, 4), 'lora_B': (4, 32)}}}}
  """
  config = check_config(config)
  if residual_init(config.init_lora_weights):
    raise ValueError(
      f"`init_lora_weights`={config.init_lora_weights!r} moves the principal part of each adapted kernel "
      "into the adapter, so the base must change too (W - scale * A @ B): `jlora.init` returns only the "
      "adapter, and the original base with it would count that part twice. Call `lora, residual = "
      "jlora.init_with_residual(tree, config, key=...)` and use `residual` as the base."
    )
  layouts, linear = None, None
  if apply_fn is not None:
    layouts, linear = read_model(apply_fn, tree, config, example_args, example_kwargs or {})
  if shardings is None:
    return init_adapters(tree, config, key=key, layouts=layouts, linear=linear)
  return _init_sharded(tree, config, key, layouts=layouts, linear=linear, shardings=shardings)


def read_model(
  apply_fn: Callable[..., Any],
  tree: Any,
  config: LoraConfig,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
) -> tuple[dict[paths.Path, layouts_.Layout], set[paths.Path] | None]:
  """The layouts of the kernels ``config`` targets, read from the model's use, and for
  ``"all-linear"`` the weights the model uses as linear layers."""
  linear = None
  if config.target_modules == ALL_LINEAR:
    linear = linear_weights(read_uses(apply_fn, tree, args, kwargs))
  wanted = [c for c in targets.match_targets(tree, config, linear) if config.layout_for(c.names) is None]
  found = infer_layouts(apply_fn, tree, *args, only=[c.path for c in wanted], **kwargs) if wanted else {}
  for c in wanted:  # a 2-D leaf the model does not use keeps the default layout, (in, out)
    if c.path not in found and len(c.shape) != 2:
      raise layouts_.computed_kernel(c.module, c.shape, paths.to_str(c.path))
  return found, linear


def _abstract(x: Any) -> Any:
  return (
    jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else x
  )


def _init_sharded(
  tree: Any,
  config: LoraConfig,
  key: jax.Array,
  *,
  layouts: Mapping[paths.Path, layouts_.Layout] | None,
  linear: set[paths.Path] | None,
  shardings: Any,
) -> dict:
  """`init_adapters` under ``jit`` with ``out_shardings``: every device makes only its shards."""
  # Only the `modules_to_save` leaves are read as values; the rest of the base
  # tree enters the computation by shape and dtype alone.
  leaves = dict(paths.leaves_with_paths(tree))
  every_module = set(targets.all_module_paths(tree))  # `bias="lora_only"`: a superset is enough here
  copied = targets.saved_module_paths(tree, config) + targets.bias_paths(tree, config, every_module)
  if config.use_dora:  # DoRA's magnitude starts at the adapted kernels' norms
    copied += [spec.path for spec in plan(tree, config, layouts, linear)]
  saved = {paths.to_str(p): leaves[p] for p in copied}
  abstract = jax.tree_util.tree_map(_abstract, tree, is_leaf=is_quantized)

  def fn(saved_values: dict, k: jax.Array) -> dict:
    t = jax.tree_util.tree_map_with_path(
      lambda kp, leaf: saved_values.get(paths.to_str(paths.normalize(kp)), leaf), abstract
    )
    return init_adapters(t, config, key=k, layouts=layouts, linear=linear)

  shapes = jax.eval_shape(fn, jax.tree_util.tree_map(_abstract, saved), key)
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = sharding.adapter_specs(tree, shapes, config, mesh=shardings)
  elif not isinstance(shardings, jax.sharding.Sharding):
    want = jax.tree_util.tree_structure(shapes)
    got = jax.tree_util.tree_structure(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if want != got:
      raise ValueError(
        "`shardings` must mirror the adapter tree (build it with `jlora.adapter_specs(tree, "
        f"lora_shapes, config, mesh=mesh)`), or be a Mesh or one Sharding; the adapter tree is {want} "
        f"but `shardings` is {got}."
      )
    bad = [
      paths.to_str(paths.normalize(kp))
      for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
      if not isinstance(s, jax.sharding.Sharding)
    ]
    if bad:
      raise TypeError(
        f"`shardings` holds non-Sharding leaves at {bad[:5]}; PartitionSpecs need a mesh: "
        "`jlora.adapter_specs(..., mesh=mesh)` returns NamedShardings."
      )
  out = jax.jit(fn, out_shardings=shardings)(saved, key)
  for path, leaf in paths.leaves_with_paths(out):  # traced above: DoRA's magnitudes are checked here
    if path[-1] == paths.LORA_MAGNITUDE and leaf.is_fully_addressable:
      dora.check_initial(paths.to_str(path[:-1]), leaf, leaf.dtype)
  return out
