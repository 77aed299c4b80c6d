"""`add_weighted`: one adapter from a weighted combination of adapters (PEFT's ``add_weighted_adapter``).

PEFT's methods, with PEFT's math, kernel by kernel (each adapter ``k`` with
weight ``w_k``, scale ``s_k = alpha_k / r_k`` and factors ``A_k``, ``B_k``):

* ``linear`` and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
  merge the factors themselves as task tensors: ``A`` with weights
  ``sign(w_k s_k) sqrt(|w_k s_k|)``, ``B`` with ``sqrt(|w_k s_k|)``. The
  adapters need one rank, which the result keeps.
* ``cat`` concatenates the ranks: ``A = [w_1 s_1 A_1, ...]``,
  ``B = [B_1; ...]``; the result's rank is the sum of the ranks (exact:
  its update is ``sum_k w_k s_k A_k @ B_k``).
* ``svd`` and the ``*_svd`` variants merge the updates ``s_k A_k @ B_k`` with
  weights ``w_k`` and factor the result back to rank ``r`` by a truncated SVD.

The task-tensor merges are PEFT's `merge_utils`: ``ties`` keeps the
``density`` fraction of each tensor's entries of largest magnitude, elects a
sign per entry (``majority_sign_method``: the sign of the sum, ``"total"``, or
of the count, ``"frequency"``) and averages the weighted entries of that sign;
``dare_*`` drop entries at random (kept with probability ``density``, rescaled
by ``1 / density``); ``magnitude_prune`` prunes by magnitude and sums.

Each stacked entry of a kernel (a layer of an ``nn.scan`` stack, the k or v
part of a fused projection) is one PEFT module: pruning and the SVD work per
entry, on the ``(fan_in, fan_out)`` matricisation of the kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters.bank import adapter_pairs
from jlora._src.adapters.bind import bound_adapters
from jlora._src.adapters.spec import AdapterSpec, Bound, canonical, from_canonical
from jlora._src.core import paths
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config

METHODS = (
  "linear",
  "cat",
  "svd",
  "ties",
  "ties_svd",
  "dare_linear",
  "dare_ties",
  "dare_linear_svd",
  "dare_ties_svd",
  "magnitude_prune",
  "magnitude_prune_svd",
)
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Merge:
  """How task tensors are merged: ``base`` is the method without ``_svd``."""

  base: str
  density: float | None
  sign_method: str

  @property
  def elects_sign(self) -> bool:
    return self.base in ("ties", "dare_ties")

  @property
  def random(self) -> bool:
    return self.base.startswith("dare")


def _check_method_options(
  method: Any, *, r: Any, density: Any, majority_sign_method: Any, key: Any, svd_clamp: Any
) -> None:
  """Checks each option against the method (an option the method does not use is an error)."""
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {list(METHODS)}; got {method!r}.")
  svd = method.endswith("svd")
  if r is not None and (not svd or isinstance(r, bool) or not isinstance(r, int) or r <= 0):
    raise ValueError(
      f"`r` is the rank of an SVD method's result, a positive integer (default: the adapters' largest "
      f"rank); got r={r!r} with method={method!r} (linear methods keep the rank, 'cat' sums the ranks)."
    )
  if svd_clamp is not None and (
    not svd or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1
  ):
    raise ValueError(
      f"`svd_clamp` is a quantile in [0, 1] for SVD methods only; got {svd_clamp!r} with method={method!r}."
    )
  prunes = method not in ("linear", "cat", "svd")
  if prunes and (density is None or isinstance(density, bool) or not isinstance(density, (int, float))):
    raise ValueError(
      f"method={method!r} needs `density`, the fraction of entries kept, in [0, 1]; got {density!r}."
    )
  if not prunes and density is not None:
    raise ValueError(f"method={method!r} prunes nothing: `density` must be None; got {density!r}.")
  if prunes and not 0 <= density <= 1:
    raise ValueError(f"`density` must be in [0, 1]; got {density!r}.")
  if method.startswith("dare") and density == 0:
    raise ValueError("DARE rescales the kept entries by 1 / density: `density` must be > 0 (got 0).")
  if majority_sign_method not in _SIGN_METHODS:
    raise ValueError(f"`majority_sign_method` must be one of {_SIGN_METHODS}; got {majority_sign_method!r}.")
  if majority_sign_method != "total" and "ties" not in method:
    raise ValueError(f"`majority_sign_method` is used by the ties methods only; method={method!r}.")
  if method.startswith("dare") and key is None:
    raise ValueError(f"method={method!r} drops entries at random: pass `key=jax.random.key(...)`.")
  if key is not None and not method.startswith("dare"):
    raise ValueError(f"method={method!r} is deterministic: `key` must be None.")


def _config_rank(config: LoraConfig) -> int:
  """PEFT's rank of an adapter: ``r``, or the largest of ``r`` and the `rank_pattern` ranks."""
  return max([config.r, *(v for _, v in config.rank_pattern)])


