"""PEFT interop: `export_peft` and `import_peft` (``adapter_config.json`` + ``adapter_model.safetensors``).

Shapes: a jlora adapter keeps its kernel's axis order (`jlora.Layout`); in
canonical order it is A ``(*stacked, *fan_in, r)`` and B
``(*stacked, r, *fan_out)``. PEFT's ``lora_A.weight`` is ``(r, in)`` and
``lora_B.weight`` ``(out, r)``, ``in``/``out`` being the fan-in and fan-out
axes flattened row-major in the kernel's axis order (gemma's ``q_einsum``
``(N, D, H)`` is the PyTorch ``q_proj`` Linear of ``N*H`` outputs). A kernel
with a stacked axis becomes one PEFT module per entry: per layer of a scanned
kernel, per part of a fused one (gemma's ``kv_einsum`` -> ``k_proj``,
``v_proj``). An embedding uses PEFT's ``lora_embedding_A`` ``(r, vocab)`` and
``lora_embedding_B`` ``(d, r)``. Module names come from a name map
(`jlora._src.peft_names`).

Only the ``safetensors`` format is read or written; pickled ``.bin`` files are
never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._src import adapters, layouts, paths, targets
from jlora._src.config import LoraConfig, freeze_layout_pattern, longest_match
from jlora._src.peft_names import PREFIX, NameMap, default_name_map, is_conv1d, lora_keys

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# PEFT LoraConfig fields that jlora reads.
_USED = frozenset(
  {
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
  }
)
# Fields whose value does not change what the saved weights compute (or that
# jlora re-derives from the tensor names and the Flax model: `fan_in_fan_out`
# only says how PyTorch stores GPT-2's Conv1D weights).
_IGNORED = frozenset(
  {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "exclude_modules",
    "modules_to_save",
    "fan_in_fan_out",
    "megatron_core",
    "runtime_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "qalora_group_size",
    "ensure_weight_tying",
  }
)
# Fields that must keep PEFT's plain-LoRA value: anything else computes
# something jlora's LoRA does not (DoRA, biases ...).
_REQUIRED = {
  "peft_type": ("LORA",),
  "bias": ("none",),
  "use_dora": (False,),
  "lora_bias": (False,),
  "layer_replication": (None,),
  "target_parameters": (None, []),
  "trainable_token_indices": (None,),
  "use_qalora": (False,),
  "megatron_config": (None,),
  "alora_invocation_tokens": (None,),
  "monteclora_config": (None,),
  "use_bdlora": (None, False),
  "arrow_config": (None,),
  "kasa_config": (None,),
}
_KNOWN = _USED | _IGNORED | frozenset(_REQUIRED)
# Flax leaf name -> (PyTorch parameter name, whether the array is transposed).
_SAVED_LEAVES = {
  "kernel": ("weight", True),
  "embedding": ("weight", False),
  "bias": ("bias", False),
  "scale": ("weight", False),
}
# PEFT's default layer containers (`peft.utils.constants.LAYERS_PATTERN`-like), for `layers_to_transform`.
_PEFT_LAYER_NAMES = ("layers", "h", "blocks", "layer")


def _is_embedding(path: paths.Path) -> bool:
  return str(path[-1]) in targets.EMBEDDING_LEAVES


# -- what PEFT selects -------------------------------------------------------------------------


def _peft_selects(target_modules: Any, layers: Sequence[int] | None, name: str) -> bool:
  """PEFT's `check_target_module_exists` for one module name (suffix or full-match regex, then
  the layer filter)."""
  if isinstance(target_modules, str):
    hit = re.fullmatch(target_modules, name) is not None
  else:
    hit = any(name == t or name.endswith("." + t) for t in target_modules or ())
  if not hit or layers is None:
    return hit
  m = re.search(rf"\.(?:{'|'.join(_PEFT_LAYER_NAMES)})\.(\d+)\.", name)
  return m is not None and int(m.group(1)) in layers


def _module_names(spec_path: paths.Path, layout: layouts.Layout | None, shape: tuple, name_map: NameMap):
  """The PEFT module names of one weight: one per entry of its stacked axis, or one."""
  if layout is None or not layout.stacked_axes:
    return [(None, name_map(spec_path, None))]
  return [(i, name_map(spec_path, i)) for i in range(shape[layout.stacked_axes[0]])]


# -- export ------------------------------------------------------------------------------------


def _without_base(lora: Any, config: LoraConfig) -> list[adapters.Bound]:
  """Adapter specs read from the factor shapes alone (no base tree)."""
  collections = paths.is_collections(lora)
  bound = []
  for path, node in paths.adapter_items(lora):
    if not paths.is_adapter(node):
      continue
    module = paths.module_path(path, collections)
    cand = targets.Candidate(path, module, (), None)
    a, b = node[paths.LORA_A], node[paths.LORA_B]
    found = [
      (lay, shape)
      for lay, shape in layouts.kernels_for(a.shape, b.shape, config.rank_for(cand.names))
      if adapters.layout_override(dataclasses.replace(cand, shape=shape), config.layout_for(cand.names))
      in (None, lay)
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
    spec = adapters.AdapterSpec(
      path, module, shape, layout, config.rank_for(cand.names), config.scale_for(cand.names), layers
    )
    bound.append(adapters.Bound(spec, None, a, b))
  return bound


@dataclasses.dataclass(frozen=True)
class _Factors:
  """One PEFT module's factors: ``a`` ``(r, in)`` and ``b`` ``(out, r)``."""

  index: int | None  # entry of the stacked axis
  a: np.ndarray
  b: np.ndarray


