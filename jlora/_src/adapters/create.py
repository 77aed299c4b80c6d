"""Creating adapter trees: `init_adapters` (`jlora.init` without a residual) and the trained copies.

See `jlora._src.adapters.spec` for the tree and its shapes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.adapters import dora
from jlora._src.adapters.bind import lora_value
from jlora._src.adapters.spec import AdapterSpec, Bound, Layouts, check_bias_layers, plan
from jlora._src.core import paths, targets
from jlora._src.core.config import LoraConfig, residual_init


def _init_pair(spec: AdapterSpec, config: LoraConfig, key: jax.Array, dtype: Any) -> dict[str, jax.Array]:
  ka, kb = jax.random.split(key)
  fan_in = math.prod(spec.in_shape) * spec.layout.groups  # lora_A sees all of a grouped conv's inputs
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
      kernel = lora_value(Bound(spec, leaves[spec.path], pair[paths.LORA_A], pair[paths.LORA_B]))
      norm = dora.initial_magnitude(kernel, spec.layers)
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


def add_saved_copies(out: dict, tree: Any, config: LoraConfig, specs: list[AdapterSpec]) -> None:
  """Puts a trainable copy of each `saved_paths` leaf into the adapter tree ``out``."""
  leaves = dict(paths.leaves_with_paths(tree))
  for path in saved_paths(tree, config, specs):
    # A new buffer: the trainable copy never aliases the caller's array.
    paths.nested_set(out, path, jnp.array(leaves[path], copy=True))
