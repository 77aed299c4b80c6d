"""`export_peft`: an adapter as a PEFT LoRA adapter directory (see `jlora._src.io.peft.common` for shapes)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jlora._src.adapters import dora
from jlora._src.adapters.bind import bound_adapters
from jlora._src.adapters.spec import AdapterSpec, Bound, Layouts, canonical
from jlora._src.api.pissa import to_plain_lora
from jlora._src.core import paths, targets
from jlora._src.core.config import LoraConfig
from jlora._src.io import processes, storage
from jlora._src.io.peft import common
from jlora._src.io.peft import conv as peft_conv
from jlora._src.io.peft import experts as peft_experts
from jlora._src.io.peft.common import CONFIG_NAME, WEIGHTS_NAME
from jlora._src.io.peft.config import exported_parameters, peft_config_of
from jlora._src.io.peft.config import exported_targets as _exported_targets
from jlora._src.io.peft.names import (
  PREFIX,
  Keys,
  NameMap,
  PeftParameter,
  checked_name_map,
  default_name_map,
  family_name,
  hf_tree_map,
  is_conv1d,
  magnitude_key,
  name_str,
)


@dataclasses.dataclass(frozen=True)
class _Factors:
  """One PEFT module's factors: ``a`` ``(r, in)`` and ``b`` ``(out, r)`` (an expert parameter's:
  ``(E * r, in)`` and ``(out, r * E)``; a convolution's: ``(r, in, *k)`` and ``(out, r, 1, ...)``);
  DoRA's magnitude ``m`` ``(out,)`` (a convolution's: ``(1, out, 1, ...)``)."""

  index: int | None  # entry of the stacked axis (the layer, for an expert kernel)
  a: np.ndarray
  b: np.ndarray
  m: np.ndarray | None = None


def _peft_factors(item: Bound, names: Mapping[int | None, Any], conv: bool) -> Iterator[_Factors]:
  spec = item.spec
  a, b = (processes.to_numpy(x) for x in canonical(spec, item.a, item.b))
  ids = spec.layers if spec.layers is not None else range(a.shape[0])
  if isinstance(next(iter(names.values())), PeftParameter):
    if item.m is not None:
      raise ValueError(
        f"DoRA adapter at {spec.where!r}: PEFT's `target_parameters` adapters (expert weights) refuse "
        "`use_dora`, so PEFT could not load the file; export expert weights from a plain LoRA adapter."
      )
    if len(spec.layout.stacked_axes) < 2:
      yield _Factors(None, *peft_experts.to_peft(a, b, spec.layout, names[None], spec.where))
      return
    for i, a_l, b_l in zip(ids, a, b):
      yield _Factors(i, *peft_experts.to_peft(a_l, b_l, spec.layout, names[i], spec.where))
    return
  if len(spec.layout.stacked_axes) > 1:
    raise ValueError(
      f"Adapter at {spec.where!r} has {len(spec.layout.stacked_axes)} stacked axes (layout "
      f"{spec.layout}); a PEFT module can carry one at most (exported as one module per entry)."
    )
  m = None if item.m is None else processes.to_numpy(dora.canonical_magnitude(spec, item.m))
  n_in, n_out, r = math.prod(spec.in_shape), math.prod(spec.out_shape), spec.rank

  def flat(a_l: np.ndarray, b_l: np.ndarray, m_l: np.ndarray | None) -> tuple:
    if conv:
      return peft_conv.to_peft(a_l, b_l, m_l)
    return a_l.reshape(n_in, r).T, b_l.reshape(r, n_out).T, None if m_l is None else m_l.reshape(n_out)

  if not spec.layout.stacked_axes:
    yield _Factors(None, *flat(a, b, m))
    return
  for j, (i, a_l, b_l) in enumerate(zip(ids, a, b)):
    yield _Factors(i, *flat(a_l, b_l, None if m is None else m[j]))


def _is_conv(spec: AdapterSpec, names: Mapping[int | None, Any], used: Layouts | None) -> bool:
  """Whether a kernel is written as PEFT's ConvNd adapter: the model uses it in a convolution. Without
  the model, a kernel that could be a convolution's or a multi-axis Linear's is an error."""
  if used is not None and spec.path in used:
    if not peft_conv.is_conv(used[spec.path]):
      return False
    if any(isinstance(n, PeftParameter) for n in names.values()):
      raise ValueError(
        f"The name map gives a `jlora.PeftParameter` for {spec.where!r}, which the model uses in a "
        "convolution: PEFT adapts a convolution as a ConvNd module; return its module name (str)."
      )
    peft_conv.check_layout(used[spec.path], spec.where)  # the layout read off the model, with its ops
    return True
  lay = spec.layout
  if len(lay.in_axes) < 2 or len(lay.out_axes) != 1 or len(lay.stacked_axes) > 1:
    return False
  if any(isinstance(n, PeftParameter) for n in names.values()):
    return False  # an expert parameter (`peft_experts` checks its layout)
  if all(isinstance(n, str) and n == family_name(spec.path, i) for i, n in names.items()):
    return False  # gemma's, tunix's and keras-hub's multi-axis kernels are Linears in PyTorch
  why = "the model (`apply_fn`) does not use it" if used is not None else "no model was given"
  raise ValueError(
    f"Kernel {spec.where!r} (shape {spec.kernel_shape}, layout {lay}) has {len(lay.in_axes)} fan-in axes and "
    "one fan-out axis: it may be a convolution's (*kernel_size, in, out), which PEFT stores as a ConvNd "
    "adapter (lora_A.weight (r, in, *k)), or a multi-axis Linear's (a DenseGeneral (heads, head_dim, d)), "
    f"which PEFT stores flattened (lora_A.weight (r, in)); the shape cannot tell which, and {why}. Pass "
    "`apply_fn=model.apply, example_args=(x,)` (with `base=`) so jlora reads how the model uses the kernel."
  )


def _known_names(base: Any, bound: list[Bound], name_map: NameMap) -> tuple[set[str], set[str]]:
  """The PEFT names the name map knows in ``base``: every module of PyTorch's module tree (the modules
  of the adaptable weights and of the 1-D leaves (norms), and their parents: ``encoder.stages.0`` is a
  module, which PEFT's suffix ``"0"`` matches), and the expert parameters."""
  by_path = {item.spec.path: item.spec.layout for item in bound}
  names: set[str | PeftParameter] = set()
  for cand in targets.candidates(base):
    layout = by_path.get(cand.path)
    for lay in [layout] if layout is not None else common.name_guesses(cand):
      names.update(n for _, n in common.safe_module_names(cand, lay, name_map))
  for path, leaf in targets.param_leaves(base):
    if len(getattr(leaf, "shape", ())) > 1:  # kernels are named above; a stacked norm has no one name
      continue
    try:
      names.add(name_map(path, None))
    except (ValueError, LookupError, TypeError):  # a leaf the map does not name
      continue
  modules = {n for n in names if isinstance(n, str)}
  modules |= {n.rsplit(".", k)[0] for n in modules for k in range(1, n.count(".") + 1)}
  return modules, {n.name for n in names if isinstance(n, PeftParameter)}


