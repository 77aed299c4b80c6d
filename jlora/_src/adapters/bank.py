"""Banks: many adapters for one base, stacked on a leading adapter axis (`stack`).

A bank's ``lora`` tree mirrors its adapters' trees with a leading adapter axis on
every leaf: adapter ``k``'s factors are ``leaf[k]``, zero-padded on the rank
axis to the largest rank at that kernel (zero rank columns add nothing to
``A @ B``), and all zeros at kernels adapter ``k`` does not adapt. The scales
(``alpha / r`` of each adapter at each kernel) are not folded into the factors:
they live in the static `BankConfig`, so ``leaf[k]`` is adapter ``k``'s own
factors and `Bank.adapter` gives each adapter back exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.core import paths
from jlora._src.core.config import LoraConfig, check_config

_FACTORS = (paths.LORA_A, paths.LORA_B)


@dataclasses.dataclass(frozen=True)
class BankEntry:
  """One adapted kernel of a bank.

  Attributes:
    path: the kernel's path in the base tree.
    names: its module path and parameter path (what target patterns match).
    ranks: each adapter's rank here; ``0`` where the adapter does not adapt it.
    scales: each adapter's ``alpha / r`` (or ``alpha / sqrt(r)``) here; ``0.0``
      where it does not adapt it.
    rank_axes: the rank axis of ``lora_A`` and of ``lora_B`` (without the bank
      axis) where the ranks differ and the factors are padded; ``None`` where
      every adapter present has the same rank.
  """

  path: paths.Path
  names: tuple[str, str]
  ranks: tuple[int, ...]
  scales: tuple[float, ...]
  rank_axes: tuple[int, int] | None

  @property
  def rank(self) -> int:
    """The bank's (padded) rank here: the largest adapter rank."""
    return max(self.ranks)


