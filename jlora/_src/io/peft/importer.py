"""`import_peft`: a PEFT LoRA adapter directory as a jlora adapter tree, checked before it is read.

Phases: the config (`peft_config.read_peft_config`) and the tensor index (`reader.open_checked`),
each weight's layout (`matching.import_layouts`), what the file's config selects
(`selection.selection`), the PEFT modules of each weight (`matching.find_modules`), their shapes
and ranks (`matching.check_module`), every tensor claimed (`selection`), the jlora config
(`_import_config`), and only then the tensors (`reader.build_tree`). See
`jlora._src.io.peft.common` for shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from etils import epath

from jlora._src.adapters.bind import bind
from jlora._src.core import layouts, paths, targets
from jlora._src.core.config import LoraConfig
from jlora._src.io import processes, storage
from jlora._src.io.peft import common
from jlora._src.io.peft import config as peft_config
from jlora._src.io.peft.common import CONFIG_NAME, WEIGHTS_NAME
from jlora._src.io.peft.matching import Match, check_module, find_modules, import_layouts
from jlora._src.io.peft.names import (
  Keys,
  NameMap,
  PeftParameter,
  default_name_map,
  hf_tree_map,
  magnitude_key,
  name_str,
)
from jlora._src.io.peft.reader import ST_DTYPES, build_tree, open_checked
from jlora._src.io.peft.selection import (
  bias_leaves,
  check_all_claimed,
  check_peft_targets,
  drop_ignored,
  saved_leaves,
  selection,
)


def _import_config(
  pcfg: Mapping[str, Any],
  *,
  tree: Any,
  matches: list[Match],
  cands: list[targets.Candidate],
  saved_modules: list[str],
  layout_pattern: Any,
  dtype: str | None,
  where: str,
) -> LoraConfig:
  """The jlora config that reproduces the file: the file's `target_modules` (or the adapted weights by
  exact path, `_as_written`), ranks and alphas by exact path."""
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
    exact = LoraConfig(
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
      bias=pcfg.get("bias", "none"),
      use_dora=pcfg.get("use_dora", False),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where!r} has an invalid value: {e}") from e
  return _as_written(pcfg, exact, tree, matches)


def _as_written(pcfg: Mapping[str, Any], exact: LoraConfig, tree: Any, matches: list[Match]) -> LoraConfig:
  """``exact`` with the file's own `target_modules` (and `exclude_modules`, `layers_to_transform`,
  `layers_pattern`) where jlora's matching of them adapts exactly the imported weights, so that
  `export_peft` writes them back as PEFT wrote them; else ``exact`` (adapted weights by path)."""
  target, layers = pcfg.get("target_modules"), pcfg.get("layers_to_transform")
  if not target:
    return exact
  stacked = {m.cand.path for m in matches if m.layer_axis}
  fields = dict(
    target_modules=target if isinstance(target, str) else tuple(target),
    exclude_modules=pcfg.get("exclude_modules") or None,
  )
  if layers is not None and not stacked:
    pattern = pcfg.get("layers_pattern") or None
    fields.update(
      layers_to_transform=[layers] if isinstance(layers, int) else layers,
      layers_pattern=[pattern] if isinstance(pattern, str) else pattern,
    )
  try:
    written = dataclasses.replace(exact, **fields)
    chosen = targets.match_targets(tree, written)
  except (TypeError, ValueError):  # fields jlora reads otherwise (PEFT's dotted names, regexes)
    return exact
  kept = {
    c.path
    for c in chosen
    if written.layers_to_transform is None
    or c.path in stacked
    or targets.layer_index(c.module, written.layers_pattern) in written.layers_to_transform
  }
  return written if kept == {m.cand.path for m in matches} else exact


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
  the weight's fan-in/fan-out axes flattened row-major; for PEFT's ConvNd
  adapters, whose ``lora_A.weight`` has 3+ dims, ``(r, in, *k)`` and ``(out, r,
  1, ...)`` on a Flax conv kernel ``(*k, in, out)``, with or without
  ``apply_fn``, read as jlora's ``(*k, in, r)`` and ``(r, out)``; DoRA's
  magnitude ``(1, out, 1, ...)``), and every module the
  file's ``target_modules`` selects must have tensors.

  Only the modules the file's own ``adapter_config.json`` selects are adapted,
  as PEFT selects them (`check_target_module_exists`): ``target_modules`` as a
  list of names or dotted suffixes, filtered by ``layers_to_transform`` /
  ``layers_pattern``; as a full-match regex (which ``layers_to_transform`` may
  not accompany); or ``"all-linear"`` (every kernel but the output head and
  convolutions); less ``exclude_modules`` and ``modules_to_save``. PEFT
  ignores the tensors of other modules when it loads the file; so does jlora,
  with a ``UserWarning`` naming them (not an error: PEFT loads such files, and
  jlora must read them to the model PEFT builds; not silence: trained tensors
  that are dropped point at a config that does not say what was trained).
  ``target_modules`` that select no module of ``tree`` are an error, as in
  PEFT. All tensors are checked
  before any is read: the result is complete or an error is raised. Parts of a
  fused kernel that PEFT did not adapt (``v_proj`` without ``k_proj`` on
  gemma's ``kv_einsum``) get zero factors, which compute what PEFT computes.

  The returned config keeps the file's ``target_modules`` as written
  (``["q_proj", "v_proj"]``; with its ``exclude_modules`` and
  ``layers_to_transform``) where jlora's matching of them adapts exactly the
  weights the file adapts, so `export_peft` writes them back as PEFT wrote
  them; otherwise it lists the adapted weights by exact path. Per-module
  ranks and alphas are exact-path patterns, so ``jlora.wrap``/``merge``
  reproduce PEFT's model.

  Args:
    directory: a PEFT adapter directory (``adapter_config.json`` +
      ``adapter_model.safetensors``).
    tree: the Flax base tree with the same weights as PEFT's base model.
    name_map: ``name_map(path, index) -> module name`` (or a
      `jlora.PeftParameter` for an expert kernel, read from the file's
      ``target_parameters`` adapters); default: the map of the model family
      (see `export_peft`).
    apply_fn: the model's apply function, to read each weight's layout from
      use (needed for kernels of 3+ dimensions, except convolution kernels
      the file's ConvNd tensors describe, and transposed 2-D kernels).
    example_args: example inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.
    layout_pattern: ``{pattern: layout}`` instead of ``apply_fn`` (see
      `LoraConfig.layout_pattern`).

  Returns:
    ``(lora, config)``.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: for unknown or unsupported config fields, ``target_modules``
      that select no module of ``tree``, unreadable files,
      keys no weight maps to, modules missing from the file, wrong shapes or
      dtypes (each naming the key or module; ConvNd tensors on a kernel that
      is not a Flax conv kernel, or that the model uses in no convolution),
      or N-D kernels of unknown layout.

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
  with processes.together("jlora.import_peft"), contextlib.ExitStack() as files:
    return _import(
      storage.resolve(directory),
      tree,
      name_map=name_map or default_name_map,
      layout_pattern=layout_pattern,
      model=(apply_fn, example_args, example_kwargs),
      files=files,
    )


@dataclasses.dataclass(frozen=True)
class _Found:
  """What the file adapts, checked against the tree (no tensor read yet)."""

  name_map: NameMap  # the caller's, as `hf_tree_map` adapts it to the tree
  lays: dict[paths.Path, layouts.Layout]  # each weight's layout (`import_layouts`)
  keys: Keys
  known: set  # every module name (or expert parameter) of the tree
  chosen: Callable[[str], bool]  # whether the file's config selects a module (`selection`)
  matches: list[Match]
  unmapped: str | None  # the first weight no name map knows


@dataclasses.dataclass(frozen=True)
class _Claims:
  """The file's tensors claimed by the tree: every key, the biases' and the saved copies' by leaf."""

  claimed: set[str]
  biases: dict[paths.Path, str]
  saved: dict[paths.Path, str]


