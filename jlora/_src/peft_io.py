"""PEFT interop: `export_peft` and `import_peft` (``adapter_config.json`` + ``adapter_model.safetensors``).

Shape conventions: a Flax kernel is ``(*stacked, *fan_in, *fan_out)`` (a Dense
kernel ``(in, out)``); its jlora adapter is ``lora_A`` ``(*stacked, *fan_in, r)``
and ``lora_B`` ``(*stacked, r, *fan_out)``. PEFT's ``lora_A.weight`` is
``(r, in)`` and ``lora_B.weight`` is ``(out, r)``, so the export transposes,
after flattening the fan-in and the fan-out axes row-major (a DenseGeneral
kernel ``(d, H, Dh)`` is the PyTorch Linear of ``kernel.reshape(d, H * Dh)``).
A kernel stacked over layers (``nn.scan``, ``(L, in, out)``) becomes one PEFT
module per layer. An ``embedding`` ``(vocab, d)`` uses PEFT's
``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(d, r)``.

Only the ``safetensors`` format is read or written; pickled ``.bin`` files are
never loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._src import adapters, paths, targets
from jlora._src.config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NameMap = Callable[[paths.Path, "int | None"], str]

_LAYER_NAMES = frozenset(targets._DEFAULT_LAYER_NAMES)
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# PEFT LoraConfig fields that jlora reads.
_USED = frozenset(
  {"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern"}
)
# Fields whose value does not change what the saved weights compute (or that
# jlora re-derives from the tensor names).
_IGNORED = frozenset(
  {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
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
# something jlora's LoRA does not (DoRA, biases, transposed Conv1D weights ...).
_REQUIRED = {
  "peft_type": ("LORA",),
  "bias": ("none",),
  "fan_in_fan_out": (False,),
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


def peft_module_name(path: paths.Path, layer: int | None = None) -> str:
  """The default name map: a jlora leaf path -> the PyTorch module name PEFT uses.

  Built for Llama-style models whose Flax module tree mirrors the Hugging Face
  one: a leading ``params`` collection and the leaf name (``kernel``,
  ``embedding`` ...) are dropped, ``layers_3`` becomes ``layers.3`` (also for
  ``h``, ``blocks``, ``block``, ``layer``, ``decoder_layers``), int keys (NNX
  lists) become their digits, and the entries are joined with ``.``. For a
  kernel stacked over layers, ``layer`` is inserted after the layer
  container (``layers`` -> ``layers.<layer>``). PEFT's state-dict keys add the
  prefix ``base_model.model.``.

  Args:
    path: the leaf path of a kernel in the base tree (jlora key path).
    layer: the index along a stacked-layer axis, or ``None``.

  Returns:
    The module name, e.g. ``"model.layers.0.self_attn.q_proj"``.

  Raises:
    ValueError: if ``layer`` is given but the path has no layer container.

  Example:
    >>> import jlora
    >>> jlora.peft_module_name(("params", "model", "layers_0", "self_attn", "q_proj", "kernel"))
    'model.layers.0.self_attn.q_proj'
    >>> jlora.peft_module_name(("params", "model", "layers", "mlp", "up_proj", "kernel"), 3)
    'model.layers.3.mlp.up_proj'
  """
  entries = list(path[:-1])
  if entries and entries[0] == "params":
    entries = entries[1:]
  out: list[str] = []
  for e in entries:
    m = re.fullmatch(r"(.+)_(\d+)", e) if isinstance(e, str) else None
    if m and m.group(1) in _LAYER_NAMES:
      out.extend([m.group(1), m.group(2)])
    else:
      out.append(str(e))
  if layer is not None:
    for i in range(len(out) - 1, -1, -1):
      if out[i] in _LAYER_NAMES and not (i + 1 < len(out) and out[i + 1].isdigit()):
        out.insert(i + 1, str(layer))
        break
    else:
      raise ValueError(
        f"Kernel {paths.to_str(path)!r} is stacked over layers, but its path has no layer container "
        f"({sorted(_LAYER_NAMES)}) to put the layer index after; pass a `name_map(path, layer)`."
      )
  return ".".join(out)


# -- export ------------------------------------------------------------------------------------


def _infer_specs(lora: Any, config: LoraConfig) -> tuple[list[adapters.Bound], dict[paths.Path, Any]]:
  """Adapter specs read from the adapter shapes alone (no base tree)."""
  collections = paths.is_collections(lora)
  bound, saved = [], {}
  for path, node in paths.adapter_items(lora):
    if not paths.is_adapter(node):
      saved[path] = node
      continue
    where = paths.to_str(path)
    module = paths.module_path(path, collections)
    a, b = node[paths.LORA_A], node[paths.LORA_B]
    rank = config.rank_for(module)
    options = [
      s
      for s in range(min(a.ndim, b.ndim) - 1)
      if a.shape[-1] == rank == b.shape[s] and a.shape[:s] == b.shape[:s] and a.ndim - 1 - s >= 1
    ]
    override = config.layout_for(module)
    if override is not None:
      options = [s for s in options if s == override[0]]
    if len(options) != 1:
      raise ValueError(
        f"Cannot tell the stacked-layer axes of the adapter at {where!r} (lora_A {tuple(a.shape)}, "
        f"lora_B {tuple(b.shape)}, rank {rank}) from its shapes; pass `base=` (the base tree)."
      )
    s = options[0]
    fan_in = a.ndim - 1 - s
    kshape = tuple(a.shape[:-1]) + tuple(b.shape[s + 1 :])
    layers = None
    if s and config.layers_to_transform is not None:
      layers = tuple(config.layers_to_transform[: a.shape[0]])
    spec = adapters.AdapterSpec(path, module, kshape, s, fan_in, rank, config.scale_for(module), layers)
    bound.append(adapters.Bound(spec, None, a, b))
  return bound, saved


def _layer_ids(spec: adapters.AdapterSpec, n: int) -> list[int]:
  return list(spec.layers) if spec.layers is not None else list(range(n))


def _np(x: Any) -> np.ndarray:
  return np.asarray(x)


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
  embeddings), one module per layer of a stacked kernel, and the trained
  copies of `modules_to_save` (``kernel`` transposed to ``weight``).
  ``adapter_config.json`` lists the exported modules by their full names in
  ``target_modules`` (and ``rank_pattern``/``alpha_pattern`` where they
  differ from ``r``/``lora_alpha``), so PEFT adapts exactly those modules.
  Flax kernels ``(fan_in..., fan_out...)`` are flattened row-major to
  ``(in, out)`` and transposed.

  Args:
    directory: output directory (created if needed).
    lora: the adapter tree.
    config: its config.
    name_map: ``name_map(path, layer) -> module name`` (without
      ``base_model.model.``); default `peft_module_name` (Llama-style).
    base: the base tree; optional, used to check the adapter fits and to
      read each kernel's layout (needed only when shapes are ambiguous).
    base_model_name_or_path: recorded for PEFT (the Hub id of the base).
    task_type: PEFT's ``task_type``.
    overwrite: replace existing adapter files in ``directory``.

  Returns:
    The ``adapter_config.json`` contents written.

  Raises:
    FileExistsError: if adapter files exist and ``overwrite`` is false.
    ValueError: for adapters PEFT cannot express (more than one stacked axis),
      two adapters mapped to the same PEFT name, or an adapter that does not
      fit ``base``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> lora = jlora.init(params, cfg, key=jax.random.key(0))
    >>> peft_cfg = jlora.export_peft(tempfile.mkdtemp(), lora, cfg)
    >>> peft_cfg["target_modules"]
    ['model.layers.0.self_attn.q_proj']
  """
  import safetensors.numpy  # noqa: PLC0415

  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig; got {type(config).__name__}.")
  name_map = name_map or peft_module_name
  bound, saved = adapters.bind(base, lora, config) if base is not None else _infer_specs(lora, config)
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
    if spec.stacked > 1:
      raise ValueError(
        f"Adapter at {spec.where!r} has {spec.stacked} stacked axes; PEFT modules can carry one "
        "layer axis at most (exported as one module per layer)."
      )
    a, b = _np(item.a), _np(item.b)
    stack = [(None, a, b)] if spec.stacked == 0 else list(zip(_layer_ids(spec, a.shape[0]), a, b))
    embedding = spec.path[-1] == "embedding"
    if embedding and (spec.fan_in != 1 or len(spec.out_shape) != 1):
      raise ValueError(
        f"Embedding adapter at {spec.where!r} must be 2-D (vocab, d); got {spec.kernel_shape}."
      )
    for layer, a_l, b_l in stack:
      name = name_map(spec.path, layer)
      key = PREFIX + name
      a2 = a_l.reshape(math.prod(a_l.shape[:-1]), spec.rank)
      b2 = b_l.reshape(spec.rank, math.prod(b_l.shape[1:]))
      if embedding:
        put(f"{key}.lora_embedding_A", a2.T, spec.where)
        put(f"{key}.lora_embedding_B", b2.T, spec.where)
      else:
        put(f"{key}.lora_A.weight", a2.T, spec.where)
        put(f"{key}.lora_B.weight", b2.T, spec.where)
      ranks[name] = spec.rank
      alphas[name] = config.alpha_for(spec.module)
  saved_modules = []
  for path, leaf in saved.items():
    where = paths.to_str(path)
    leaf_name = str(path[-1])
    arr = _np(leaf)
    if leaf_name not in _SAVED_LEAVES or (leaf_name == "kernel" and arr.ndim != 2):
      raise ValueError(
        f"`modules_to_save` leaf {where!r} (shape {arr.shape}) has no PyTorch equivalent jlora knows; "
        f"only {sorted(_SAVED_LEAVES)} leaves (2-D kernels) are exported."
      )
    torch_name, transpose = _SAVED_LEAVES[leaf_name]
    module = name_map(path, None)
    put(f"{PREFIX}{module}.{torch_name}", arr.T if transpose else arr, where)
    saved_modules.append(module)

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
    "target_modules": sorted(ranks),
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {re.escape(n): r for n, r in sorted(ranks.items()) if r != config.r},
    "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != config.lora_alpha},
    "modules_to_save": sorted(set(saved_modules)) or None,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "lora_bias": False,
  }
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  outs = [os.path.join(directory, n) for n in (WEIGHTS_NAME, CONFIG_NAME)]
  if not overwrite and any(os.path.exists(p) for p in outs):
    raise FileExistsError(
      f"{directory!r} already holds a PEFT adapter; pass `overwrite=True` or choose another directory."
    )
  tmp = [p + f".tmp-{os.getpid()}" for p in outs]
  safetensors.numpy.save_file(tensors, tmp[0], metadata={"format": "pt"})
  with open(tmp[1], "w") as f:
    json.dump(peft_config, f, indent=2, sort_keys=True)
  for t, p in zip(tmp, outs):
    os.replace(t, p)
  return peft_config


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


