"""Symbolic kernels flowing through an interpreted model.

`LoraValue` is an adapted kernel *view*: the base array ``w`` as the model
currently sees it (after reshapes, transposes, casts, slices), together with
the adapter factors ``a`` and ``b`` arranged against the same view, such that
the kernel the model means is ``w + scale * einsum(a, b)``. Each view axis is
carried by ``a`` (a fan-in axis), by ``b`` (a fan-out axis, or a size-1 axis
the model added) or by both (a stacked layer axis). Factor ``a`` has shape
``(*[view sizes of a_axes], r)``, factor ``b`` ``(*[view sizes of b_axes], r)``.

`Probe` is the abstract twin used to read a model's kernel layouts: it tracks,
for every view axis, which kernel axes it came from, and records the role
(``s`` stacked, ``i`` fan-in, ``o`` fan-out) the model's contractions give
them. An *output* probe follows the product a kernel took part in, so that
taking its fan-out axes apart entry by entry (gemma's fused k/v) is seen.

View operations return ``None`` where a view cannot be followed; callers then
materialise the kernel (with a warning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.core.qarray import QuantizedArray, is_quantized

Axes = tuple[int, ...]


def dense_weight(w: jax.Array | QuantizedArray) -> jax.Array:
  """A kernel as an array: a quantized base weight is dequantized here, at its use."""
  return w.dequantize() if is_quantized(w) else w


def reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
  """Pairs runs of non-unit axes of ``old`` and ``new`` with equal products."""
  oi = [i for i, d in enumerate(old) if d != 1]
  ni = [j for j, d in enumerate(new) if d != 1]
  groups, i, j = [], 0, 0
  while i < len(oi) and j < len(ni):
    go, gn = [oi[i]], [ni[j]]
    po, pn = old[oi[i]], new[ni[j]]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn:
        if i == len(oi):
          return None
        go.append(oi[i])
        po *= old[oi[i]]
        i += 1
      else:
        if j == len(ni):
          return None
        gn.append(ni[j])
        pn *= new[ni[j]]
        j += 1
    groups.append((go, gn))
  return groups if i == len(oi) and j == len(ni) else None


def letters(n: int) -> list[str]:
  alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
  if n > len(alphabet):
    raise ValueError(f"jlora cannot contract arrays with more than {len(alphabet)} axes.")
  return list(alphabet[:n])


def grouped_update(site: str, groups: int) -> ValueError:
  """The error for forming the update of a grouped convolution's adapter as a kernel (merging it)."""
  return ValueError(
    f"The adapter at {site!r} adapts a grouped convolution (`feature_group_count`={groups}) as PEFT "
    "does: lora_A over all input features, then a grouped 1x1 lora_B. That update is not a grouped "
    "kernel, so it cannot be merged into the kernel nor applied other than as the grouped convolution "
    "itself (PEFT refuses to merge it too). Apply the adapter unmerged (`jlora.wrap`) on the unmodified "
    "grouped convolution, or leave the module out (`exclude_modules`)."
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraValue:
  """A view of an adapted kernel: ``w + scale * einsum(a, b)`` (see module doc).

  ``w`` may be a `QuantizedArray` (a quantized base, before its first view);
  `base` is the array it stands for.

  ``routed`` marks a bank's kernel (`jlora.stack`): the adapters' scales here,
  one per adapter. The rank axis of ``a`` and ``b`` then holds the adapters'
  factors side by side (``N * r``, adapter-major) and each example uses its own
  adapter's (`jlora._src.interpret.rules.routing`); ``scale`` is 1.

  ``groups`` > 1 marks a grouped convolution's kernel (``feature_group_count``
  G, as PEFT adapts it): ``a`` is over all G times the kernel's input
  features and ``b`` over ``rank / G``, a grouped 1x1 map. Its update is not a
  kernel of the view's shape; only the convolution rule applies it
  (`jlora._src.interpret.rules.products.conv`).

  With DoRA, ``g`` is the per-output-feature scale ``m / ||W + scale * A @ B||``
  laid out as ``b`` without its rank axis (over ``b_axes``), and the kernel the
  model means is ``g * (w + delta)`` (`jlora._src.adapters.dora`).
  """

  w: jax.Array | QuantizedArray
  a: jax.Array
  b: jax.Array
  a_axes: Axes = dataclasses.field(metadata=dict(static=True))
  b_axes: Axes = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))
  site: str = dataclasses.field(metadata=dict(static=True))
  routed: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
  g: jax.Array | None = None  # DoRA: m / ||W + scale * A @ B||, over b_axes
  groups: int = dataclasses.field(default=1, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def base(self) -> jax.Array:
    """The base kernel view as an array (dequantized here for a quantized base)."""
    return dense_weight(self.w)

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  def _with(self, **kw: Any) -> LoraValue:
    return dataclasses.replace(self, **kw)

  # -- materialisation -------------------------------------------------------

  @property
  def accumulate_dtype(self) -> Any:
    """The dtype sums over this kernel are accumulated in: float32, or wider if an input is
    (float64 under x64)."""
    return jnp.result_type(jnp.float32, jnp.dtype(self.w.dtype), self.a.dtype, self.b.dtype)

  def check_is_kernel(self) -> None:
    """Raises unless the update is a kernel of the view's shape (`delta`, `dense`).

    Raises:
      ValueError: for a grouped convolution's adapter, whose update is no kernel.
    """
    if self.groups > 1:
      raise grouped_update(self.site, self.groups)

  def delta(self) -> jax.Array:
    """``scale * einsum(a, b)`` laid out as the view, in `accumulate_dtype` (`check_is_kernel`)."""
    self.check_is_kernel()
    lab = letters(len(self.shape) + 1)
    r = lab[-1]
    spec = (
      "".join(lab[i] for i in self.a_axes)
      + r
      + ","
      + "".join(lab[i] for i in self.b_axes)
      + r
      + "->"
      + "".join(lab[: len(self.shape)])
    )
    a = self.a.astype(self.accumulate_dtype)
    b = self.b.astype(self.accumulate_dtype)
    d = jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)
    return d * self.scale

  def dense(self) -> jax.Array:
    """The kernel view itself, ``w + delta`` (``g * (w + delta)`` with DoRA), accumulated in
    `accumulate_dtype`."""
    merged = self.base.astype(self.accumulate_dtype) + self.delta()
    if self.g is not None:
      perm = sorted(range(len(self.b_axes)), key=lambda i: self.b_axes[i])
      g = jnp.transpose(self.g, perm).astype(self.accumulate_dtype)
      merged = merged * jnp.expand_dims(g, [i for i in range(len(self.shape)) if i not in self.b_axes])
    return merged.astype(self.w.dtype)

  # -- view operations -------------------------------------------------------

  def transpose(self, perm: Sequence[int], w: jax.Array) -> LoraValue:
    inv = {old: new for new, old in enumerate(perm)}
    return self._with(
      w=w, a_axes=tuple(inv[i] for i in self.a_axes), b_axes=tuple(inv[i] for i in self.b_axes)
    )

  def reshape(self, new_shape: Sequence[int], w: jax.Array) -> LoraValue | None:
    groups = reshape_groups(self.shape, new_shape)
    if groups is None or self.groups > 1:
      return None
    relabel: dict[int, int] = {}
    runs: list[tuple[list[int], list[int]]] = []
    for go, gn in groups:
      if len(go) == 1 and len(gn) == 1:
        relabel[go[0]] = gn[0]
      else:
        runs.append((go, gn))

    def remap(axes: Axes, other: Axes) -> list[int] | None:
      out: list[int] = []
      i = 0
      while i < len(axes):
        ax = axes[i]
        run = next((r for r in runs if ax in r[0]), None)
        if run is not None:
          go, gn = run
          if any(g in other for g in go) or list(axes[i : i + len(go)]) != go:
            return None  # a merged/split run must sit wholly, in order, in one factor
          out.extend(gn)
          i += len(go)
          continue
        if ax in relabel:
          out.append(relabel[ax])
        elif self.shape[ax] != 1:
          return None
        i += 1  # unit axes the reshape drops are squeezed out of the factor
      return out

    a_axes = remap(self.a_axes, self.b_axes)
    b_axes = remap(self.b_axes, self.a_axes)
    if a_axes is None or b_axes is None:
      return None
    carried = set(a_axes) | set(b_axes)
    b_axes += [j for j, d in enumerate(new_shape) if d == 1 and j not in carried]
    r = self.rank
    a = self.a.reshape([new_shape[i] for i in a_axes] + [r])
    b = self.b.reshape([new_shape[i] for i in b_axes] + [r])
    g = None if self.g is None else self.g.reshape([new_shape[i] for i in b_axes])
    return self._with(w=w, a=a, b=b, g=g, a_axes=tuple(a_axes), b_axes=tuple(b_axes))

  def map_axis(self, axis: int, fn) -> LoraValue:
    """Applies ``fn(factor, dim)`` to each factor that carries view ``axis``.

    Raises:
      ValueError: on a feature axis of a grouped convolution's kernel (its factors do not slice as
        the kernel does).
    """
    if self.groups > 1 and (axis in self.a_axes) != (axis in self.b_axes):
      raise ValueError(
        f"The grouped convolution kernel at {self.site!r} is sliced on its feature axis {axis} before "
        "use; its adapter (PEFT's: lora_A over all input features, a grouped 1x1 lora_B) does not slice "
        "as the kernel does. Leave the module out (`exclude_modules`)."
      )
    a, b, g = self.a, self.b, self.g
    if axis in self.a_axes:
      a = fn(a, self.a_axes.index(axis))
    if axis in self.b_axes:
      b = fn(b, self.b_axes.index(axis))
      g = None if g is None else fn(g, self.b_axes.index(axis))
    return self._with(a=a, b=b, g=g)

  def cast(self, dtype: Any, w: jax.Array) -> LoraValue | None:
    if not jnp.issubdtype(dtype, jnp.floating):
      return None  # a cast to integers is not a view of the kernel
    return self._with(w=w, a=self.a.astype(dtype), b=self.b.astype(dtype))

  def factor_in_view(self, side: str, axis: int) -> jax.Array:
    """The factor on ``side`` transposed to view order, with the rank at ``axis``.

    Needs the other factor to carry only ``axis``.
    """
    factor, axes = (self.a, self.a_axes) if side == "a" else (self.b, self.b_axes)
    perm = [len(axes) if i == axis else axes.index(i) for i in range(len(self.shape))]
    return jnp.transpose(factor, perm)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probe:
  """An abstract kernel view recording how the model contracts the kernel.

  ``origin[i]`` holds the kernel axes that view axis ``i`` came from. With
  ``output=True`` the value is a product the kernel took part in, and
  ``origin`` maps its axes to the kernel's fan-out axes.
  """

  w: jax.Array
  origin: tuple[Axes, ...] = dataclasses.field(metadata=dict(static=True))
  site: str = dataclasses.field(metadata=dict(static=True))
  output: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def base(self) -> jax.Array:
    return self.w

  def transpose(self, perm: Sequence[int], w: jax.Array) -> Probe:
    return dataclasses.replace(self, w=w, origin=tuple(self.origin[p] for p in perm))

  def reshape(self, new_shape: Sequence[int], w: jax.Array) -> Probe | None:
    groups = reshape_groups(self.shape, new_shape)
    if groups is None:
      return None
    origin: list[Axes] = [()] * len(new_shape)
    for go, gn in groups:
      merged = tuple(ax for g in go for ax in self.origin[g])
      for j in gn:
        origin[j] = merged
    return dataclasses.replace(self, w=w, origin=tuple(origin))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantView:
  """A quantized base weight no adapter touches: dequantized where the model uses it, and per
  step inside a ``scan`` over its stacked axis (never the whole stacked weight at once)."""

  w: QuantizedArray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)


Special = LoraValue | Probe | QuantView


def is_special(x: Any) -> bool:
  """Whether ``x`` is a kernel view (`LoraValue`, `Probe`, `QuantView`) rather than a plain value."""
  return isinstance(x, (LoraValue, Probe, QuantView))


def axis_roles(origin: Sequence[Axes], roles: dict[int, str]) -> dict[int, str]:
  """Kernel-axis roles from view-axis roles."""
  out: dict[int, str] = {}
  for view_axis, role in roles.items():
    for kernel_axis in origin[view_axis]:
      out[kernel_axis] = role
  return out


def flops_factorized(tokens: int, m: int, n: int, r: int) -> int:
  """Extra multiply-adds of the factorized branch ``(x @ A) @ B``."""
  return tokens * r * (m + n)


def flops_merged(m: int, n: int, r: int) -> int:
  """Extra multiply-adds of materialising ``W + A @ B`` once."""
  return m * n * (r + 1)
