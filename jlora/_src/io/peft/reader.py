"""The file's tensors: opening adapter_model.safetensors (dtypes and jlora's checksum checked) and
reading the checked tensors into an adapter tree (factors in the kernels' axis order, DoRA's magnitudes,
trained copies). See `jlora._src.io.peft.common` for the shapes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from jlora._src.adapters import dora
from jlora._src.adapters.bind import lora_value
from jlora._src.adapters.spec import AdapterSpec, Bound, from_canonical
from jlora._src.core import paths, targets
from jlora._src.core.config import LoraConfig
from jlora._src.io import storage
from jlora._src.io.peft import common
from jlora._src.io.peft import config as peft_config
from jlora._src.io.peft import conv as peft_conv
from jlora._src.io.peft import experts as peft_experts
from jlora._src.io.peft.common import CONFIG_NAME, WEIGHTS_NAME
from jlora._src.io.peft.matching import Match
from jlora._src.io.peft.names import Keys, magnitude_key

ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _open_weights(
  directory: epath.Path, files: contextlib.ExitStack
) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
  import safetensors  # noqa: PLC0415

  where, path = storage.show(directory), storage.show(directory / WEIGHTS_NAME)
  if not storage.is_file(directory / WEIGHTS_NAME):
    if storage.is_file(directory / "adapter_model.bin"):
      raise ValueError(
        f"{where!r} holds only a pickled adapter_model.bin; jlora never unpickles files. Re-save "
        "the adapter with PEFT's `save_pretrained(..., safe_serialization=True)`."
      )
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {where!r}.")
  try:
    handle = safetensors.safe_open(files.enter_context(storage.local_copy(directory / WEIGHTS_NAME)), "numpy")
    info = {}
    for key in handle.keys():
      sl = handle.get_slice(key)
      info[key] = (tuple(sl.get_shape()), sl.get_dtype())
  except Exception as e:  # safetensors raises SafetensorError and others on bad headers
    raise ValueError(
      f"{path!r} is not a readable safetensors file ({e}); it is truncated or corrupted."
    ) from e
  return handle, info


def open_checked(
  directory: epath.Path, files: contextlib.ExitStack
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """The PEFT config, the tensor handle and index: dtypes and jlora's checksum checked."""
  pcfg = peft_config.read_peft_config(directory / CONFIG_NAME)
  handle, info = _open_weights(directory, files)
  for key, (_, dtype) in info.items():
    if dtype not in ST_DTYPES:
      raise ValueError(
        f"{storage.show(directory / WEIGHTS_NAME)!r}: tensor {key!r} has dtype {dtype}; LoRA weights must "
        f"be one of {sorted(ST_DTYPES)}."
      )
  _verify_checksum(handle, info, pcfg, directory)
  return pcfg, handle, info


def _verify_checksum(
  handle: Any, info: Mapping[str, Any], pcfg: Mapping[str, Any], directory: epath.Path
) -> None:
  """Checks jlora's checksum over both files, when the adapter was written by `export_peft`."""
  want = (handle.metadata() or {}).get(common.CHECKSUM_KEY)
  if want is None:
    return  # written by PEFT or by hand: nothing to check against
  weights_path = storage.show(directory / WEIGHTS_NAME)
  tensors = {key: read_tensor(handle, key, weights_path) for key in info}
  if common.checksum(pcfg, tensors) != want:
    raise ValueError(
      f"{storage.show(directory)!r}: {CONFIG_NAME} and {WEIGHTS_NAME} fail the checksum jlora wrote with "
      "them: a file was corrupted (or edited) after `export_peft`. Re-export the adapter, or restore the "
      "files."
    )


def read_tensor(handle: Any, key: str, weights_path: str) -> np.ndarray:
  try:
    return handle.get_tensor(key)
  except Exception as e:  # safetensors raises its own error types for a truncated file
    raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e


def read_factors(handle: Any, m: Match, keys: Keys, weights_path: str) -> tuple[np.ndarray, np.ndarray]:
  """The canonical factors of one weight, read from the file (zeros for missing fused parts)."""
  get = lambda key: read_tensor(handle, key, weights_path)  # noqa: E731

  in_shape = tuple(m.cand.shape[i] for i in m.layout.in_axes)
  out_shape = tuple(m.cand.shape[i] for i in m.layout.out_axes)
  parts = {}
  for index, name in m.names:
    key_a, key_b = keys(name, m.embedding)
    if m.experts:
      experts, where = m.cand.shape[m.layout.stacked_axes[-1]], paths.to_str(m.cand.path)
      parts[index] = peft_experts.from_peft(
        get(key_a), get(key_b), m.layout, name, experts=experts, where=where
      )
    elif m.conv:
      parts[index] = peft_conv.from_peft(get(key_a), get(key_b))
    else:
      parts[index] = (get(key_a).T.reshape(in_shape + (m.rank,)), get(key_b).T.reshape((m.rank,) + out_shape))
  if not m.layout.stacked_axes or (m.experts and not m.layer_axis):
    return parts[None]
  ids = [i for i, _ in m.names] if m.layer_axis else range(m.cand.shape[m.layout.stacked_axes[0]])
  zero = tuple(np.zeros_like(x) for x in next(iter(parts.values())))
  a = np.stack([parts.get(i, zero)[0] for i in ids])
  b = np.stack([parts.get(i, zero)[1] for i in ids])
  return a, b