@dataclasses.dataclass
class _Tensors:
  """The file's tensors by PEFT key, with the jlora path each came from (two on one key is an error)."""

  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  origin: dict[str, str] = dataclasses.field(default_factory=dict)

  def put(self, key: str, value: np.ndarray, where: str) -> None:
    if key in self.arrays:
      raise ValueError(
        f"Adapters at {self.origin[key]!r} and {where!r} both map to PEFT key {key!r}; pass a `name_map`. "
        "PEFT adapts each PyTorch module or parameter once: kernels that PyTorch fuses into one (separate "
        "gate and up expert kernels for a fused `gate_up_proj`) have no PEFT format; fuse them in the model."
      )
    self.arrays[key], self.origin[key] = np.ascontiguousarray(value), where


def _adapter_tensors(
  bound: list[Bound], config: LoraConfig, name_map: NameMap, out: _Tensors, used: Layouts | None
) -> tuple[dict[str, int], dict[str, float], list[str]]:
  """Each adapter's ``lora_A``/``lora_B`` (one module per stacked entry, or one expert parameter per
  layer); the rank and alpha by module or parameter name; the expert parameters' names. ``used``: the
  layouts read off the model, with the ops that use each kernel (``None``: no model)."""
  name_map = checked_name_map(name_map)
  named = [
    (item, dict(common.module_names(s.path, s.layout, s.kernel_shape, name_map, s.layers)))
    for item in bound
    for s in [item.spec]
  ]
  params = {
    n.name: (n, item.spec.where)
    for item, names in named
    for n in names.values()
    if isinstance(n, PeftParameter)
  }
  if params:
    _check_experts_exportable(config, params, [n for _, names in named for n in names.values()])
  keys = Keys(p for p, _ in params.values())
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  for item, names in named:
    spec = item.spec
    embedding = common.is_embedding(spec.path)
    if embedding and (len(spec.in_shape) != 1 or len(spec.out_shape) != 1):
      raise ValueError(
        f"Embedding adapter at {spec.where!r} must be 2-D (vocab, d); got {spec.kernel_shape}."
      )
    conv = not embedding and _is_conv(spec, names, used)
    for f in _peft_factors(item, names, conv):
      name = names[f.index]
      key_a, key_b = keys(name, embedding)
      out.put(key_a, f.a, spec.where)
      out.put(key_b, f.b, spec.where)
      if f.m is not None:
        out.put(magnitude_key(name_str(name)), f.m, spec.where)
      ranks[name_str(name)] = spec.rank
      alphas[name_str(name)] = config.alpha_for((spec.module, spec.param))
  return ranks, alphas, sorted(params)