def _peft_factors(item: adapters.Bound) -> Iterator[_Factors]:
  spec = item.spec
  if len(spec.layout.stacked_axes) > 1:
    raise ValueError(
      f"Adapter at {spec.where!r} has {len(spec.layout.stacked_axes)} stacked axes (layout "
      f"{spec.layout}); a PEFT module can carry one at most (exported as one module per entry)."
    )
  a, b = (np.asarray(x) for x in adapters.canonical(spec, item.a, item.b))
  n_in, n_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
  if not spec.layout.stacked_axes:
    yield _Factors(None, a.reshape(n_in, spec.rank).T, b.reshape(spec.rank, n_out).T)
    return
  ids = spec.layers if spec.layers is not None else range(a.shape[0])
  for i, a_l, b_l in zip(ids, a, b):
    yield _Factors(i, a_l.reshape(n_in, spec.rank).T, b_l.reshape(spec.rank, n_out).T)


def _exported_targets(
  config: LoraConfig, exported: Sequence[str], known: set[str] | None
) -> tuple[Any, list[int] | None, str | None]:
  """``(target_modules, layers_to_transform, layers_pattern)`` for PEFT: the user's own list, or
  the short names, where they select exactly the exported modules among the ``known`` ones;
  otherwise the full names."""
  want = set(exported)
  short = sorted({n.rsplit(".", 1)[-1] for n in exported})
  options: list[tuple[Any, list[int] | None]] = []
  if not isinstance(config.target_modules, str):
    options.append((list(config.target_modules), None))
  options.append((short, None))
  if config.layers_to_transform is not None:
    options += [(t, list(config.layers_to_transform)) for t, _ in list(options)]
  for target, layers in options if known is not None else ():
    if {n for n in known | want if _peft_selects(target, layers, n)} == want:
      return target, layers, (None if layers is None else "layers")
  return sorted(want), None, None


def _known_names(base: Any, bound: list[adapters.Bound], name_map: NameMap) -> set[str]:
  """The PEFT names of every adaptable weight of ``base`` that the name map knows."""
  by_path = {item.spec.path: item.spec.layout for item in bound}
  names: set[str] = set()
  for cand in targets.candidates(base):
    layout = by_path.get(cand.path)
    n = len(cand.shape)
    options: list[layouts.Layout | None] = [layout] if layout is not None else [None]
    if layout is None and n >= 3:  # a fused or scanned weight: its entries' names too
      options.append(layouts.Layout("s" + "i" * (n - 2) + "o"))
    for lay in options:
      try:
        names.update(n for _, n in _module_names(cand.path, lay, cand.shape, name_map))
      except (ValueError, IndexError):
        continue
  return names


