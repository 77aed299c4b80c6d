"""PEFT names: the PyTorch module name of each adapted weight, and PEFT's tensor keys.

A *name map* is ``name_map(path, index) -> module name`` (without PEFT's
``base_model.model.`` prefix): ``path`` is the weight's jlora leaf path and
``index`` the entry along its stacked axis (a layer of a scanned kernel, or
the part of a fused kernel: gemma's ``kv_einsum`` entry 0 is ``k_proj``, 1 is
``v_proj``), or ``None`` for a kernel without one.

`default_name_map` knows, by their parameter names, the model families jlora
is tested on: Hugging Face Flax models (the Flax tree mirrors PyTorch's
module tree: `peft_module_name`; paths with a layer container such as
``layers_3`` or a numbered module list such as ``h/0``, or a top-level
``lm_head``/``embed_tokens``; on a tree with such paths, every ``kernel``,
``embedding``, ``bias`` and ``scale``: `hf_tree_map`), gemma's
``gm.nn.Transformer``, tunix's NNX Llama/Qwen/Gemma and keras-hub's Gemma
(mapped to the Hugging Face ``transformers`` module names of the same
architecture). A weight none of them knows is an error that names
it and the ``name_map=`` fix.

An expert kernel (`PeftParameter`) is a PyTorch *parameter*, not a module:
PEFT adapts it through ``target_parameters`` with a ``ParamWrapper`` around
its module, and the wrappers of two parameters of one module nest (the
parameter registered first innermost), so its keys carry one
``.base_layer`` per adapted parameter registered after it (`Keys`). No
default map names expert kernels: the Flax MoE code jlora knows has no
PyTorch twin it mirrors, so a name map returns them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from jlora._src.core import paths, targets

PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class PeftParameter:
  """A name map's answer for an expert kernel: the PyTorch parameter PEFT's ``target_parameters`` adapts.

  A kernel with an expert axis (``(E, D, F)``, ``"sio"``; ``(L, E, D, F)``,
  ``"ssio"``, in a scanned stack: the last stacked axis holds the experts) is
  one 3-D ``nn.Parameter`` ``(E, P, Q)`` in PyTorch (the expert axis first,
  the other two in the kernel's order), such as GptOss's and Llama4's
  ``mlp.experts.gate_up_proj`` ``(E, hidden, 2 * expert_dim)``. jlora asks
  ``name_map(path, None)`` for a kernel with one stacked axis and
  ``name_map(path, layer)`` for each layer of one with two; a
  ``PeftParameter`` answer exports the kernel in PEFT's ``ParamWrapper``
  format, ``lora_A.weight`` ``(E * r, in)`` (expert-major rows) and
  ``lora_B.weight`` ``(out, r * E)`` (rank-major columns), PEFT's ``in``
  being ``Q`` (or ``P`` when ``transposed``).

  Attributes:
    name: the parameter's full name without ``base_model.model.``
      (``"model.layers.0.mlp.experts.gate_up_proj"``).
    order: its place among its module's parameters in PyTorch's registration
      order (``[n for n, _ in module.named_parameters(recurse=False)]``;
      GptOss and Llama4: ``gate_up_proj`` before ``down_proj``). Needed when a
      module has two or more adapted parameters: it decides PEFT's nesting.
    transposed: the PyTorch module sets ``is_transposed = True`` (PEFT then
      reads the parameter as ``(E, in, out)``; transformers 4.57's MoE
      modules do not set it, so PEFT reads ``(E, out, in)``).

  Example:
    >>> import jlora
    >>> p = jlora.PeftParameter("model.layers.0.mlp.experts.down_proj", order=1)
    >>> p.module, p.param
    ('model.layers.0.mlp.experts', 'down_proj')
  """

  name: str
  order: int = 0
  transposed: bool = False

  @property
  def module(self) -> str:
    return self.name.rpartition(".")[0]

  @property
  def param(self) -> str:
    return self.name.rpartition(".")[2]


NameMap = Callable[[paths.Path, "int | None"], "str | PeftParameter"]

_LAYER_NAMES = frozenset(targets.DEFAULT_LAYER_NAMES)
# gemma (`layer_3/...`) and tunix (`layers/3/...`): the part after the layer -> HF names, one per
# entry of a fused kernel's stacked axis.
_LAYER_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
  (r"attn/q_einsum/w", ("self_attn.q_proj",)),
  (r"attn/kv_einsum/w", ("self_attn.k_proj", "self_attn.v_proj")),
  (r"attn/qkv_einsum/w", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
  (r"attn/attn_vec_einsum/w", ("self_attn.o_proj",)),
  (r"attn/([qkvo])_proj/w", (r"self_attn.\1_proj",)),
  (r"mlp/gating_einsum", ("mlp.gate_proj", "mlp.up_proj")),
  (r"mlp/linear", ("mlp.down_proj",)),
  (r"mlp/(gate|up|down)_proj/kernel", (r"mlp.\1_proj",)),
  # keras-hub Gemma (`decoder_block_3/...`), its variables nested by their `path`
  (r"attention/query/kernel", ("self_attn.q_proj",)),
  (r"attention/key/kernel", ("self_attn.k_proj",)),
  (r"attention/value/kernel", ("self_attn.v_proj",)),
  (r"attention/attention_output/kernel", ("self_attn.o_proj",)),
  (r"ffw_gating/kernel", ("mlp.gate_proj",)),
  (r"ffw_gating_2/kernel", ("mlp.up_proj",)),
  (r"ffw_linear/kernel", ("mlp.down_proj",)),
)
_LAYER_PREFIX = r"(?:params/)?(?:layer_|layers/|decoder_block_)(\d+)/"
_TOP_RULES = ((r"(?:params/)?embedder/input_embedding", "model.embed_tokens"), (r"lm_head/w", "lm_head"))
# The leaf names of Hugging Face Flax modules (`weight_v`/`weight_g`: a weight-normed convolution's, as
# PyTorch's `weight_norm` names them; the model computes the kernel from them, so they only name it).
_HF_LEAVES = frozenset({"kernel", "embedding", "bias", "scale", "weight_v", "weight_g"})
# Modules of Hugging Face models outside the layer stack.
_HF_TOP = frozenset({"lm_head", "embed_tokens", "wte", "wpe", "score", "classifier", "embed_in", "embed_out"})
# PyTorch modules that GPT-2 builds as `Conv1D` (weight stored (in, out)): PEFT wants
# `fan_in_fan_out=True` for them.
_CONV1D = re.compile(r"(?:^|\.)h\.\d+\.(?:attn\.c_attn|attn\.c_proj|attn\.q_attn|mlp\.c_fc|mlp\.c_proj)$")


def lora_keys(name: str, embedding: bool) -> tuple[str, str]:
  """PEFT's state-dict keys of one module's ``A`` and ``B`` factors."""
  if embedding:
    return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
  return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def magnitude_key(name: str) -> str:
  """PEFT's state-dict key of one module's DoRA magnitude vector."""
  return f"{PREFIX}{name}.lora_magnitude_vector"


def name_str(name: str | PeftParameter) -> str:
  """The module's or the parameter's full name."""
  return name.name if isinstance(name, PeftParameter) else name


class Keys:
  """PEFT's state-dict keys of each adapted module and parameter (`lora_keys`; a parameter's key
  carries one ``.base_layer`` per adapted parameter of its module registered after it)."""

  def __init__(self, params: Iterable[PeftParameter]) -> None:
    by_module: dict[str, dict[str, PeftParameter]] = {}
    for p in params:
      if not p.module:
        raise ValueError(
          f"PEFT parameter {p.name!r} has no module (PEFT cannot target a top-level parameter)."
        )
      by_module.setdefault(p.module, {})[p.param] = p
    self._depth: dict[str, int] = {}
    for module, ps in by_module.items():
      orders = sorted(p.order for p in ps.values())
      if len(set(orders)) != len(orders):
        raise ValueError(
          f"PEFT parameters {sorted(ps)} of module {module!r} share an `order`: PEFT nests their wrappers in "
          "PyTorch's registration order, which decides their keys. Give each `jlora.PeftParameter` its "
          "place among the module's parameters (`order=`; GptOss/Llama4: gate_up_proj 0, down_proj 1)."
        )
      for p in ps.values():
        self._depth[p.name] = sum(q.order > p.order for q in ps.values())

  def has(self, name: str | PeftParameter) -> bool:
    """Whether ``name`` has keys: a module, or a parameter the adapter targets."""
    return not isinstance(name, PeftParameter) or name.name in self._depth

  def __call__(self, name: str | PeftParameter, embedding: bool = False) -> tuple[str, str]:
    if not isinstance(name, PeftParameter):
      return lora_keys(name, embedding)
    return lora_keys(name.module + ".base_layer" * self._depth[name.name], False)


def is_conv1d(name: str) -> bool:
  """Whether PyTorch builds module ``name`` as GPT-2's ``Conv1D``."""
  return _CONV1D.search(name) is not None