def _new_rank(method: str, ranks: list[int], r: int | None) -> int:
  if method in _SAME_RANK:
    if len(set(ranks)) != 1:
      raise ValueError(
        f"method={method!r} merges the factors themselves, so the adapters need one rank (r, or the "
        f"largest of r and rank_pattern); they have {ranks}. Use 'cat' or an SVD method to combine ranks."
      )
    return ranks[0]
  if method == "cat":
    return sum(ranks)
  return r or max(ranks)


def _union_targets(configs: Sequence[LoraConfig], adapted: Sequence[AdapterSpec]) -> tuple[str, ...] | str:
  """PEFT's targets of the result: the union of lists, or the regexes joined by ``|``; ``"all-linear"``
  beside other targets (PEFT expands it to the model's linear modules first): the ``adapted`` kernels'
  modules (a kernel's own path where its module has several kernels)."""
  found = [c.target_modules for c in configs]
  if any(t == ALL_LINEAR for t in found):
    if all(t == ALL_LINEAR for t in found):
      return ALL_LINEAR
    per_module: dict[str, int] = {}
    for s in adapted:
      per_module[s.module] = per_module.get(s.module, 0) + 1
    return tuple(dict.fromkeys(s.module if per_module[s.module] == 1 else s.param for s in adapted))
  if len({isinstance(t, str) for t in found}) > 1:
    raise ValueError(
      f"The adapters' `target_modules` {found} mix lists and regex strings, which PEFT does not combine "
      "either; write them all as lists or all as regexes."
    )
  if isinstance(found[0], str):
    return "|".join(f"({t})" for t in found)
  return tuple(dict.fromkeys(name for t in found for name in t))


def _combined_config(configs: Sequence[LoraConfig], rank: int, adapted: Sequence[AdapterSpec]) -> LoraConfig:
  """PEFT's config of the result: the first adapter's, with ``r = lora_alpha = rank`` (scale 1),
  the targets' union (`_union_targets`) and no rank or alpha patterns."""
  for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
    values = [getattr(c, name) for c in configs]
    if any(v != values[0] for v in values):
      raise ValueError(
        f"The adapters have different `{name}` {values}. PEFT gives the result the first adapter's, "
        "which adapts other kernels than the adapters do; combine adapters that agree on it."
      )
  layout: dict[str, Any] = {}
  for c in configs:
    for pattern, value in c.layout_pattern:
      if layout.setdefault(pattern, value) != value:
        raise ValueError(
          f"The adapters' `layout_pattern` give {pattern!r} the layouts {layout[pattern]!r} and {value!r}; "
          "adapters of one base agree on each kernel's layout."
        )
  # PEFT copies `use_rslora` too, which makes its result's scale sqrt(r) rather than the 1 its factors are
  # computed for; the result here has scale 1, so its update is the combination.
  return dataclasses.replace(
    configs[0],
    r=rank,
    lora_alpha=float(rank),
    target_modules=_union_targets(configs, adapted),
    rank_pattern=(),
    alpha_pattern=(),
    use_rslora=False,
    layout_pattern=layout,
  )