def export_peft(
  directory: str | os.PathLike,
  lora: Any,
  config: LoraConfig,
  *,
  name_map: NameMap | None = None,
  base: Any = None,
  base_model_name_or_path: str | None = None,
  task_type: str | None = "CAUSAL_LM",
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes an adapter as a PEFT LoRA adapter directory.

  ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
  ``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` for each adapted module
  (``lora_embedding_A`` ``(r, vocab)`` / ``lora_embedding_B`` ``(d, r)`` for
  embeddings), one module per entry of a stacked kernel (a layer of a scanned
  kernel; k and v of gemma's fused ``kv_einsum``), and the trained copies of
  `modules_to_save` (``kernel`` transposed to ``weight``). Fan-in and fan-out
  axes are flattened row-major in the kernel's axis order.
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
    base_model_name_or_path: recorded for PEFT (the Hub id of the base).
    task_type: PEFT's ``task_type``.
    overwrite: replace existing adapter files in ``directory``.

  Returns:
    The ``adapter_config.json`` contents written.

  Raises:
    FileExistsError: if adapter files exist and ``overwrite`` is false.
    ValueError: for adapters PEFT cannot express (more than one stacked axis),
      weights no name map knows, two adapters mapped to the same PEFT name,
      or an adapter that does not fit ``base``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> peft_cfg = jlora.export_peft(tempfile.mkdtemp(), lora, cfg, base=params)
    >>> peft_cfg["target_modules"]
    ['q_proj']
  """
  import safetensors.numpy  # noqa: PLC0415

  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  name_map = name_map or default_name_map
  if base is not None:
    bound, saved = adapters.bind(base, lora, config)
  else:
    bound = _without_base(lora, config)
    saved = {p: x for p, x in paths.adapter_items(lora) if not paths.is_adapter(x)}
  tensors: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}

  def put(key: str, value: np.ndarray, where: str) -> None:
    if key in tensors:
      raise ValueError(
        f"Adapters at {origin[key]!r} and {where!r} both map to PEFT key {key!r}; pass a `name_map`."
      )
    tensors[key], origin[key] = np.ascontiguousarray(value), where

  for item in bound:
    spec = item.spec
    embedding = _is_embedding(spec.path)
    if embedding and (len(spec.in_shape) != 1 or len(spec.out_shape) != 1):
      raise ValueError(
        f"Embedding adapter at {spec.where!r} must be 2-D (vocab, d); got {spec.kernel_shape}."
      )
    for f in _peft_factors(item):
      name = name_map(spec.path, f.index)
      key_a, key_b = lora_keys(name, embedding)
      put(key_a, f.a, spec.where)
      put(key_b, f.b, spec.where)
      ranks[name] = spec.rank
      alphas[name] = config.alpha_for((spec.module, spec.param))
  saved_modules = []
  for path, leaf in saved.items():
    where = paths.to_str(path)
    leaf_name = str(path[-1])
    arr = np.asarray(leaf)
    if leaf_name not in _SAVED_LEAVES or (leaf_name == "kernel" and arr.ndim != 2):
      raise ValueError(
        f"`modules_to_save` leaf {where!r} (shape {arr.shape}) has no PyTorch equivalent jlora knows; "
        f"only {sorted(_SAVED_LEAVES)} leaves (2-D kernels) are exported."
      )
    torch_name, transpose = _SAVED_LEAVES[leaf_name]
    module = name_map(path, None)
    put(f"{PREFIX}{module}.{torch_name}", arr.T if transpose else arr, where)
    saved_modules.append(module)

  known = _known_names(base, bound, name_map) if base is not None else None
  target, layers, layers_pattern = _exported_targets(config, sorted(ranks), known)
  peft_config = {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "revision": None,
    "inference_mode": True,
    "r": config.r,
    "lora_alpha": int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha,
    "lora_dropout": config.lora_dropout,
    "use_rslora": config.use_rslora,
    "init_lora_weights": config.init_lora_weights,
    "target_modules": target,
    "exclude_modules": None,
    "layers_to_transform": layers,
    "layers_pattern": layers_pattern,
    "rank_pattern": {re.escape(n): r for n, r in sorted(ranks.items()) if r != config.r},
    "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != config.lora_alpha},
    "modules_to_save": sorted(set(saved_modules)) or None,
    "bias": "none",
    "fan_in_fan_out": any(is_conv1d(n) for n in ranks),
    "use_dora": False,
    "lora_bias": False,
  }
  _write(os.fspath(directory), tensors, peft_config, overwrite, safetensors.numpy.save_file)
  return peft_config


def _write(directory: str, tensors: dict, peft_config: dict, overwrite: bool, save_file: Callable) -> None:
  os.makedirs(directory, exist_ok=True)
  outs = [os.path.join(directory, n) for n in (WEIGHTS_NAME, CONFIG_NAME)]
  if not overwrite and any(os.path.exists(p) for p in outs):
    raise FileExistsError(
      f"{directory!r} already holds a PEFT adapter; pass `overwrite=True` or choose another directory."
    )
  tmp = [p + f".tmp-{os.getpid()}" for p in outs]
  save_file(tensors, tmp[0], metadata={"format": "pt"})
  with open(tmp[1], "w") as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  for t, p in zip(tmp, outs):
    os.replace(t, p)


# -- import ------------------------------------------------------------------------------------


def _read_peft_config(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {CONFIG_NAME} at {path!r}; is this a PEFT adapter directory?")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path!r} is not valid JSON ({e}); the adapter config is corrupted.") from e
  if not isinstance(data, Mapping):
    raise ValueError(f"{path!r} must hold a JSON object; got {type(data).__name__}.")
  unknown = sorted(set(data) - _KNOWN)
  if unknown:
    raise ValueError(
      f"{path!r} has field(s) {unknown} that jlora does not know, so it cannot tell whether the "
      f"adapter computes plain LoRA; known fields: {sorted(_KNOWN)}. Remove them if they are at "
      "PEFT's defaults."
    )
  for field, allowed in _REQUIRED.items():
    if field in data and data[field] not in allowed:
      raise ValueError(
        f"{path!r}: `{field}` is {data[field]!r}; jlora imports plain LoRA adapters only "
        f"(`{field}` must be {' or '.join(map(repr, allowed))})."
      )
  if data.get("peft_type") != "LORA":
    raise ValueError(f"{path!r}: `peft_type` must be 'LORA'; got {data.get('peft_type')!r}.")
  init = data.get("init_lora_weights", True)
  if not (init is True or init is False or init == "gaussian"):
    raise ValueError(
      f"{path!r}: `init_lora_weights` is {init!r}; initialisations such as PiSSA, OLoRA, LoftQ or "
      "CorDA change the base weights, so the adapter alone does not reproduce the model. Convert it "
      "to a plain LoRA adapter in PEFT first "
      "(`save_pretrained(..., path_initial_model_for_weight_conversion=...)`)."
    )
  for field in ("rank_pattern", "alpha_pattern"):
    if not isinstance(data.get(field) or {}, Mapping):
      raise ValueError(f"{path!r}: `{field}` must be a JSON object; got {data[field]!r}.")
  return dict(data)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's `get_pattern_key`: the first pattern matching the module name or a dotted suffix."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _open_weights(directory: str) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
  import safetensors  # noqa: PLC0415

  path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(path):
    pickled = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(pickled):
      raise ValueError(
        f"{directory!r} holds only a pickled adapter_model.bin; jlora never unpickles files. Re-save "
        "the adapter with PEFT's `save_pretrained(..., safe_serialization=True)`."
      )
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}.")
  try:
    handle = safetensors.safe_open(path, framework="numpy")
    info = {}
    for key in handle.keys():
      sl = handle.get_slice(key)
      info[key] = (tuple(sl.get_shape()), sl.get_dtype())
  except Exception as e:  # safetensors raises SafetensorError and others on bad headers
    raise ValueError(
      f"{path!r} is not a readable safetensors file ({e}); it is truncated or corrupted."
    ) from e
  return handle, info


@dataclasses.dataclass(frozen=True)
class _Match:
  """A weight of the tree and the PEFT modules of the file that adapt it."""

  cand: targets.Candidate
  layout: layouts.Layout
  names: tuple[tuple[int | None, str], ...]  # (entry of the stacked axis, module name), in the file
  embedding: bool
  rank: int
  alpha: float

  @property
  def layer_axis(self) -> bool:
    """Whether the stacked axis is cut to the entries in the file (`layers_to_transform`)."""
    return bool(self.layout.stacked_axes) and targets.layer_index(self.cand.module, None) is None


def _import_layouts(
  tree: Any,
  cands: list[targets.Candidate],
  layout_pattern: Any,
  read: Callable[[], dict[paths.Path, layouts.Layout]],
) -> dict[paths.Path, layouts.Layout]:
  """Each weight's layout: ``layout_pattern``, else the model's use (``read``), else ``"io"`` (2-D)."""
  try:
    overrides = freeze_layout_pattern(layout_pattern or ())
  except (TypeError, ValueError) as e:
    raise ValueError(f"`layout_pattern` is invalid: {e}") from e
  inferred = read()
  out = {}
  for cand in cands:
    hit = longest_match(overrides, cand.names)
    layout = adapters.layout_override(cand, hit[1]) if hit else inferred.get(cand.path)
    if layout is None and len(cand.shape) == 2:
      layout = layouts.Layout("io")
    if layout is not None:
      out[cand.path] = layout
  return out


def _find_modules(
  cands: list[targets.Candidate],
  lays: Mapping[paths.Path, layouts.Layout],
  name_map: NameMap,
  info: Mapping[str, Any],
  weights_path: str,
) -> tuple[list[tuple[targets.Candidate, layouts.Layout, list[tuple[int | None, str]]]], str | None]:
  """The weights the file adapts, with their module names; and the first weight no name map knows."""
  found, unmapped = [], None
  for cand in cands:
    layout = lays.get(cand.path)
    try:
      names = _module_names(cand.path, layout, cand.shape, name_map)
    except ValueError:
      unmapped = unmapped or paths.to_str(cand.path)
      continue
    embedding = _is_embedding(cand.path)
    hits = []
    for index, name in names:
      key_a, key_b = lora_keys(name, embedding)
      if (key_a in info) != (key_b in info):
        has, lacks = (key_a, key_b) if key_a in info else (key_b, key_a)
        raise ValueError(
          f"{weights_path!r} has {has!r} but not {lacks!r}: the adapter of module {name!r} is "
          "incomplete (the file is truncated or was edited)."
        )
      if key_a in info:
        hits.append((index, name))
    if hits and layout is None:
      raise ValueError(
        f"PEFT module {hits[0][1]!r} adapts kernel {paths.to_str(cand.path)!r} of shape {cand.shape}, "
        "whose fan-in/fan-out axes cannot be told from its shape: pass `apply_fn=model.apply, "
        "example_args=(inputs,)` or `layout_pattern=`."
      )
    if hits:
      found.append((cand, layout, hits))
  return found, unmapped