def _find(
  pcfg: Mapping[str, Any],
  info: Mapping[str, Any],
  tree: Any,
  cands: list[targets.Candidate],
  *,
  name_map: NameMap,
  layout_pattern: Any,
  model: tuple[Any, Sequence[Any], Mapping[str, Any] | None],
  where: tuple[str, str],
) -> _Found:
  """The weights the file adapts and their modules, each checked (`check_module`); ``where``: the
  config's and the weights' paths, for messages."""
  config_path, weights_path = where
  name_map = hf_tree_map(name_map, [c.path for c in cands])
  read = lambda: common.model_layouts_or_refusals(model[0], tree, model[1], model[2])  # noqa: E731
  lays, unknown = import_layouts(tree, cands, layout_pattern, read)
  known = {n for c in cands for _, n in common.safe_module_names(c, lays.get(c.path), name_map)}
  targeted = pcfg.get("target_parameters")
  keys = Keys(
    n for n in known if isinstance(n, PeftParameter) and peft_config.parameter_selected(targeted, n.name)
  )
  chosen = selection(pcfg, cands, lays, name_map, info=info, where=config_path)
  found, unmapped = find_modules(
    cands, (lays, unknown), name_map, info, keys=keys, chosen=chosen, weights_path=weights_path
  )
  matches = [
    check_module(c, layout=lay, hits=hits, info=info, keys=keys, pcfg=pcfg, weights_path=weights_path)
    for c, lay, hits in found
  ]
  return _Found(name_map, lays, keys, known, chosen, matches, unmapped)