def _read(lora: Any, config: LoraConfig, base: Any, where: str) -> dict[paths.Path, Bound]:
  """An adapter's kernels, read against ``base`` or from the factor shapes."""
  if config.modules_to_save is not None or config.bias != "none":
    raise ValueError(
      f"{where}: its config trains copies of whole leaves (`modules_to_save`={config.modules_to_save!r}, "
      f"`bias`={config.bias!r}), which are not LoRA factors to combine (PEFT starts the result's copies "
      "over from the base); combine adapters without them."
    )
  bound, _ = bound_adapters(lora, config, base)
  return {item.spec.path: item for item in bound}


# -- task-tensor merges (PEFT's merge_utils), on tensors (K, S, ...): K adapters, S stacked entries ---


def _magnitude_prune(t: jax.Array, density: float) -> jax.Array:
  """Keeps the ``int(density * n)`` entries of largest magnitude of each (adapter, entry) slice."""
  if density >= 1:
    return t
  flat = t.reshape(t.shape[:2] + (-1,))
  k = int(density * flat.shape[-1])
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  mask = (
    jnp.zeros(flat.shape, bool)
    .at[jnp.arange(flat.shape[0])[:, None, None], jnp.arange(flat.shape[1])[None, :, None], idx]
    .set(True)
  )
  return jnp.where(mask, flat, 0.0).reshape(t.shape)


def _random_prune(t: jax.Array, density: float, key: jax.Array) -> jax.Array:
  """DARE: keeps each entry with probability ``density``, rescaled by ``1 / density``."""
  if density >= 1:
    return t
  return jnp.where(jax.random.bernoulli(key, density, t.shape), t / density, 0.0)


def _merge(t: jax.Array, weights: jax.Array, merge: _Merge, key: jax.Array | None) -> jax.Array:
  """PEFT's merge of task tensors ``t`` ``(K, ...)`` with ``weights`` ``(K,)``."""
  if merge.base in ("ties", "magnitude_prune"):
    t = _magnitude_prune(t, merge.density)
  elif merge.random:
    t = _random_prune(t, merge.density, key)
  weighted = t * weights.reshape((-1,) + (1,) * (t.ndim - 1))
  if not merge.elects_sign:
    return weighted.sum(0)
  sign = jnp.sign(t)
  votes = t.sum(0) if merge.sign_method == "total" else sign.sum(0)
  keep = sign == jnp.where(votes >= 0, 1.0, -1.0)
  return (weighted * keep).sum(0) / jnp.maximum(keep.sum(0), 1).astype(t.dtype)


@dataclasses.dataclass(frozen=True)
class _Kernel:
  """The adapters at one kernel as float32 matrices, one per adapter present (S: stacked entries)."""

  spec: AdapterSpec  # the first adapter's (the kernel, layout and layer selection)
  a: list[jax.Array]  # (S, fan_in, r_k)
  b: list[jax.Array]  # (S, r_k, fan_out)
  scales: list[float]
  dtype: Any


def _kernel(path: paths.Path, items: list[tuple[int, Bound]]) -> _Kernel:
  """The adapters at ``path`` as float32 matrices, checked to fit one kernel (not a grouped
  convolution's, whose factors are no matrices of the kernel's fan-in and fan-out)."""
  first = items[0][1].spec
  if first.layout.groups > 1:
    raise ValueError(
      f"The adapter at {paths.to_str(path)!r} adapts a grouped convolution (`feature_group_count`="
      f"{first.layout.groups}; PEFT's lora_A over all input features, a grouped 1x1 lora_B), whose update "
      "no single pair of factors of the kernel's fan-in and fan-out can carry: `add_weighted` does not "
      "combine it. Leave the module out of the adapters to combine (`exclude_modules`)."
    )
  for k, item in items[1:]:
    s = item.spec
    if (s.layout, s.kernel_shape, s.layers) != (first.layout, first.kernel_shape, first.layers):
      raise ValueError(
        f"At {paths.to_str(path)!r}, adapters[{items[0][0]}] factors a kernel {first.kernel_shape} of layout "
        f"{first.layout} (layers {first.layers}) and adapters[{k}] a kernel {s.kernel_shape} of layout "
        f"{s.layout} (layers {s.layers}): adapters made for different bases (or layer selections) do not "
        "combine."
      )
  n_in, n_out = math.prod(first.in_shape), math.prod(first.out_shape)
  a, b = [], []
  for _, item in items:
    ca, cb = canonical(item.spec, item.a, item.b)
    a.append(ca.astype(jnp.float32).reshape((-1, n_in, item.spec.rank)))
    b.append(cb.astype(jnp.float32).reshape((-1, item.spec.rank, n_out)))
  dtype = jnp.result_type(*(x.dtype for _, item in items for x in (item.a, item.b)))
  return _Kernel(first, a, b, [item.spec.scale for _, item in items], dtype)