def _check_module(
  cand: targets.Candidate,
  *,
  layout: layouts.Layout,
  hits: list[tuple[int | None, str]],
  info: Mapping[str, Any],
  pcfg: Mapping[str, Any],
  weights_path: str,
) -> _Match:
  """Checks the shapes, dtypes and rank of one weight's PEFT tensors against the weight."""
  embedding = _is_embedding(cand.path)
  in_shape = tuple(cand.shape[i] for i in layout.in_axes)
  out_shape = tuple(cand.shape[i] for i in layout.out_axes)
  if embedding and (len(in_shape) != 1 or len(out_shape) != 1):
    raise ValueError(f"Embedding {paths.to_str(cand.path)!r} must be 2-D to take PEFT's embedding LoRA.")
  rank = None
  for _, name in hits:
    keys = lora_keys(name, embedding)
    (sa, da), (sb, db) = info[keys[0]], info[keys[1]]
    rank = rank if rank is not None else (sa[0] if len(sa) == 2 else None)
    want = ((rank, math.prod(in_shape)), (math.prod(out_shape), rank))
    for key, got, w in zip(keys, (sa, sb), want):
      if rank is None or tuple(got) != w:
        raise ValueError(
          f"{weights_path!r}: tensor {key!r} has shape {tuple(got)}, but kernel "
          f"{paths.to_str(cand.path)!r} of shape {cand.shape} (layout {layout}: fan-in {in_shape}, "
          f"fan-out {out_shape}) needs {w} (PEFT: lora_A (r, in), lora_B (out, r)). Wrong base model or "
          "`name_map`?"
        )
    if da != db:
      raise ValueError(f"{weights_path!r}: {keys[0]!r} is {da} but {keys[1]!r} is {db}; they must match.")
  torch_name = hits[0][1]
  cfg_rank = _pattern_value(pcfg.get("rank_pattern") or {}, torch_name, pcfg.get("r", 8))
  if rank != cfg_rank:
    raise ValueError(
      f"{weights_path!r}: the adapter of {torch_name!r} has rank {rank}, but adapter_config.json gives "
      f"rank {cfg_rank} for it (`r`/`rank_pattern`); the files do not belong together."
    )
  alpha = _pattern_value(pcfg.get("alpha_pattern") or {}, torch_name, pcfg.get("lora_alpha", 8))
  return _Match(cand, layout, tuple(hits), embedding, rank, alpha)


