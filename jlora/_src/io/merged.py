"""`save_merged`: the merged model as an ordinary checkpoint (orbax or safetensors), to serve without jlora.

Shapes: Flax layout throughout; a kernel is ``(fan_in..., fan_out...)``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import orbax.checkpoint as ocp

from jlora._src.adapters.merge import merge
from jlora._src.core import paths
from jlora._src.core.config import LoraConfig
from jlora._src.io import processes, storage


def _check_names(merged: Any) -> None:
  seen = set()
  for path, _ in paths.leaves_with_paths(merged):
    name = paths.to_str(path)
    if name in seen:
      raise ValueError(f"Two leaves of the merged tree are both named {name!r} in safetensors.")
    seen.add(name)


def _flat_tensors(merged: Any) -> dict[str, np.ndarray]:
  """Every leaf as a whole numpy array (gathered across the processes of a job when it spans several)."""
  return {
    paths.to_str(path): np.ascontiguousarray(processes.to_numpy(leaf))
    for path, leaf in paths.leaves_with_paths(merged)
  }


def save_merged(
  directory: str | os.PathLike,
  tree: Any,
  lora: Any,
  config: LoraConfig,
  *,
  format: Literal["orbax", "safetensors"] = "orbax",  # noqa: A002 - mirrors the file format's name
) -> str:
  """Writes ``jlora.merge(tree, lora, config)`` as an ordinary checkpoint, to serve without jlora.

  ``"orbax"`` writes a standard orbax checkpoint of the merged tree to
  ``directory`` (restore it with ``ocp.StandardCheckpointer().restore``);
  ``"safetensors"`` writes ``directory/model.safetensors`` with one tensor
  per leaf, named by its path joined with ``/`` (each kernel in its own
  storage order). Both are written to a temporary name first and renamed
  into place.

  Args:
    directory: the output; must not exist yet (orbax) or must not hold a
      ``model.safetensors`` yet (safetensors).
    tree: the base tree.
    lora: the adapter tree.
    config: its config.
    format: ``"orbax"`` or ``"safetensors"``.

  Returns:
    The path written.

  Raises:
    FileExistsError: if the output exists.
    TypeError: if ``config`` is not a `LoraConfig`.
    ValueError: for an unknown ``format`` or an adapter that does not fit.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp, safetensors.numpy, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> path = jlora.save_merged(tempfile.mkdtemp(), params, lora, cfg, format="safetensors")
    >>> merged = safetensors.numpy.load_file(path)["q_proj/kernel"]
    >>> bool(jnp.allclose(merged, jlora.merge(params, lora, cfg)["q_proj"]["kernel"]))
    True
  """
  with processes.together("jlora.save_merged"):
    if format not in ("orbax", "safetensors"):
      raise ValueError(f"`format` must be 'orbax' or 'safetensors'; got {format!r}.")
    if not isinstance(config, LoraConfig):
      raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
    directory = storage.resolve(directory)
    out = directory if format == "orbax" else directory / "model.safetensors"
    if storage.exists(out):
      raise FileExistsError(
        f"{storage.show(out)!r} already exists; save the merged model to a new directory."
      )
    merged = merge(tree, lora, config)
    if format == "safetensors":
      _check_names(merged)
  if format == "orbax":
    # Orbax writes a temporary directory and renames it (in place + a commit marker on gs://); every
    # process of a job enters the save.
    with ocp.StandardCheckpointer(multiprocessing_options=processes.orbax_options()) as ckptr:
      ckptr.save(directory, merged)
    return storage.show(directory)
  import safetensors.numpy  # noqa: PLC0415

  tensors = _flat_tensors(merged)
  meta = {"format": "flax", "producer": "jlora"}

  def write() -> None:
    storage.mkdir(directory)
    storage.write_file(out, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=meta))

  processes.on_primary("jlora.save_merged", write)
  return storage.show(out)