def _pad_rank(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Zero rank columns up to ``rank`` (they add nothing to ``A @ B``)."""
  extra = rank - a.shape[-1]
  return jnp.pad(a, ((0, 0), (0, 0), (0, extra))), jnp.pad(b, ((0, 0), (0, extra), (0, 0)))


def _factor_merge(kern: _Kernel, weights: list[float], merge: _Merge, rank: int, *, key: Any, where: str):
  ranks = [x.shape[-1] for x in kern.a]
  if len(set(ranks)) != 1:
    raise ValueError(
      f"At {where!r} the adapters have ranks {ranks}; method={merge.base!r} merges the factors "
      "themselves and needs one rank (use 'cat' or an SVD method)."
    )
  ws = [w * s for w, s in zip(weights, kern.scales)]
  w_a = jnp.asarray([math.copysign(math.sqrt(abs(x)), x) for x in ws], jnp.float32)
  w_b = jnp.asarray([math.sqrt(abs(x)) for x in ws], jnp.float32)
  key_a, key_b = jax.random.split(key) if key is not None else (None, None)
  a = _merge(jnp.stack(kern.a), w_a, merge, key_a)
  b = _merge(jnp.stack(kern.b), w_b, merge, key_b)
  return _pad_rank(a, b, rank)


def _svd_merge(
  kern: _Kernel, weights: list[float], merge: _Merge, rank: int, *, clamp: float | None, key: Any, where: str
):
  n_in, n_out = kern.a[0].shape[1], kern.b[0].shape[2]
  if rank > min(n_in, n_out):
    raise ValueError(
      f"At {where!r} the kernel's update is {n_in} x {n_out} (fan-in x fan-out), which has no rank-{rank} "
      f"SVD factors; pass `r` <= {min(n_in, n_out)}."
    )
  w = jnp.asarray(weights, jnp.float32)
  keys = None if key is None else jax.random.split(key, kern.a[0].shape[0])

  def one(xs):  # one stacked entry (one PEFT module): the full update exists for one entry at a time
    a, b, k = xs
    deltas = jnp.stack([s * jnp.matmul(x, y, precision=_HIGHEST) for x, y, s in zip(a, b, kern.scales)])
    delta = _merge(deltas[:, None], w, merge, k)[0]
    # PEFT's orientation: the SVD of the (out, in) update, U S -> lora_B, Vh -> lora_A.
    u, sv, vh = jnp.linalg.svd(delta.T, full_matrices=False)
    u, vh = u[:, :rank] * sv[:rank], vh[:rank]
    if clamp is not None:
      hi = jnp.quantile(jnp.concatenate([u.ravel(), vh.ravel()]), clamp)
      u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return vh.T, u.T

  return jax.lax.map(one, (kern.a, kern.b, keys))


def _cat(kern: _Kernel, weights: list[float], rank: int):
  a = jnp.concatenate([w * s * x for w, s, x in zip(weights, kern.scales, kern.a)], axis=-1)
  return _pad_rank(a, jnp.concatenate(kern.b, axis=1), rank)


def _to_tree_order(kern: _Kernel, a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
  """Merged matrices back in the kernel's axis order (`jlora.Layout`)."""
  spec = dataclasses.replace(kern.spec, rank=a.shape[-1], scale=1.0)
  stacked = spec.stacked_shape
  a = a.reshape(stacked + spec.in_shape + (spec.rank,))
  b = b.reshape(stacked + (spec.rank,) + spec.out_shape)
  a, b = from_canonical(spec, a, b)
  return {paths.LORA_A: a.astype(kern.dtype), paths.LORA_B: b.astype(kern.dtype)}


def _refuse_dora(configs: Sequence[LoraConfig]) -> None:
  """Raises for a DoRA adapter: there is no combination of magnitudes to compute."""
  dora = [i for i, c in enumerate(configs) if c.use_dora]
  if dora:
    raise ValueError(
      f"`adapters[{dora[0]}]` is a DoRA adapter (`use_dora=True`); `jlora.add_weighted` combines LoRA "
      "factors, not DoRA magnitudes. PEFT's `add_weighted_adapter` does not combine them either: its "
      "result keeps the magnitude its new adapter got at its own initialisation (the kernel norms at a "
      "random or zero update), dropping the trained ones, so there is no combination to reproduce. Merge "
      "each DoRA adapter into the base instead (`jlora.merge`), or combine plain LoRA adapters."
    )


def _check_weights(weights: Any, n: int) -> list[float]:
  """``weights`` as ``n`` finite floats, one per adapter."""
  want = f"`weights` must be {n} finite numbers, one per adapter (e.g. weights={[round(1 / n, 3)] * n})"
  if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
    raise ValueError(f"{want}; got {weights!r}.")
  weights = list(weights)
  if len(weights) != n or not all(
    isinstance(w, (int, float, np.floating, np.integer)) and not isinstance(w, bool) for w in weights
  ):
    raise ValueError(f"{want}; got {weights!r}.")
  bad = [i for i, w in enumerate(weights) if not math.isfinite(w)]
  if bad:
    raise ValueError(
      f"{want}: `weights[{bad[0]}]` is {weights[bad[0]]!r}, which would make every combined factor NaN; "
      "pass a finite weight."
    )
  return [float(w) for w in weights]


def add_weighted(
  adapters: Sequence[tuple[Any, LoraConfig]],
  weights: Sequence[float],
  *,
  method: str = "linear",
  r: int | None = None,
  density: float | None = None,
  majority_sign_method: str = "total",
  key: jax.Array | None = None,
  svd_clamp: float | None = None,
  base: Any = None,
) -> tuple[dict, LoraConfig]:
  """One adapter from a weighted combination of adapters of one base: PEFT's ``add_weighted_adapter``.

  The methods and their math are PEFT's (see the module doc), and so are the
  result's rank (the adapters' rank for the factor methods, the sum for
  ``cat``, ``r`` or the largest rank for the SVD methods; an adapter's rank is
  the largest of ``r`` and its ``rank_pattern``) and config: the first
  adapter's, with ``r = lora_alpha = rank`` (scale 1), no rank or alpha
  patterns, and the union of the adapters' ``target_modules`` (``"all-linear"``
  beside other targets: the adapted kernels' modules, by path, as PEFT expands
  ``"all-linear"`` to the model's linear modules before combining). A kernel only
  some adapters adapt combines those (as PEFT). As in PEFT, one adapter is
  always combined ``linear``-ly. One difference: PEFT copies the first
  adapter's ``use_rslora``, which scales its result by ``sqrt(r)``; here the
  result has ``use_rslora=False`` and its update is the combination.

  Shapes: the factors keep their kernel's axis order (`jlora.Layout`); a Dense
  kernel ``(in, out)`` has ``lora_A`` ``(in, r)`` and ``lora_B`` ``(r, out)``
  (PEFT's ``lora_A.weight`` is ``(r, in)``, ``lora_B.weight`` ``(out, r)``).

  Args:
    adapters: ``(lora, config)`` pairs, at least one.
    weights: a finite weight per adapter (negative weights subtract).
    method: one of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``,
      ``"ties_svd"``, ``"dare_linear"``, ``"dare_ties"``, ``"dare_linear_svd"``,
      ``"dare_ties_svd"``, ``"magnitude_prune"``, ``"magnitude_prune_svd"``.
    r: the rank of an SVD method's result (default: the largest rank).
    density: for the pruning methods (``ties*``, ``dare*``,
      ``magnitude_prune*``), the fraction of entries kept, in ``[0, 1]``.
    majority_sign_method: ``"total"`` or ``"frequency"`` (ties methods).
    key: the PRNG key of the ``dare*`` methods (required there).
    svd_clamp: SVD methods: clamp the factors to the ``svd_clamp`` quantile of
      their entries (PEFT's ``svd_clamp``).
    base: the base tree, to read the adapters against; without it, each
      kernel's layout is read from the factor shapes (and the configs'
      ``layout_pattern``).

  Returns:
    ``(lora, config)``: the combined adapter tree and its `LoraConfig`.

  Raises:
    ValueError: for an unknown method, an option the method does not use or
      a missing one (``density``, ``key``), ``weights`` that are not one
      finite number per adapter, ranks the method cannot combine, adapters of different bases
      (naming the kernel), configs that disagree on ``exclude_modules``,
      ``layers_to_transform`` or layouts, that train copies
      (``modules_to_save``, ``bias``), or DoRA adapters (``use_dora``: PEFT
      keeps the new adapter's initial magnitudes, there is nothing to match).
    TypeError: for a config that is not a `LoraConfig`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jnp.ones((6, 5))}}
    >>> cfg_a = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> cfg_b = jlora.LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora_a = jlora.init(params, cfg_a, key=jax.random.key(0))
    >>> lora_b = jlora.init(params, cfg_b, key=jax.random.key(1))
    >>> lora_m, cfg_m = jlora.add_weighted(
    ...   [(lora_a, cfg_a), (lora_b, cfg_b)], weights=[0.7, 0.3], method="svd", r=3)
    >>> lora_m["q_proj"]["kernel"]["lora_A"].shape, cfg_m.r, cfg_m.lora_alpha
    ((6, 3), 3, 3.0)
  """
  adapters_ = adapter_pairs(adapters, "jlora.add_weighted")
  weights = _check_weights(weights, len(adapters_))
  _check_method_options(
    method, r=r, density=density, majority_sign_method=majority_sign_method, key=key, svd_clamp=svd_clamp
  )
  configs = [check_config(cfg, f"adapters[{i}][1]") for i, (_, cfg) in enumerate(adapters_)]
  _refuse_dora(configs)
  ranks = [_config_rank(c) for c in configs]
  if len(adapters_) == 1:
    if r is not None and r != ranks[0]:
      raise ValueError(f"One adapter is combined linearly at its own rank {ranks[0]} (as PEFT); got r={r}.")
    method, density, key = "linear", None, None
  rank = _new_rank(method, ranks, r)
  trees = [_read(lora, cfg, base, f"adapters[{i}]") for i, (lora, cfg) in enumerate(adapters_)]
  order = list(dict.fromkeys(p for t in trees for p in t))
  config = _combined_config(configs, rank, [next(t[p] for t in trees if p in t).spec for p in order])
  keys = list(jax.random.split(key, len(order))) if key is not None else [None] * len(order)
  merge = _Merge(method.removesuffix("_svd"), density, majority_sign_method)
  out: dict = {}
  for path, k in zip(order, keys):
    present = [i for i, t in enumerate(trees) if path in t]
    kern = _kernel(path, [(i, trees[i][path]) for i in present])
    w = [weights[i] for i in present]
    where = paths.to_str(path)
    if method == "cat":
      a, b = _cat(kern, w, rank)
    elif method.endswith("svd"):
      a, b = _svd_merge(kern, w, merge, rank, clamp=svd_clamp, key=k, where=where)
    else:
      a, b = _factor_merge(kern, w, merge, rank, key=k, where=where)
    paths.nested_set(out, path, _to_tree_order(kern, a, b))
  return out, config