def _saved_leaves(
  tree: Any, name_map: NameMap, info: Mapping[str, Any], claimed: set[str], weights_path: str
) -> dict[paths.Path, str]:
  """`modules_to_save` leaves: any leaf whose PyTorch parameter is in the file."""
  saved = {}
  for path, leaf in targets.param_leaves(tree):
    leaf_name = str(path[-1])
    if leaf_name not in _SAVED_LEAVES:
      continue
    try:
      key = f"{PREFIX}{name_map(path, None)}.{_SAVED_LEAVES[leaf_name][0]}"
    except ValueError:
      continue
    if key not in info or key in claimed:
      continue
    shape = tuple(getattr(leaf, "shape", ()))
    want = shape[::-1] if _SAVED_LEAVES[leaf_name][1] else shape
    if info[key][0] != want:
      raise ValueError(
        f"{weights_path!r}: tensor {key!r} has shape {info[key][0]}, but leaf {paths.to_str(path)!r} "
        f"(shape {shape}) needs {want}."
      )
    saved[path] = key
  return saved


def _check_peft_targets(pcfg: Mapping[str, Any], matches: list[_Match], known: set[str], where: str) -> None:
  """Every module PEFT's ``target_modules`` selects must have tensors in the file."""
  target = pcfg.get("target_modules")
  if not target:
    return
  layers = pcfg.get("layers_to_transform")
  layers = [layers] if isinstance(layers, int) else layers
  present = {name for m in matches for _, name in m.names}
  missing = sorted(n for n in known - present if _peft_selects(target, layers, n))
  if missing:
    raise ValueError(
      f"{where!r}: `target_modules`={target!r} selects module {missing[0]!r}"
      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
      + f", but {WEIGHTS_NAME} has no tensors for it: the adapter is incomplete."
    )