def _check_experts_exportable(config: LoraConfig, params: Mapping[str, tuple], names: list) -> None:
  """PEFT's `ParamWrapper` refuses dropout, and `fan_in_fan_out` (which GPT-2's modules need)."""
  where = next(iter(params.values()))[1]
  if config.lora_dropout:
    raise ValueError(
      f"Expert adapter at {where!r}: PEFT's `target_parameters` adapters refuse `lora_dropout` != 0 "
      f"(the config has {config.lora_dropout}), so PEFT could not load the file. Export with "
      "`dataclasses.replace(config, lora_dropout=0.0)` (dropout does not change the weights)."
    )
  conv1d = [n for n in names if isinstance(n, str) and is_conv1d(n)]
  if conv1d:
    raise ValueError(
      f"Expert adapter at {where!r} and GPT-2 `Conv1D` module {conv1d[0]!r} cannot share a PEFT file: "
      "the Conv1D modules need `fan_in_fan_out=True`, which PEFT's `target_parameters` adapters refuse."
    )


def _saved_tensors(
  saved: Mapping[paths.Path, Any],
  config: LoraConfig,
  collections: bool,
  *,
  name_map: NameMap,
  ranks: Mapping[str, int],
  out: _Tensors,
) -> list[str]:
  """Trained biases and `modules_to_save` copies as PEFT keys; the saved modules' names."""
  name_map = checked_name_map(name_map)
  saved_modules = []
  for path, leaf in saved.items():
    where = paths.to_str(path)
    leaf_name = str(path[-1])
    arr = processes.to_numpy(leaf)
    if _trained_bias(path, config, collections):
      if arr.ndim != 1:
        raise ValueError(
          f"Trained bias {where!r} has shape {arr.shape}: a bias stacked over layers has no PEFT key "
          "(PEFT names one module per layer); export a model whose layers are not stacked."
        )
      module = name_map(path, None)
      # PEFT keeps an adapted module's bias on its wrapped base layer.
      out.put(f"{PREFIX}{module}{'.base_layer' if module in ranks else ''}.bias", arr, where)
      continue
    if leaf_name not in common.SAVED_LEAVES or (leaf_name == "kernel" and arr.ndim != 2):
      raise ValueError(
        f"`modules_to_save` leaf {where!r} (shape {arr.shape}) has no PyTorch equivalent jlora knows; "
        f"only {sorted(common.SAVED_LEAVES)} leaves (2-D kernels) are exported."
      )
    torch_name, transpose = common.SAVED_LEAVES[leaf_name]
    module = name_map(path, None)
    out.put(f"{PREFIX}{module}.{torch_name}", arr.T if transpose else arr, where)
    saved_modules.append(module)
  return saved_modules