def _magnitude_keys(
  pcfg: Mapping[str, Any], matches: list[Match], info: Mapping[str, Any], where: str
) -> set:
  """DoRA's magnitude keys of the adapted modules, all in the file (none without `use_dora`)."""
  if not pcfg.get("use_dora", False):
    return set()
  magnitudes = {magnitude_key(name_str(n)) for m in matches for _, n in m.names}
  missing = sorted(magnitudes - set(info))
  if missing:
    raise ValueError(
      f"{where!r} lacks DoRA's {missing[0]!r}"
      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
      + ": adapter_config.json says `use_dora`, but the file does not hold the magnitude vectors. "
      "Save the adapter again with PEFT, or set `use_dora` to false if it is a plain LoRA adapter."
    )
  return magnitudes


def _claim(
  pcfg: Mapping[str, Any], info: Mapping[str, Any], tree: Any, found: _Found, where: tuple[str, str]
) -> _Claims:
  """Claims every tensor of the file for a weight of the tree, or raises naming the first unclaimed."""
  config_path, weights_path = where
  matches, keys = found.matches, found.keys
  claimed = {k for m in matches for _, n in m.names for k in keys(n, m.embedding)}
  claimed |= _magnitude_keys(pcfg, matches, info, weights_path)
  biases = bias_leaves(tree, pcfg, found.name_map, info, weights_path)
  claimed |= set(biases.values())
  saved = saved_leaves(tree, found.name_map, info, claimed, weights_path)
  unclaimed = drop_ignored(set(info) - claimed - set(saved.values()), found.chosen, pcfg, weights_path)
  check_all_claimed(unclaimed, found.unmapped, weights_path)
  if not matches:
    raise ValueError(f"{weights_path!r} holds no LoRA weights (no '.lora_A.weight' keys).")
  check_peft_targets(pcfg, matches, found.known, found.chosen, config_path)
  return _Claims(claimed, biases, saved)


def _import(
  directory: epath.Path,
  tree: Any,
  *,
  name_map: NameMap,
  layout_pattern: Any,
  model: tuple[Any, Sequence[Any], Mapping[str, Any] | None],
  files: contextlib.ExitStack,
) -> tuple[dict, LoraConfig]:
  """`import_peft` in one process (every process of a job reads the files)."""
  pcfg, handle, info = open_checked(directory, files)
  where = (storage.show(directory / CONFIG_NAME), storage.show(directory / WEIGHTS_NAME))
  cands = targets.candidates(tree)
  found = _find(
    pcfg, info, tree, cands, name_map=name_map, layout_pattern=layout_pattern, model=model, where=where
  )
  claims = _claim(pcfg, info, tree, found, where)
  matches = found.matches
  dtypes = {ST_DTYPES[info[k][1]] for k in claims.claimed - set(claims.biases.values())}
  kernel_dtypes = {jnp.dtype(m.cand.dtype).name for m in matches}
  collections = paths.is_collections(tree)
  config = _import_config(
    pcfg,
    tree=tree,
    matches=matches,
    cands=cands,
    saved_modules=[paths.module_path(p, collections) for p in claims.saved],
    layout_pattern=layout_pattern,
    dtype=next(iter(dtypes)) if len(dtypes) == 1 and dtypes != kernel_dtypes else None,
    where=where[0],
  )
  lora = build_tree(
    handle,
    tree,
    config,
    matches=matches,
    keys=found.keys,
    saved=claims.saved,
    biases=claims.biases,
    where=where[1],
  )
  bind(tree, lora, config, lambda: {**found.lays, **{m.cand.path: m.layout for m in matches}})
  return lora, config