def _import_config(
  pcfg: Mapping[str, Any],
  *,
  matches: list[_Match],
  cands: list[targets.Candidate],
  saved_modules: list[str],
  layout_pattern: Any,
  dtype: str | None,
  where: str,
) -> LoraConfig:
  """The jlora config that reproduces the file: adapted weights by exact path, ranks and alphas."""
  per_module: dict[str, int] = {}
  for c in cands:
    per_module[c.module] = per_module.get(c.module, 0) + 1
  r, alpha = pcfg.get("r", 8), pcfg.get("lora_alpha", 8)
  names = [m.cand.module if per_module[m.cand.module] == 1 else m.cand.param for m in matches]
  layer_sets = {tuple(i for i, _ in m.names) for m in matches if m.layer_axis}
  if len(layer_sets) > 1:
    raise ValueError(
      f"Stacked kernels are adapted on different layer sets {sorted(layer_sets)}; a jlora config "
      "has one `layers_to_transform`."
    )
  ltt = None
  if layer_sets:
    (layer_set,) = layer_sets
    sizes = {m.cand.shape[m.layout.stacked_axes[0]] for m in matches if m.layer_axis}
    if layer_set != tuple(range(min(sizes))) or len(sizes) > 1:
      ltt = layer_set
  try:
    return LoraConfig(
      r=r,
      lora_alpha=alpha,
      lora_dropout=pcfg.get("lora_dropout", 0.0),
      use_rslora=pcfg.get("use_rslora", False),
      init_lora_weights=pcfg.get("init_lora_weights", True),
      target_modules=tuple(f"^{re.escape(n)}$"[1:-1] for n in names),
      layers_to_transform=ltt,
      rank_pattern={re.escape(n): m.rank for n, m in zip(names, matches) if m.rank != r},
      alpha_pattern={re.escape(n): m.alpha for n, m in zip(names, matches) if m.alpha != alpha},
      modules_to_save=tuple(dict.fromkeys(saved_modules)) or None,
      layout_pattern=layout_pattern or (),
      dtype=dtype,
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where!r} has an invalid value: {e}") from e