def import_peft(
  directory: str | os.PathLike,
  tree: Any,
  *,
  name_map: NameMap | None = None,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
  layout_pattern: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter directory into a jlora adapter tree for ``tree``.

  For every adaptable kernel of ``tree`` the PEFT module name is computed with
  ``name_map`` and looked up among the safetensors keys; every key must be
  claimed by a kernel (or a `modules_to_save` leaf) and have the shape the
  kernel implies: ``lora_A.weight`` ``(r, in)`` -> ``lora_A`` ``(*fan_in, r)``
  and ``lora_B.weight`` ``(out, r)`` -> ``lora_B`` ``(r, *fan_out)`` (Flax
  kernels are ``(fan_in..., fan_out...)``; ``in``/``out`` are their products);
  per-layer modules of a stacked kernel are stacked. All tensors are checked
  before any is used: the result is complete or an error is raised.

  The returned config lists the adapted module paths in ``target_modules``
  and encodes per-module ranks and alphas (read from the tensors and PEFT's
  ``rank_pattern``/``alpha_pattern``) as exact-path patterns, so
  ``jlora.wrap``/``merge`` reproduce PEFT's model.

  Args:
    directory: a PEFT adapter directory (``adapter_config.json`` +
      ``adapter_model.safetensors``).
    tree: the Flax base tree with the same weights as PEFT's base model.
    name_map: ``name_map(path, layer) -> module name`` (see
      `peft_module_name`, the default).
    apply_fn: the model's apply function, to read the layout of kernels with
      three or more dimensions (as in `jlora.init`).
    example_args: example inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.
    layout_pattern: ``{pattern: (stacked, fan_in)}`` instead of ``apply_fn``.

  Returns:
    ``(lora, config)``.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: for unknown or unsupported config fields, unreadable files,
      keys no kernel maps to, missing keys, wrong shapes or dtypes (each
      naming the key), or N-D kernels of unknown layout.
  """
  from jlora._src.wrap import infer_layouts  # noqa: PLC0415

  directory = os.fspath(directory)
  name_map = name_map or peft_module_name
  pcfg = _read_peft_config(os.path.join(directory, CONFIG_NAME))
  handle, info = _open_weights(directory)
  weights_path = os.path.join(directory, WEIGHTS_NAME)
  for key, (_, dtype) in info.items():
    if dtype not in _ST_DTYPES:
      raise ValueError(
        f"{weights_path!r}: tensor {key!r} has dtype {dtype}; LoRA weights must be one of "
        f"{sorted(_ST_DTYPES)}."
      )
  try:
    layout_cfg = LoraConfig(target_modules="(?!)", layout_pattern=layout_pattern or ())
  except (TypeError, ValueError) as e:
    raise ValueError(f"`layout_pattern` is invalid: {e}") from e

  cands = targets.candidates(tree)
  layouts: dict[paths.Path, adapters.Layout] = {}
  if apply_fn is not None:
    nd = [c.path for c in cands if len(c.shape) >= 3]
    if nd:
      layouts = infer_layouts(apply_fn, tree, *example_args, only=nd, **(example_kwargs or {}))

  claimed: set[str] = set()
  found: list[tuple[targets.Candidate, adapters.Layout, list[tuple[int | None, str]], bool]] = []
  for cand in cands:
    override = layout_cfg.layout_for(cand.module)
    layout = adapters.Layout(*override) if override else layouts.get(cand.path)
    if layout is None and len(cand.shape) == 2:
      layout = adapters.Layout(0, 1)
    embedding = cand.leaf_name == "embedding"
    suffix_a = ".lora_embedding_A" if embedding else ".lora_A.weight"
    if layout is None or layout.stacked == 0:
      name = name_map(cand.path, None)
      if PREFIX + name + suffix_a not in info:
        continue
      if layout is None:
        raise ValueError(
          f"PEFT key {PREFIX + name + suffix_a!r} adapts kernel {paths.to_str(cand.path)!r} of shape "
          f"{cand.shape}, whose fan-in/fan-out axes cannot be told from its shape: pass "
          "`apply_fn=model.apply, example_args=(inputs,)` or `layout_pattern=`."
        )
      found.append((cand, layout, [(None, name)], embedding))
    elif layout.stacked == 1:
      hits = [(i, name_map(cand.path, i)) for i in range(cand.shape[0])]
      hits = [(i, n) for i, n in hits if PREFIX + n + suffix_a in info]
      if hits:
        found.append((cand, layout, hits, embedding))

  lora: dict = {}
  modules: list[str] = []
  rank_pattern: dict[str, int] = {}
  alpha_pattern: dict[str, float] = {}
  r_default, alpha_default = pcfg.get("r", 8), pcfg.get("lora_alpha", 8)
  stacked_layers: set[tuple[int, ...]] = set()
  pending: list[tuple[paths.Path, str, list[str], tuple[int, ...], tuple[int, ...]]] = []
  dtypes: set[str] = set()
  kernel_dtypes: set[str] = set()
  for cand, layout, hits, embedding in found:
    in_shape = cand.shape[layout.stacked : layout.stacked + layout.fan_in]
    out_shape = cand.shape[layout.stacked + layout.fan_in :]
    if embedding and (layout.fan_in != 1 or len(out_shape) != 1):
      raise ValueError(f"Embedding {paths.to_str(cand.path)!r} must be 2-D to take PEFT's embedding LoRA.")
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    rank = None
    for _, name in hits:
      if embedding:
        keys = (f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B")
      else:
        keys = (f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight")
      if keys[1] not in info:
        raise ValueError(
          f"{weights_path!r} has {keys[0]!r} but not {keys[1]!r}; the adapter file is incomplete."
        )
      (sa, da), (sb, db) = info[keys[0]], info[keys[1]]
      r = sa[0] if len(sa) == 2 else None
      if rank is None:
        rank = r
      want_a, want_b = (rank, n_in), (n_out, rank)
      for key, got, want in ((keys[0], sa, want_a), (keys[1], sb, want_b)):
        if rank is None or tuple(got) != want:
          raise ValueError(
            f"{weights_path!r}: tensor {key!r} has shape {tuple(got)}, but kernel "
            f"{paths.to_str(cand.path)!r} of shape {cand.shape} (fan-in {in_shape}, fan-out {out_shape}) "
            f"needs {want} (PEFT: lora_A (r, in), lora_B (out, r)). Wrong base model or `name_map`?"
          )
      if da != db:
        raise ValueError(f"{weights_path!r}: {keys[0]!r} is {da} but {keys[1]!r} is {db}; they must match.")
      dtypes.add(_ST_DTYPES[da])
      claimed.update(keys)
    torch_name = hits[0][1]
    cfg_rank = _pattern_value(pcfg.get("rank_pattern") or {}, torch_name, r_default)
    if rank != cfg_rank:
      raise ValueError(
        f"{weights_path!r}: the adapter of {torch_name!r} has rank {rank}, but adapter_config.json gives "
        f"rank {cfg_rank} for it (`r`/`rank_pattern`); the files do not belong together."
      )
    alpha = _pattern_value(pcfg.get("alpha_pattern") or {}, torch_name, alpha_default)
    module = cand.module
    modules.append(module)
    if rank != r_default:
      rank_pattern[re.escape(module)] = rank
    if alpha != alpha_default:
      alpha_pattern[re.escape(module)] = alpha
    if layout.stacked:
      stacked_layers.add(tuple(i for i, _ in hits))
    kernel_dtypes.add(jnp.dtype(cand.dtype).name)
    pending.append(
      (cand.path, "embedding" if embedding else "linear", [n for _, n in hits], in_shape, out_shape)
    )

  # `modules_to_save` leaves: any leaf whose PyTorch parameter is in the file.
  saved: dict[paths.Path, str] = {}
  saved_modules: list[str] = []
  collections = paths.is_collections(tree)
  for path, leaf in paths.leaves_with_paths(tree):
    leaf_name = str(path[-1])
    if leaf_name not in _SAVED_LEAVES or len(path) < 2 or (collections and path[0] != "params"):
      continue
    key = f"{PREFIX}{name_map(path, None)}.{_SAVED_LEAVES[leaf_name][0]}"
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
    claimed.add(key)
    saved_modules.append(paths.module_path(path, collections))

  unclaimed = sorted(set(info) - claimed)
  if unclaimed:
    sample = [PREFIX + name_map(c.path, None) for c in cands[:4] if len(c.shape) == 2]
    raise ValueError(
      f"{weights_path!r}: no leaf of the given tree maps to tensor {unclaimed[0]!r}"
      + (f" (and {len(unclaimed) - 1} more)" if len(unclaimed) > 1 else "")
      + f". The tree's kernels map to names like {sample}; pass a `name_map(path, layer)` that gives "
      "PEFT's module names, or `apply_fn`/`layout_pattern` for kernels with 3+ dimensions."
    )
  if not modules:
    raise ValueError(f"{weights_path!r} holds no LoRA weights (no '.lora_A.weight' keys).")
  if len(stacked_layers) > 1:
    raise ValueError(
      f"Stacked kernels are adapted on different layer sets {sorted(stacked_layers)}; a jlora config "
      "has one `layers_to_transform`."
    )
  ltt = None
  if stacked_layers:
    (layer_set,) = stacked_layers
    n_layers = {c.shape[0] for c, lay, _, _ in found if lay.stacked}
    if layer_set != tuple(range(min(n_layers))) or len(n_layers) > 1:
      ltt = layer_set
  dtype = None
  if len(dtypes) == 1 and dtypes != kernel_dtypes:
    (dtype,) = dtypes
  try:
    config = LoraConfig(
      r=r_default,
      lora_alpha=alpha_default,
      lora_dropout=pcfg.get("lora_dropout", 0.0),
      use_rslora=pcfg.get("use_rslora", False),
      init_lora_weights=pcfg.get("init_lora_weights", True),
      target_modules=tuple(modules),
      layers_to_transform=ltt,
      rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern,
      modules_to_save=tuple(dict.fromkeys(saved_modules)) or None,
      layout_pattern=layout_pattern or (),
      dtype=dtype if dtype in ("float32", "bfloat16", "float16", "float64") else None,
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"{os.path.join(directory, CONFIG_NAME)!r} has an invalid value: {e}") from e

  # Read the tensors (all keys are known to be valid now) and build the tree.
  def get(key: str) -> np.ndarray:
    try:
      return handle.get_tensor(key)
    except Exception as e:
      raise ValueError(f"{weights_path!r}: cannot read tensor {key!r} ({e}); the file is truncated.") from e

  for path, kind, names, in_shape, out_shape in pending:
    a_list, b_list = [], []
    for name in names:
      if kind == "embedding":
        a_t, b_t = get(f"{PREFIX}{name}.lora_embedding_A"), get(f"{PREFIX}{name}.lora_embedding_B")
      else:
        a_t, b_t = get(f"{PREFIX}{name}.lora_A.weight"), get(f"{PREFIX}{name}.lora_B.weight")
      r = a_t.shape[0]
      a_list.append(a_t.T.reshape(in_shape + (r,)))
      b_list.append(b_t.T.reshape((r,) + out_shape))
    if names and len(names) == 1 and path not in {c.path for c, lay, _, _ in found if lay.stacked}:
      a, b = a_list[0], b_list[0]
    else:
      a, b = np.stack(a_list), np.stack(b_list)
    paths.nested_set(lora, path, {paths.LORA_A: jnp.asarray(a), paths.LORA_B: jnp.asarray(b)})
  leaves = dict(paths.leaves_with_paths(tree))
  for path in targets.saved_module_paths(tree, config):
    if path in saved:
      arr = get(saved[path])
      arr = arr.T if _SAVED_LEAVES[str(path[-1])][1] else arr
      paths.nested_set(lora, path, jnp.asarray(arr, dtype=leaves[path].dtype))
    else:  # a leaf PyTorch's module does not have: keep the base value, as PEFT's copy does
      paths.nested_set(lora, path, jnp.array(leaves[path], copy=True))

  planned = {s.path for s in adapters.plan(tree, config, {**layouts})}
  got = {p for p, _, _, _, _ in pending}
  if planned != got:
    diff = sorted(paths.to_str(p) for p in planned ^ got)
    raise ValueError(
      f"The adapted kernels of {directory!r} cannot be expressed as one jlora config "
      f"(differs at {diff[0]!r})."
    )
  adapters.bind(tree, lora, config)
  return lora, config