def read_magnitude(handle: Any, m: Match, spec: AdapterSpec, kernel: Any, weights_path: str) -> Any:
  """DoRA's magnitude of one weight in the kernel's axis order, read from the file; the parts of a
  fused weight the file does not adapt get the norms of their kernel (a DoRA no-op, as their B is 0)."""
  out_shape = tuple(m.cand.shape[i] for i in m.layout.out_axes)
  parts = {}
  for index, name in m.names:
    key = magnitude_key(name)
    try:
      arr = handle.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for a missing or truncated tensor
      raise ValueError(
        f"{weights_path!r}: cannot read DoRA's {key!r} ({e}); adapter_config.json says `use_dora` but "
        "the file lacks the magnitude vector of this module."
      ) from e
    entry = peft_conv.entry_shape(m.layout, m.cand.shape)
    if arr.size != math.prod(out_shape) or (m.conv and arr.shape != peft_conv.magnitude_shape(entry)):
      raise ValueError(
        f"{weights_path!r}: {key!r} has shape {tuple(arr.shape)}, but kernel {paths.to_str(m.cand.path)!r} "
        f"has {math.prod(out_shape)} output features ({out_shape})"
        + (f"; PEFT's ConvNd magnitude is {peft_conv.magnitude_shape(entry)}." if m.conv else ".")
      )
    parts[index] = jnp.asarray(arr.reshape(out_shape))
  if not m.layout.stacked_axes:
    return dora.magnitude_from_canonical(spec, parts[None])
  ids = [i for i, _ in m.names] if m.layer_axis else list(range(m.cand.shape[m.layout.stacked_axes[0]]))
  if any(i not in parts for i in ids):
    zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    kernel_value = lora_value(Bound(spec, kernel, zeros(spec.a_shape), zeros(spec.b_shape)))
    norms = dora.canonical_magnitude(spec, dora.initial_magnitude(kernel_value, None))
    parts = {i: parts.get(i, norms[i]) for i in ids}
  dtype = next(iter(parts.values())).dtype
  return dora.magnitude_from_canonical(spec, jnp.stack([parts[i].astype(dtype) for i in ids]))


def build_tree(
  handle: Any,
  tree: Any,
  config: LoraConfig,
  *,
  matches: list[Match],
  keys: Keys,
  saved: Mapping[paths.Path, str],
  biases: Mapping[paths.Path, str],
  where: str,
) -> dict:
  """Reads the checked tensors into the adapter tree (factors in the kernels' axis order)."""
  lora: dict = {}
  leaves = dict(paths.leaves_with_paths(tree))
  for m in matches:
    a, b = read_factors(handle, m, keys, where)
    spec = AdapterSpec(m.cand.path, m.cand.module, m.cand.shape, m.layout, m.rank, 1.0, None)
    a, b = from_canonical(spec, jnp.asarray(a), jnp.asarray(b))
    node = {paths.LORA_A: a, paths.LORA_B: b}
    if config.use_dora:
      node[paths.LORA_MAGNITUDE] = read_magnitude(handle, m, spec, leaves[m.cand.path], where)
    paths.nested_set(lora, m.cand.path, node)
  for path in targets.saved_module_paths(tree, config):
    if path in saved:
      arr = read_tensor(handle, saved[path], where)
      arr = arr.T if common.SAVED_LEAVES[str(path[-1])][1] else arr
      paths.nested_set(lora, path, jnp.asarray(arr, dtype=leaves[path].dtype))
    else:  # a leaf PyTorch's module does not have: keep the base value, as PEFT's copy does
      paths.nested_set(lora, path, jnp.array(leaves[path], copy=True))
  saved_set = set(targets.saved_module_paths(tree, config))
  for path in targets.bias_paths(tree, config, {m.cand.module for m in matches}):
    if path not in saved_set:  # a bias the file lacks (PyTorch's module has none): the base value
      arr = read_tensor(handle, biases[path], where) if path in biases else leaves[path]
      paths.nested_set(lora, path, jnp.array(arr, dtype=leaves[path].dtype, copy=True))
  return lora