def export_peft(
  directory: str | os.PathLike,
  lora: Any,
  config: LoraConfig,
  *,
  name_map: NameMap | None = None,
  base: Any = None,
  initial_lora: Any = None,
  base_model_name_or_path: str | None = None,
  task_type: str | None = "CAUSAL_LM",
  overwrite: bool = False,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes an adapter as a PEFT LoRA adapter directory.

  ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
  ``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` for each adapted module
  (``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B`` ``(d, r)`` for
  embeddings; with DoRA also ``...lora_magnitude_vector`` ``(out,)``), one module
  per entry of a stacked kernel (a layer of a scanned
  kernel; k and v of gemma's fused ``kv_einsum``), the trained copies of
  `modules_to_save` (``kernel`` transposed to ``weight``), and the biases
  `bias` trains as PEFT names them (``<module>.base_layer.bias`` for an
  adapted module, ``<module>.bias`` otherwise). Fan-in and fan-out
  axes are flattened row-major in the kernel's axis order. A kernel the model
  (``apply_fn``) uses in a convolution, stored as Flax's ``nn.Conv`` stores it
  ``(*k, in, out)``, is written in PEFT's ``Conv1d``/``Conv2d``/``Conv3d`` format
  (by its number of spatial axes): ``lora_A.weight`` ``(r, in, *k)``,
  ``lora_B.weight`` ``(out, r, 1, ...)``, DoRA's magnitude ``(1, out, 1, ...)``
  (see `jlora._src.io.peft.conv`). Without the model, a kernel with two or more
  fan-in axes and one fan-out axis is refused (unless it is a gemma, tunix or
  keras-hub weight, a Linear in PyTorch): it may be a convolution's or a
  multi-axis Linear's (DenseGeneral), which PEFT stores differently. An expert kernel,
  which the name map names a `jlora.PeftParameter`, is written in PEFT's
  ``target_parameters`` format (one adapter per layer, listed in
  ``target_parameters``; see `jlora.PeftParameter`).
  ``adapter_config.json`` keeps ``target_modules`` as the user wrote them
  (``["q_proj", "v_proj"]``) when, with ``base`` given, they select exactly
  the exported modules in PEFT's matching (else the PyTorch short names, else
  the full module names), with ``rank_pattern``/``alpha_pattern`` where they
  differ from ``r``/``lora_alpha``, and ``fan_in_fan_out=True`` for GPT-2's
  ``Conv1D`` modules.

  Args:
    directory: output directory (created if needed).
    lora: the adapter tree.
    config: its config.
    name_map: ``name_map(path, index) -> module name`` (without
      ``base_model.model.``); default: the map of the model family the paths
      belong to (Hugging Face Flax, gemma, tunix; see `peft_module_name`).
    base: the base tree; used to check the adapter fits, to read each
      kernel's layout, and to keep ``target_modules`` short.
    initial_lora: for a PiSSA/OLoRA adapter (`jlora.init_with_residual`), the
      adapter tree at init: the file is then the plain rank-``2r`` LoRA
      adapter of the update on the ORIGINAL base (`jlora.to_plain_lora`),
      as PEFT's ``save_pretrained(...,
      path_initial_model_for_weight_conversion=...)`` writes it. Without it
      a PiSSA/OLoRA adapter is written as PEFT saves one unconverted
      (``init_lora_weights="pissa"``): PEFT recomputes the residual from the
      original base when it loads it (``"pissa_niter_<n>"`` then draws other
      random projections: convert instead).
    base_model_name_or_path: recorded for PEFT (the Hub id of the base).
    task_type: PEFT's ``task_type``.
    overwrite: replace existing adapter files in ``directory``.
    apply_fn: the model's apply function, ``apply_fn(base, *example_args,
      **example_kwargs)`` (needs ``base``), to read how the model uses each
      kernel: convolution kernels are written as PEFT ConvNd adapters, other
      kernels with several fan-in axes as Linears (as for `import_peft`).
    example_args: example inputs for ``apply_fn`` (arrays or
      ``jax.ShapeDtypeStruct``; nothing is computed).
    example_kwargs: example keyword inputs for ``apply_fn``.

  Returns:
    The ``adapter_config.json`` contents written.

  Raises:
    FileExistsError: if adapter files exist and ``overwrite`` is false.
    ValueError: for adapters PEFT cannot express (more than one stacked axis
      unless the kernel is a scanned stack of experts; an expert kernel with
      more than one fan-in or fan-out axis, or with ``lora_dropout``; two
      kernels on one PyTorch parameter; a convolution kernel not stored
      ``(*k, in, out)``), a kernel that may be a convolution's or a
      multi-axis Linear's when the model is not given (``apply_fn``), ``apply_fn``
      without ``base``, weights no name map knows, two adapters mapped to the
      same PEFT name, or an adapter that does not fit ``base``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> peft_cfg = jlora.export_peft(tempfile.mkdtemp(), lora, cfg, base=params)
    >>> peft_cfg["target_modules"]
    ['q_proj']
  """
  with processes.together("jlora.export_peft"):
    dest = storage.resolve(directory)
    tensors, peft_config = _peft_files(
      lora,
      config,
      name_map=name_map or default_name_map,
      base=base,
      initial_lora=initial_lora,
      model=(apply_fn, example_args, example_kwargs),
      recorded=(base_model_name_or_path, task_type),
    )
  _write(dest, tensors, peft_config, overwrite)
  return peft_config


def _peft_files(
  lora: Any,
  config: LoraConfig,
  *,
  name_map: NameMap,
  base: Any,
  initial_lora: Any,
  model: tuple[Callable[..., Any] | None, Sequence[Any], Mapping[str, Any] | None],
  recorded: tuple[str | None, str | None],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The tensors and the ``adapter_config.json`` of `export_peft` (arrays that span processes gathered)."""
  apply_fn, example_args, example_kwargs = model
  base_model_name_or_path, task_type = recorded
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  if apply_fn is not None and base is None:
    raise ValueError(
      "`apply_fn` is given without `base`: jlora reads how the model uses each kernel by tracing "
      "`apply_fn(base, *example_args)`; pass the base tree as `base=`."
    )
  if initial_lora is not None:
    lora, config = to_plain_lora(lora, initial_lora, config, base=base)
  used = None
  if apply_fn is not None:  # the adapted kernels only: a kernel jlora cannot adapt may be in the model
    adapted = [p for p, node in paths.adapter_items(lora) if paths.is_adapter(node)]
    used = common.model_layouts(apply_fn, base, example_args, example_kwargs, only=adapted)
  bound, saved = bound_adapters(lora, config, base, used)
  kernels = [c.path for c in targets.candidates(base)] if base is not None else [i.spec.path for i in bound]
  name_map = hf_tree_map(name_map, kernels)
  tensors = _Tensors()
  ranks, alphas, params = _adapter_tensors(bound, config, name_map, tensors, used)
  saved_modules = _saved_tensors(
    saved,
    config,
    paths.is_collections(lora),
    name_map=name_map,
    ranks=ranks,
    out=tensors,
  )
  known_modules, known_params = _known_names(base, bound, name_map) if base is not None else (None, None)
  modules = sorted(set(ranks) - set(params))
  peft_config = peft_config_of(
    config,
    ranks=ranks,
    alphas=alphas,
    saved_modules=saved_modules,
    targets=_exported_targets(config, modules, known_modules),
    parameters=exported_parameters(params, known_params),
    base_model_name_or_path=base_model_name_or_path,
    task_type=task_type,
  )
  return tensors.arrays, peft_config


def _trained_bias(path: paths.Path, config: LoraConfig, collections: bool) -> bool:
  """Whether a saved copy is a bias trained by ``config.bias`` (not a `modules_to_save` leaf)."""
  if config.bias == "none" or str(path[-1]) != "bias":
    return False
  return config.modules_to_save is None or not targets.name_matches(
    config.modules_to_save, paths.module_path(path, collections)
  )


def _write(directory: Any, tensors: dict[str, np.ndarray], peft_config: dict, overwrite: bool) -> None:
  """The two files, each written whole or not at all, with jlora's checksum in the safetensors metadata
  (by the primary process of a job; the others wait)."""
  import safetensors.numpy  # noqa: PLC0415

  outs = [directory / n for n in (WEIGHTS_NAME, CONFIG_NAME)]

  def write() -> None:
    storage.mkdir(directory)
    if not overwrite and any(storage.exists(p) for p in outs):
      raise FileExistsError(
        f"{storage.show(directory)!r} already holds a PEFT adapter; pass `overwrite=True` or choose another "
        "directory."
      )
    metadata = {"format": "pt", common.CHECKSUM_KEY: common.checksum(peft_config, tensors)}
    weights = lambda p: safetensors.numpy.save_file(tensors, p, metadata=metadata)  # noqa: E731
    storage.write_file(outs[0], weights, overwrite=True)
    storage.write_file(outs[1], json.dumps(peft_config, indent=2, sort_keys=True).encode(), overwrite=True)

  processes.on_primary("jlora.export_peft", write)