def peft_module_name(path: paths.Path, layer: int | None = None) -> str:
  """The Hugging Face Flax name map: a jlora leaf path -> the PyTorch module name PEFT uses.

  For Flax models whose module tree mirrors the PyTorch one (``transformers``'
  Flax Llama, Mistral, Gemma, Qwen2, GPT-2 ...): a leading ``params``
  collection and the leaf name (``kernel``, ``embedding`` ...) are dropped,
  ``layers_3`` becomes ``layers.3`` (also for ``h``, ``blocks``, ``block``,
  ``layer``, ``decoder_layers``), int keys (NNX lists) become their digits,
  and the entries are joined with ``.``. For a kernel stacked over layers,
  ``layer`` is inserted after the layer container (``layers`` ->
  ``layers.<layer>``). PEFT's state-dict keys add the prefix
  ``base_model.model.``.

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


def family_name(path: paths.Path, index: int | None) -> str | None:
  """gemma's, tunix's and keras-hub's names (of modules that are Linears in Hugging Face's PyTorch
  models), or ``None`` when the path is none of theirs."""
  where = paths.to_str(path)
  for pattern, name in _TOP_RULES:
    if re.fullmatch(pattern, where) and index is None:
      return name
  m = re.match(_LAYER_PREFIX, where)
  if m is None:
    return None
  rest = where[m.end() :]
  for pattern, names in _LAYER_RULES:
    hit = re.fullmatch(pattern, rest)
    if hit is None:
      continue
    if (index is None) != (len(names) == 1) or (index is not None and not 0 <= index < len(names)):
      return None
    return f"model.layers.{m.group(1)}." + hit.expand(names[index or 0])
  return None


def _hf_like(path: paths.Path, index: int | None) -> bool:
  """Whether a path reads as a Hugging Face module tree: a layer container (``layers_3``; or, for a
  stacked kernel, ``layers``), a numbered module list (``h/0``, ALBERT's ``albert_layer_groups/0``,
  Wav2Vec2's ``conv_layers/0``) or a known top-level module."""
  entries = [str(e) for e in path[:-1]]
  for i, e in enumerate(entries):
    m = re.fullmatch(r"(.+)_(\d+)", e)
    numbered = m is not None and m.group(1) in _LAYER_NAMES  # layers_3
    listed = not e.isdigit() and i + 1 < len(entries) and entries[i + 1].isdigit()  # layers/3
    scanned = e in _LAYER_NAMES and index is not None  # layers, one module per layer
    if numbered or listed or scanned:
      return True
  return bool(entries) and entries[-1] in _HF_TOP


def checked_name_map(name_map: NameMap) -> NameMap:
  """``name_map`` with each answer checked: a non-empty module name (str) or a `PeftParameter`.

  A map that answers anything else (``None`` from a dict's ``.get``, a path tuple)
  would give every weight the same PEFT key (``...None.lora_A.weight``).

  Raises:
    ValueError: (from the returned map) for such an answer, naming the path, the
      index and the answer.
  """

  def checked(path: paths.Path, index: int | None = None) -> str | PeftParameter:
    name = name_map(path, index)
    if isinstance(name, PeftParameter) or (isinstance(name, str) and name):
      return name
    at = repr(paths.to_str(path)) + ("" if index is None else f" (index {index})")
    raise ValueError(
      f"Your `name_map` returned {name!r} for the weight at {at}: it must return the PyTorch module name "
      "without 'base_model.model.' (a non-empty str such as 'model.layers.0.self_attn.q_proj'), or a "
      "`jlora.PeftParameter` for an expert kernel. The map gets the path as a tuple of keys "
      f"({tuple(path)!r}; messages print it as {paths.to_str(path)!r}) and `index`, the entry along the "
      "weight's stacked axis or None."
    )

  return checked


def default_name_map(path: paths.Path, index: int | None = None) -> str:
  """The name map `export_peft` and `import_peft` use when given none (see module doc).

  Raises:
    ValueError: for a weight no known model family names, naming its path
      and the ``name_map=`` fix.

  Example:
    >>> from jlora._src.io.peft.names import default_name_map
    >>> default_name_map(("params", "layer_0", "attn", "kv_einsum", "w"), 1)   # gemma
    'model.layers.0.self_attn.v_proj'
    >>> default_name_map(("layers", 2, "mlp", "gate_proj", "kernel"))           # tunix
    'model.layers.2.mlp.gate_proj'
  """
  name = family_name(path, index)
  if name is not None:
    return name
  if str(path[-1]) in _HF_LEAVES and _hf_like(path, index):
    return peft_module_name(path, index)
  raise ValueError(
    f"No PEFT name map jlora knows names the weight {paths.to_str(path)!r}"
    + (f" (entry {index} of its stacked axis)" if index is not None else "")
    + ": jlora maps Hugging Face Flax models (leaves 'kernel'/'embedding'), gemma's gm.nn.Transformer "
    "and tunix's NNX models. Pass `name_map=fn(path, index) -> 'model.layers.0.self_attn.q_proj'` "
    "giving the PyTorch module name of each weight (for an expert kernel, "
    "`jlora.PeftParameter('model.layers.0.mlp.experts.gate_up_proj')`, PEFT's `target_parameters`)."
  )


def hf_tree_map(name_map: NameMap, leaves: Iterable[paths.Path]) -> NameMap:
  """The map for a whole tree: ``name_map``; the default map extended, on a Hugging Face Flax tree, to
  every leaf named ``kernel``/``embedding``/``bias``/``scale`` (or a weight-normed convolution's
  ``weight_v``/``weight_g``) without a stacked axis that no gemma,
  tunix or keras-hub rule names, outside the layer stack too (BERT's ``pooler/dense/kernel``, ELECTRA's
  ``embeddings_project``, CLIP's ``visual_projection``, GPT-2's ``transformer/ln_f/bias``): those mirror
  PyTorch's modules as the layers' weights do (`peft_module_name`). The tree is a Hugging Face one when
  one of its ``leaves`` reads as a Hugging Face path (a layer container or a numbered module list) and is
  named by that mirror rule."""
  hf = any(family_name(p, None) is None and str(p[-1]) in _HF_LEAVES and _hf_like(p, None) for p in leaves)
  if name_map is not default_name_map or not hf:
    return name_map

  def named(path: paths.Path, index: int | None = None) -> str | PeftParameter:
    if index is None and str(path[-1]) in _HF_LEAVES and family_name(path, None) is None:
      return peft_module_name(path)
    return default_name_map(path, index)

  return named