def _read_factors(handle: Any, m: _Match, weights_path: str) -> tuple[np.ndarray, np.ndarray]:
  """The canonical factors of one weight, read from the file (zeros for missing fused parts)."""

  def get(key: str) -> np.ndarray:
    try:
      return handle.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for a truncated file
      raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e

  in_shape = tuple(m.cand.shape[i] for i in m.layout.in_axes)
  out_shape = tuple(m.cand.shape[i] for i in m.layout.out_axes)
  parts = {}
  for index, name in m.names:
    key_a, key_b = lora_keys(name, m.embedding)
    parts[index] = (get(key_a).T.reshape(in_shape + (m.rank,)), get(key_b).T.reshape((m.rank,) + out_shape))
  if not m.layout.stacked_axes:
    return parts[None]
  ids = [i for i, _ in m.names] if m.layer_axis else range(m.cand.shape[m.layout.stacked_axes[0]])
  zero = tuple(np.zeros_like(x) for x in next(iter(parts.values())))
  a = np.stack([parts.get(i, zero)[0] for i in ids])
  b = np.stack([parts.get(i, zero)[1] for i in ids])
  return a, b


def import_peft(
  directory: str | os.PathLike,
  tree: Any,
  *,
  name_map: NameMap | None = None,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
  layout_pattern: Mapping[str, Any] | None = None,
) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter directory into a jlora adapter tree for ``tree``.

  For every adaptable weight of ``tree`` the PEFT module names are computed
  with ``name_map`` (one per entry of a stacked axis) and looked up among the
  safetensors keys; every key must be claimed by a weight (or a
  `modules_to_save` leaf) and have the shape the weight implies
  (``lora_A.weight`` ``(r, in)``, ``lora_B.weight`` ``(out, r)``, ``in``/``out``
  the weight's fan-in/fan-out axes flattened row-major), and every module the
  file's ``target_modules`` selects must have tensors. All tensors are checked
  before any is read: the result is complete or an error is raised. Parts of a
  fused kernel that PEFT did not adapt (``v_proj`` without ``k_proj`` on
  gemma's ``kv_einsum``) get zero factors, which compute what PEFT computes.

  The returned config lists the adapted weights by exact path in
  ``target_modules`` and encodes per-module ranks and alphas as exact-path
  patterns, so ``jlora.wrap``/``merge`` reproduce PEFT's model.

  Args:
    directory: a PEFT adapter directory (``adapter_config.json`` +
      ``adapter_model.safetensors``).
    tree: the Flax base tree with the same weights as PEFT's base model.
    name_map: ``name_map(path, index) -> module name``; default: the map of
      the model family (see `export_peft`).
    apply_fn: the model's apply function, to read each weight's layout from
      use (needed for kernels of 3+ dimensions and transposed 2-D kernels).
    example_args: example inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.
    layout_pattern: ``{pattern: layout}`` instead of ``apply_fn`` (see
      `LoraConfig.layout_pattern`).

  Returns:
    ``(lora, config)``.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: for unknown or unsupported config fields, unreadable files,
      keys no weight maps to, modules missing from the file, wrong shapes or
      dtypes (each naming the key or module), or N-D kernels of unknown layout.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.export_peft(d, lora, cfg, base=params)
    >>> lora2, cfg2 = jlora.import_peft(d, params)
    >>> q = lambda tree: tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    >>> bool(jnp.allclose(q(jlora.merge(params, lora2, cfg2)), q(jlora.merge(params, lora, cfg))))
    True
  """
  from jlora._src.wrap import infer_layouts  # noqa: PLC0415

  directory = os.fspath(directory)
  name_map = name_map or default_name_map
  pcfg = _read_peft_config(os.path.join(directory, CONFIG_NAME))
  handle, info = _open_weights(directory)
  weights_path = os.path.join(directory, WEIGHTS_NAME)
  for key, (_, dtype) in info.items():
    if dtype not in _ST_DTYPES:
      raise ValueError(
        f"{weights_path!r}: tensor {key!r} has dtype {dtype}; LoRA weights must be one of "
        f"{sorted(_ST_DTYPES)}."
      )
  cands = targets.candidates(tree)
  read = lambda: infer_layouts(apply_fn, tree, *example_args, **(example_kwargs or {})) if apply_fn else {}  # noqa: E731
  lays = _import_layouts(tree, cands, layout_pattern, read)
  found, unmapped = _find_modules(cands, lays, name_map, info, weights_path)
  matches = [
    _check_module(c, layout=lay, hits=hits, info=info, pcfg=pcfg, weights_path=weights_path)
    for c, lay, hits in found
  ]
  claimed = {k for m in matches for _, n in m.names for k in lora_keys(n, m.embedding)}
  saved = _saved_leaves(tree, name_map, info, claimed, weights_path)
  unclaimed = sorted(set(info) - claimed - set(saved.values()))
  if unclaimed:
    hint = f"no name map jlora knows names weight {unmapped!r}; " if unmapped else ""
    raise ValueError(
      f"{weights_path!r}: no leaf of the given tree maps to tensor {unclaimed[0]!r}"
      + (f" (and {len(unclaimed) - 1} more)" if len(unclaimed) > 1 else "")
      + f". {hint}Pass a `name_map(path, index)` that gives PEFT's module names, or "
      "`apply_fn`/`layout_pattern` for kernels whose layout is not (in, out)."
    )
  if not matches:
    raise ValueError(f"{weights_path!r} holds no LoRA weights (no '.lora_A.weight' keys).")
  known = {n for c in cands for _, n in _safe_names(c, lays.get(c.path), name_map)}
  _check_peft_targets(pcfg, matches, known, os.path.join(directory, CONFIG_NAME))
  dtypes = {_ST_DTYPES[info[k][1]] for k in claimed}
  kernel_dtypes = {jnp.dtype(m.cand.dtype).name for m in matches}
  collections = paths.is_collections(tree)
  config = _import_config(
    pcfg,
    matches=matches,
    cands=cands,
    saved_modules=[paths.module_path(p, collections) for p in saved],
    layout_pattern=layout_pattern,
    dtype=next(iter(dtypes)) if len(dtypes) == 1 and dtypes != kernel_dtypes else None,
    where=os.path.join(directory, CONFIG_NAME),
  )
  lora: dict = {}
  for m in matches:
    a, b = _read_factors(handle, m, weights_path)
    spec = adapters.AdapterSpec(m.cand.path, m.cand.module, m.cand.shape, m.layout, m.rank, 1.0, None)
    a, b = adapters.from_canonical(spec, jnp.asarray(a), jnp.asarray(b))
    paths.nested_set(lora, m.cand.path, {paths.LORA_A: a, paths.LORA_B: b})
  leaves = dict(paths.leaves_with_paths(tree))
  for path in targets.saved_module_paths(tree, config):
    if path in saved:
      arr = _read_saved(handle, saved[path], weights_path)
      arr = arr.T if _SAVED_LEAVES[str(path[-1])][1] else arr
      paths.nested_set(lora, path, jnp.asarray(arr, dtype=leaves[path].dtype))
    else:  # a leaf PyTorch's module does not have: keep the base value, as PEFT's copy does
      paths.nested_set(lora, path, jnp.array(leaves[path], copy=True))
  adapters.bind(tree, lora, config, lambda: lays)
  return lora, config


def _safe_names(cand: targets.Candidate, layout: layouts.Layout | None, name_map: NameMap) -> list:
  try:
    return _module_names(cand.path, layout, cand.shape, name_map)
  except ValueError:
    return []


def _read_saved(handle: Any, key: str, weights_path: str) -> np.ndarray:
  try:
    return handle.get_tensor(key)
  except Exception as e:  # safetensors raises its own error types for a truncated file
    raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e