@dataclasses.dataclass(frozen=True)
class BankConfig:
  """The static description of a bank: its adapters' configs and names, and per kernel their
  ranks and scales. Pass it to `jlora.wrap` in place of a `LoraConfig`.

  Attributes:
    configs: each adapter's `LoraConfig`, in bank order.
    names: each adapter's name, in bank order.
    entries: one `BankEntry` per adapted kernel, in first-seen tree order.
  """

  configs: tuple[LoraConfig, ...]
  names: tuple[str, ...]
  entries: tuple[BankEntry, ...]

  @property
  def num_adapters(self) -> int:
    return len(self.configs)

  def entry(self, path: paths.Path) -> BankEntry:
    """The entry of the kernel at ``path``.

    Raises:
      KeyError: if no adapter of the bank adapts it.
    """
    for e in self.entries:
      if e.path == path:
        return e
    raise KeyError(f"No adapter of the bank adapts {paths.to_str(path)!r}.")

  def index(self, name: str | int) -> int:
    """The bank index of adapter ``name`` (an index is checked and returned)."""
    n = self.num_adapters
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
      if not -n <= int(name) < n:
        raise IndexError(f"Adapter index {name} is out of range for a bank of {n} adapters.")
      return int(name) % n
    if name not in self.names:
      raise KeyError(f"No adapter named {name!r} in the bank; its adapters are {list(self.names)}.")
    return self.names.index(name)

  @property
  def lora_config(self) -> LoraConfig:
    """A `LoraConfig` that adapts exactly the bank's kernels at the bank's (padded) ranks, with
    scale 1 everywhere (the per-adapter scales are applied per example from `entries`)."""
    exact = lambda e: re.escape(e.names[1])  # noqa: E731
    first = self.configs[0]
    layers = first.layers_to_transform
    same_layers = all(
      (c.layers_to_transform, c.layers_pattern) == (layers, first.layers_pattern) for c in self.configs
    )
    layout = {}
    for e in self.entries:
      found = {c.layout_for(e.names) for c, r in zip(self.configs, e.ranks) if r} - {None}
      if found:
        layout[exact(e)] = found.pop()
    top = max(e.rank for e in self.entries)
    return LoraConfig(
      r=top,
      lora_alpha=float(top),
      target_modules=tuple(e.names[1] for e in self.entries),
      layers_to_transform=layers if same_layers else None,
      layers_pattern=first.layers_pattern if same_layers and layers is not None else None,
      rank_pattern={exact(e): e.rank for e in self.entries},
      alpha_pattern={exact(e): float(e.rank) for e in self.entries},
      layout_pattern=layout,
      init_lora_weights=False,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bank:
  """Adapters for one base, stacked (see `stack`). A pytree: ``lora`` is its child.

  Attributes:
    lora: the stacked adapter tree (leading adapter axis on every leaf).
    config: the `BankConfig`.
  """

  lora: Any
  config: BankConfig = dataclasses.field(metadata=dict(static=True))

  @property
  def names(self) -> tuple[str, ...]:
    return self.config.names

  def __len__(self) -> int:
    return self.config.num_adapters

  def adapter(self, name: str | int) -> tuple[dict, LoraConfig]:
    """Adapter ``name`` (a name or an index) back out of the bank: ``(lora, config)``, unpadded,
    equal to what was stacked (cast to the bank's dtype)."""
    k = self.config.index(name)
    out: dict = {}
    for e in self.config.entries:
      r = e.ranks[k]
      if not r:
        continue
      node = _node(self.lora, e.path)
      pair = {}
      for i, f in enumerate(_FACTORS):
        x = node[f][k]
        if e.rank_axes is not None:
          x = jax.lax.slice_in_dim(x, 0, r, axis=e.rank_axes[i])
        pair[f] = x
      _put(out, e.path, pair)
    return out, self.config.configs[k]


def _node(tree: Any, path: paths.Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _put(tree: dict, path: paths.Path, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _factor_pairs(lora: Any, where: str) -> dict[paths.Path, dict[str, Any]]:
  """``{kernel path: {"lora_A": A, "lora_B": B}}`` of one adapter tree; anything else is an error."""
  if not isinstance(lora, Mapping):
    raise TypeError(f"{where}: an adapter tree must be a dict (from jlora.init); got {type(lora).__name__}.")
  pairs: dict[paths.Path, dict[str, Any]] = {}
  for path, leaf in paths.leaves_with_paths(lora):
    if path[-1] == "lora_magnitude":
      raise ValueError(
        f"{where}: {paths.to_str(path)!r} is DoRA's magnitude (`use_dora=True`); a bank routes plain LoRA "
        "factors per example and holds no DoRA adapters: serve a DoRA adapter with `jlora.merge`, or on its "
        "own with `jlora.wrap`."
      )
    if path[-1] not in _FACTORS:
      raise ValueError(
        f"{where}: {paths.to_str(path)!r} is a trained copy (modules_to_save or bias), which a bank cannot "
        "route per example; stack adapters without modules_to_save and with bias='none'."
      )
    if not hasattr(leaf, "shape"):
      raise TypeError(f"{where}: {paths.to_str(path)!r} is not an array: {type(leaf).__name__}.")
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  for path, pair in pairs.items():
    if len(pair) != 2:
      raise ValueError(
        f"{where}: {paths.to_str(path)!r} has {sorted(pair)} but needs both lora_A and lora_B."
      )
  if not pairs:
    raise ValueError(f"{where}: the adapter tree holds no lora_A/lora_B pair.")
  return pairs


def _rank_axis(shapes: list[tuple[int, ...]], ranks: list[int], where: str) -> int | None:
  """The one axis on which the factor ``shapes`` of adapters of ``ranks`` differ (``None`` if all
  ranks are equal), checked: every other axis agrees (else the adapters fit different kernels)."""
  if any(len(s) != len(shapes[0]) for s in shapes):
    raise ValueError(f"{where}: the adapters' factors have different numbers of axes {shapes}: {_DIFFERENT}")
  differ = [ax for ax in range(len(shapes[0])) if len({s[ax] for s in shapes}) > 1]
  if len(set(ranks)) == 1:
    if differ:
      raise ValueError(f"{where}: the adapters' factors have shapes {shapes} at the same rank: {_DIFFERENT}")
    return None
  if len(differ) != 1 or [s[differ[0]] for s in shapes] != ranks:
    raise ValueError(
      f"{where}: factor shapes {shapes} for ranks {ranks} differ beyond the rank axis: {_DIFFERENT}"
    )
  return differ[0]


_DIFFERENT = (
  "they were made for different bases (or with different layers_to_transform on a stacked kernel); a bank "
  "holds adapters of one base."
)


def adapter_pairs(adapters: Sequence[Any], caller: str) -> list[tuple[Any, Any]]:
  """``adapters`` as a list of ``(lora, config)`` pairs, at least one (the configs are checked later)."""
  adapters = list(adapters)
  if not adapters:
    raise ValueError(f"`{caller}` needs at least one (lora, config) pair.")
  for i, item in enumerate(adapters):
    if not isinstance(item, tuple) or len(item) != 2:
      raise TypeError(f"adapters[{i}] must be a (lora, config) pair; got {type(item).__name__}.")
  return adapters


def stack(adapters: Sequence[tuple[Any, LoraConfig]], names: Sequence[str] | None = None) -> Bank:
  """Stacks adapters of one base into a `Bank` for per-example routing.

  Adapters may differ in rank, alpha (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) and targets: ranks are zero-padded to the largest at each
  kernel, scales are kept per adapter and kernel in the bank's config, and a
  kernel an adapter does not adapt holds zeros for it. Adapters loaded with
  `jlora.load_adapter` or `jlora.import_peft` stack like those from
  `jlora.init`.

  Args:
    adapters: ``(lora, config)`` pairs, at least one.
    names: a unique name per adapter (default ``"adapter_0"``, ...).

  Returns:
    A `Bank`: ``bank.lora`` (every leaf with a leading adapter axis; adapter
    ``k``'s part is ``leaf[k]``) and ``bank.config`` (a `BankConfig`, for
    `jlora.wrap`).

  Raises:
    ValueError: for no adapters, names that are not unique or not one per
      adapter, adapters with trained copies (``modules_to_save``, ``bias``) or
      DoRA magnitudes, factors that do not fit one base, or explicit layouts
      that disagree.
    TypeError: for a config that is not a `LoraConfig` or a tree that is not
      an adapter tree.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
    >>> cfg_a = jlora.LoraConfig(r=2, target_modules=("q_proj",))
    >>> cfg_b = jlora.LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj",))
    >>> lora_a = jlora.init(params, cfg_a, key=jax.random.key(0))
    >>> lora_b = jlora.init(params, cfg_b, key=jax.random.key(1))
    >>> bank = jlora.stack([(lora_a, cfg_a), (lora_b, cfg_b)], names=["a", "b"])
    >>> bank.lora["q_proj"]["kernel"]["lora_A"].shape
    (2, 4, 4)
  """
  adapters = adapter_pairs(adapters, "jlora.stack")
  names = tuple(f"adapter_{i}" for i in range(len(adapters))) if names is None else tuple(names)
  if (
    len(names) != len(adapters) or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names)
  ):
    raise ValueError(f"`names` must be {len(adapters)} unique strings, one per adapter; got {list(names)}.")
  configs = tuple(check_config(cfg, f"adapters[{i}][1]") for i, (_, cfg) in enumerate(adapters))
  trees = [_factor_pairs(lora, f"adapters[{i}] ({names[i]!r})") for i, (lora, _) in enumerate(adapters)]
  collections = paths.is_collections(adapters[0][0])
  order = list(dict.fromkeys(p for t in trees for p in t))

  entries, out = [], {}
  for path in order:
    module = paths.module_path(path, collections)
    leaf = str(path[-1])
    names_here = (module, f"{module}/{leaf}" if module else leaf)
    present = [k for k, t in enumerate(trees) if path in t]
    where = f"at {paths.to_str(path)!r}"
    ranks = [configs[k].rank_for(names_here) for k in present]
    for k, r in zip(present, ranks):
      if any(r not in trees[k][path][f].shape for f in _FACTORS):
        raise ValueError(
          f"{where}: adapter {names[k]!r} has factors {[tuple(trees[k][path][f].shape) for f in _FACTORS]}, "
          f"with no axis of its config's rank {r}: the tree and the config do not belong together (or the "
          "adapter is a grouped convolution's, whose lora_B has rank / groups features: a bank does not "
          "route those; leave the module out with `exclude_modules`)."
        )
    rank_axes = []
    for f in _FACTORS:
      rank_axes.append(_rank_axis([tuple(trees[k][path][f].shape) for k in present], ranks, where))
    explicit = {configs[k].layout_for(names_here) for k in present} - {None}
    if len(explicit) > 1:
      raise ValueError(
        f"{where}: the adapters' configs give different layouts {sorted(map(str, explicit))} "
        "(layout_pattern); a bank's adapters must agree on each kernel's layout."
      )
    top = max(ranks)
    dtype = jnp.result_type(*(trees[k][path][f].dtype for k in present for f in _FACTORS))
    pair = {}
    for i, f in enumerate(_FACTORS):
      like = trees[present[ranks.index(top)]][path][f]
      parts = []
      for k in range(len(trees)):
        if k not in present:
          parts.append(jnp.zeros(like.shape, dtype))
          continue
        x = jnp.asarray(trees[k][path][f], dtype)
        if rank_axes[i] is not None:
          pad = [(0, 0)] * x.ndim
          pad[rank_axes[i]] = (0, top - x.shape[rank_axes[i]])
          x = jnp.pad(x, pad)
        parts.append(x)
      pair[f] = jnp.stack(parts)
    _put(out, path, pair)
    full_ranks = tuple(ranks[present.index(k)] if k in present else 0 for k in range(len(trees)))
    scales = tuple(configs[k].scale_for(names_here) if k in present else 0.0 for k in range(len(trees)))
    axes = None if rank_axes[0] is None else (rank_axes[0], rank_axes[1])
    entries.append(BankEntry(path, names_here, full_ranks, scales, axes))
  return Bank(out, BankConfig(configs, names, tuple(entries)))
