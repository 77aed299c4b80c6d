"""Kernel layouts: which axes of a kernel are stacked, fan-in and fan-out, and the factor shapes they give.

A `Layout` gives every axis of a kernel a role, in storage order: ``s``
(stacked: an axis of independent adapters, such as an ``nn.scan`` layer axis
or the k/v axis of a fused kv projection), ``i`` (fan-in: contracted with the
input) or ``o`` (fan-out). A Flax Dense kernel ``(in, out)`` is ``"io"``; a
GPT-2 kernel stored ``(out, in)`` and used as ``x @ W.T`` is ``"oi"``; gemma's
``q_einsum`` ``(N, D, H)`` is ``"oio"`` and its ``kv_einsum`` ``(2, N, D, H)``
``"soio"``; a MaxText-style scanned kernel ``(in, L, out)`` is ``"iso"``.

The adapter factors keep the kernel's axis order (one rule everywhere):

* ``lora_A`` is the kernel with its fan-out axes replaced by one rank axis of
  size ``r``, at the place of the first fan-out axis;
* ``lora_B`` is the kernel with its fan-in axes replaced by one rank axis, at
  the place of the first fan-in axis.

Stacked axes appear in both. So a Dense ``(in, out)`` has A ``(in, r)``, B
``(r, out)``; a GPT-2 ``(out, in)`` kernel A ``(r, in)``, B ``(out, r)`` (PEFT's
own ``lora_A.weight``/``lora_B.weight``); gemma's ``q_einsum`` A ``(r, D)``, B
``(N, r, H)``; a scanned ``(L, in, out)`` kernel A ``(L, in, r)``, B
``(L, r, out)``. Under ``layers_to_transform`` the *layer axis* (the first
stacked axis, for a kernel whose path carries no layer index) is cut to the
selected layers in both factors.

Because the factors keep their places, the layout can be read back from the
factor shapes alone whenever only one layout fits them (always, unless the
rank equals an axis size); `readings` lists the layouts that fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

STACKED, IN, OUT = "s", "i", "o"
RANK = "r"  # the rank axis, in factor axis lists
# In `Layout.ops` beside ``conv_general_dilated``: a convolution with a dilated kernel (``rhs_dilation``).
DILATED_CONV = "conv_general_dilated:rhs_dilation"
# The role prefix of a grouped convolution's input-feature axis (``feature_group_count > 1``): "grouped@<G>".
GROUPED = "grouped@"


@dataclasses.dataclass(frozen=True)
class Layout:
  """The role of each kernel axis: ``s`` stacked, ``i`` fan-in, ``o`` fan-out (see module doc).

  Attributes:
    roles: one letter per kernel axis, in storage order (``"io"`` for a Dense
      kernel, ``"oi"`` for a transposed one, ``"sio"`` for a scanned one).
    ops: the primitives that use the kernel, when the layout was read off a
      model (`jlora.infer_layouts`); not part of equality.
    groups: a grouped convolution's ``feature_group_count`` G (1 otherwise):
      its adapter is PEFT's, ``lora_A`` over G times the kernel's input
      features and ``lora_B`` of rank / G per group (`factor_shapes`).
    group_axis: the fan-in axis of a grouped convolution's input features
      (``None`` when ``groups`` is 1).

  Example:
    >>> import jlora
    >>> lay = jlora.Layout("oio")          # gemma's q_einsum (N, D, H)
    >>> lay.in_axes, lay.out_axes
    ((1,), (0, 2))
    >>> jlora.Layout.of_counts(3, stacked=1, fan_in=1).roles
    'sio'
  """

  roles: str
  ops: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)
  groups: int = 1
  group_axis: int | None = None

  def __post_init__(self) -> None:
    if not isinstance(self.roles, str) or set(self.roles) - {STACKED, IN, OUT}:
      raise ValueError(
        f"A layout is a string of axis roles 's' (stacked), 'i' (fan-in), 'o' (fan-out); got {self.roles!r}."
      )
    if IN not in self.roles or OUT not in self.roles:
      raise ValueError(f"Layout {self.roles!r} needs at least one fan-in ('i') and one fan-out ('o') axis.")
    grouped = self.group_axis is not None and 0 <= self.group_axis < len(self.roles)
    if self.groups < 1 or (self.groups > 1) != (grouped and self.roles[self.group_axis] == IN):
      raise ValueError(
        f"Layout {self.roles!r} has groups={self.groups}, group_axis={self.group_axis}: a grouped "
        "convolution's layout (groups > 1) names its input-feature axis, a fan-in axis; others have neither."
      )

  @classmethod
  def of_counts(cls, ndim: int, stacked: int, fan_in: int) -> Layout:
    """``stacked`` leading axes, then ``fan_in`` axes, then fan-out (the Flax order)."""
    if stacked < 0 or fan_in < 1 or stacked + fan_in >= ndim:
      raise ValueError(
        f"(stacked={stacked}, fan_in={fan_in}) leaves no fan-out axis of a {ndim}-D kernel; "
        "`stacked + fan_in` must be less than the kernel's rank."
      )
    return cls(STACKED * stacked + IN * fan_in + OUT * (ndim - stacked - fan_in))

  @property
  def ndim(self) -> int:
    return len(self.roles)

  def axes(self, role: str) -> tuple[int, ...]:
    return tuple(i for i, x in enumerate(self.roles) if x == role)

  @property
  def stacked_axes(self) -> tuple[int, ...]:
    return self.axes(STACKED)

  @property
  def in_axes(self) -> tuple[int, ...]:
    return self.axes(IN)

  @property
  def out_axes(self) -> tuple[int, ...]:
    return self.axes(OUT)

  def factor_axes(self, side: str) -> tuple[int | str, ...]:
    """The axes of ``lora_A`` (``side="a"``) or ``lora_B`` in storage order: kernel axes and `RANK`."""
    gone = OUT if side == "a" else IN
    out: list[int | str] = []
    for i, role in enumerate(self.roles):
      if role != gone:
        out.append(i)
      elif RANK not in out:
        out.append(RANK)
    return tuple(out)

  def canonical_perm(self, side: str) -> tuple[int, ...]:
    """Permutation taking a factor from storage order to ``(*stacked, *fan_in, r)`` (A) or
    ``(*stacked, r, *fan_out)`` (B)."""
    axes = self.factor_axes(side)
    kept = self.in_axes if side == "a" else self.out_axes
    order = (*self.stacked_axes, *kept, RANK) if side == "a" else (*self.stacked_axes, RANK, *kept)
    return tuple(axes.index(t) for t in order)

  def kernel_perm(self) -> tuple[int, ...]:
    """Permutation taking the kernel to ``(*stacked, *fan_in, *fan_out)``."""
    return (*self.stacked_axes, *self.in_axes, *self.out_axes)

  def __repr__(self) -> str:
    grouped = f", groups={self.groups}, group_axis={self.group_axis}" if self.groups > 1 else ""
    return f"Layout(roles={self.roles!r}, ops={self.ops!r}{grouped})"

  def __str__(self) -> str:
    return (
      self.roles if self.groups == 1 else f"{self.roles} (groups={self.groups} on axis {self.group_axis})"
    )


def from_pattern(value: str | tuple[int, int] | None, shape: Sequence[int], where: str) -> Layout | None:
  """A `layout_pattern` value (a roles string or ``(stacked, fan_in)``) as the layout of a kernel.

  Raises:
    ValueError: if the value does not fit a kernel of ``shape`` (naming ``where``).
  """
  if value is None:
    return None
  try:
    if isinstance(value, str):
      if len(value) != len(shape):
        raise ValueError(f"it has {len(value)} roles for a {len(shape)}-D kernel")
      return Layout(value)
    return Layout.of_counts(len(shape), *value)
  except ValueError as e:
    raise ValueError(
      f"`layout_pattern` gives {value!r} for kernel {where!r} of shape {tuple(shape)}, which does not "
      f"fit: {e}."
    ) from None


def factor_shapes(
  layout: Layout, kernel_shape: Sequence[int], rank: int, layers: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(a_shape, b_shape)`` for a kernel; ``layers`` shortens the first stacked axis.

  A grouped convolution's layout (``groups`` G > 1, as PEFT adapts it) has ``lora_A`` over all ``G *
  kernel_shape[group_axis]`` input features and ``lora_B`` with ``rank / G`` rank features (its
  grouped 1x1 map).

  Raises:
    ValueError: if a grouped layout's ``rank`` is not a multiple of its groups.
  """
  if rank % layout.groups:
    raise ValueError(
      f"Rank {rank} is not a multiple of the {layout.groups} groups of a grouped convolution (layout "
      f"{layout}): its lora_B is a grouped 1x1 map of rank / groups features per group, as PEFT's."
    )
  sizes = list(kernel_shape)
  if layers is not None:
    sizes[layout.stacked_axes[0]] = layers
  a_sizes = list(sizes)
  if layout.group_axis is not None:
    a_sizes[layout.group_axis] *= layout.groups
  shape = lambda side, n, r: tuple(r if t == RANK else n[t] for t in layout.factor_axes(side))  # noqa: E731
  return shape("a", a_sizes, rank), shape("b", sizes, rank // layout.groups)


def all_layouts(ndim: int, stacked: int, fan_in: int) -> list[Layout]:
  """Every layout of an ``ndim``-D kernel with these role counts, in a fixed order."""
  fan_out = ndim - stacked - fan_in
  if stacked < 0 or fan_in < 1 or fan_out < 1:
    return []
  base = STACKED * stacked + IN * fan_in + OUT * fan_out
  return [Layout("".join(p)) for p in sorted(set(itertools.permutations(base)))]


@dataclasses.dataclass(frozen=True)
class Reading:
  """A layout that fits a pair of factors, with the rank and layer count it implies."""

  layout: Layout
  rank: int
  layers: int | None  # the first stacked axis's length in the factors, when shorter than the kernel's


def readings(
  kernel_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int], layer_axis_ok: bool
) -> list[Reading]:
  """Every layout under which ``lora_A``/``lora_B`` of these shapes factor the kernel.

  Args:
    kernel_shape: the kernel's shape.
    a_shape: ``lora_A``'s shape.
    b_shape: ``lora_B``'s shape.
    layer_axis_ok: whether the first stacked axis may be shorter than the
      kernel's (``layers_to_transform`` on a kernel stacked over layers).
  """
  n = len(kernel_shape)
  fan_out, fan_in = n + 1 - len(a_shape), n + 1 - len(b_shape)
  out = []
  for layout in all_layouts(n, n - fan_in - fan_out, fan_in):
    rank = a_shape[layout.factor_axes("a").index(RANK)]
    layers = None
    if layout.stacked_axes and layer_axis_ok:
      first = a_shape[layout.factor_axes("a").index(layout.stacked_axes[0])]
      layers = first if 0 < first < kernel_shape[layout.stacked_axes[0]] else None
    if rank >= 1 and factor_shapes(layout, kernel_shape, rank, layers) == (tuple(a_shape), tuple(b_shape)):
      out.append(Reading(layout, rank, layers))
  return out or _grouped_readings(kernel_shape, a_shape, b_shape)


def _grouped_readings(
  kernel_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]
) -> list[Reading]:
  """The grouped-convolution layouts (`factor_shapes`) that fit factors no plain layout fits: ``lora_A``
  wider than the kernel by a factor G on one fan-in axis, ``lora_B`` of rank / G."""
  n = len(kernel_shape)
  out = []
  fan_out, fan_in = n + 1 - len(a_shape), n + 1 - len(b_shape)
  for layout in all_layouts(n, n - fan_in - fan_out, fan_in):
    axes = layout.factor_axes("a")
    rank = a_shape[axes.index(RANK)]
    for ax in layout.in_axes:
      groups, rest = divmod(a_shape[axes.index(ax)], kernel_shape[ax])
      if groups < 2 or rest or rank % groups:
        continue
      grouped = Layout(layout.roles, groups=groups, group_axis=ax)
      if factor_shapes(grouped, kernel_shape, rank) == (tuple(a_shape), tuple(b_shape)):
        out.append(Reading(grouped, rank, None))
  return out


def kernels_for(
  a_shape: Sequence[int], b_shape: Sequence[int], rank: int
) -> list[tuple[Layout, tuple[int, ...]]]:
  """Every ``(layout, kernel_shape)`` that factors of these shapes and this rank can belong to."""
  out = []
  for stacked in range(min(len(a_shape), len(b_shape))):
    ndim = len(a_shape) + len(b_shape) - 2 - stacked
    for layout in all_layouts(ndim, stacked, ndim + 1 - len(b_shape)):
      sizes: dict[int | str, int] = {}
      ok = True
      for side, shape in (("a", a_shape), ("b", b_shape)):
        for t, size in zip(layout.factor_axes(side), shape):
          ok = ok and sizes.setdefault(t, size) == size
      if ok and sizes[RANK] == rank:
        out.append((layout, tuple(sizes[i] for i in range(ndim))))
  return out


# -- reading a layout from how a model uses a kernel -----------------------------------------------

SPLIT = "split@"  # an output axis the model takes apart entry by entry: "split@<index>"


def from_uses(uses: Iterable[tuple[str, Mapping[int, str]]], shape: Sequence[int], where: str) -> Layout:
  """Combines the axis roles that each use of a kernel implies into one layout.

  ``uses`` are ``(op, {kernel_axis: role})`` with roles ``s``/``i``/``o``,
  ``split@<k>`` (the model took entry ``k`` of the output axis that this
  kernel axis produces) or ``grouped@<G>`` (a fan-in axis: the input features
  of a convolution with ``feature_group_count=G``, which gives the layout
  ``groups=G`` on that axis). A fan-out axis whose every entry is taken apart
  after the product (gemma's fused ``kv_einsum``, ``gating_einsum``) is
  stacked: each part is an adapter of its own, as PEFT's separate modules.

  Raises:
    ValueError: if uses disagree on an axis, or the roles leave an axis
      unexplained or no fan-in or fan-out axis (naming ``where`` and the
      ``layout_pattern`` fix).
  """
  uses = list(uses)
  ops = frozenset(op for op, _ in uses)
  # A table that is both looked up and multiplied (a tied embedding and output head) is an
  # embedding, as PEFT adapts it: its lookup gives the layout, the head reuses the same update.
  read = [(op, u) for op, u in uses if op != "dot_general"] if "gather" in ops else uses
  roles: dict[int, str] = {}
  parts: dict[int, set[int]] = {}
  for _, use in read:
    for ax, role in use.items():
      if role.startswith(SPLIT):
        parts.setdefault(ax, set()).add(int(role[len(SPLIT) :]))
      elif roles.setdefault(ax, role) != role:
        raise ValueError(
          f"Kernel {where!r} (shape {tuple(shape)}) is used with conflicting axis roles "
          f"{[dict(u) for _, u in uses]}; set `layout_pattern` to choose its layout "
          f"(a string of 's'/'i'/'o' per axis, e.g. {layout_hint(where, len(shape))})."
        )
  for ax, seen in parts.items():
    if roles.get(ax) == OUT and seen == set(range(shape[ax])):
      roles[ax] = STACKED
  grouped = {ax: int(role[len(GROUPED) :]) for ax, role in roles.items() if role.startswith(GROUPED)}
  roles.update({ax: IN for ax in grouped})
  group_axis, groups = next(iter(grouped.items()), (None, 1))
  letters = "".join(roles.get(i, "?") for i in range(len(shape)))
  try:
    return Layout(letters, ops=ops, groups=groups, group_axis=group_axis)
  except ValueError:
    raise ValueError(
      f"Kernel {where!r} (shape {tuple(shape)}) is used with axis roles {letters!r} "
      "('s' stacked, 'i' fan-in, 'o' fan-out, '?' not seen), which give it no LoRA layout; "
      f"exclude it, or set `layout_pattern` (e.g. {layout_hint(where, len(shape))})."
    ) from None


# transformers' Flax GPT-2 stores its `Conv1D` kernels (out, in) and computes x @ W.T, while other
# code with the same module names stores (in, out): without the model, their layout is a guess.
_GPT2_CONV1D = re.compile(r"(?:^|/)h/\d+/(?:attn/(?:c_attn|c_proj|q_attn)|mlp/(?:c_fc|c_proj))$")


def computed_kernel(module: str, shape: Sequence[int], where: str) -> ValueError:
  """The error for a targeted N-D leaf the model (``apply_fn``) uses in no ``dot_general``, convolution or
  ``gather``: the model computes its kernel from it (a weight-normed convolution's ``weight_v`` and
  ``weight_g``), so no kernel of the tree is the one the model applies, or it does not use it."""
  return ValueError(
    f"Kernel {where!r} (shape {tuple(shape)}) is targeted, but the model (`apply_fn`) uses it in no "
    "dot_general, convolution or embedding gather: it computes the kernel it applies from this leaf (a "
    "weight-normed convolution computes its kernel from `weight_v` and `weight_g`, as Wav2Vec2's "
    "positional convolution does), or does not use it. LoRA adds its update to a kernel the model applies "
    "to its input; that kernel is computed, not a leaf of the tree, so it cannot be adapted. Leave it out: "
    f"`exclude_modules=({module!r},)`, or narrower `target_modules`."
  )


def default_layout(module: str, shape: Sequence[int], where: str) -> Layout:
  """The layout of a kernel the model was not read for: ``"io"`` for 2-D kernels.

  Raises:
    ValueError: for kernels of three or more dimensions, and for GPT-2's
      ``Conv1D`` kernels (stored either way round), naming the fixes.
  """
  if len(shape) != 2:
    raise ValueError(
      f"Kernel {where!r} has shape {tuple(shape)}: its stacked, fan-in and fan-out axes cannot be told "
      "from the shape alone. Pass `apply_fn=model.apply, example_args=(inputs,)` so jlora reads how the "
      f"model uses the kernel, or set `layout_pattern` (e.g. {layout_hint(where, len(shape))})."
    )
  if _GPT2_CONV1D.search(module):
    name = where.rsplit("/", 2)[-2]
    raise ValueError(
      f"Kernel {where!r} of shape {tuple(shape)} is a GPT-2 `Conv1D` weight, which transformers' Flax GPT-2 "
      "stores (out, in) and uses as x @ W.T, and other code stores (in, out): its layout cannot be told "
      "from the shape. Pass `apply_fn=model.apply, example_args=(inputs,)` so jlora reads how the model "
      f"uses it, or set `layout_pattern={{{name!r}: 'oi'}}` for transformers' FlaxGPT2 ('io' for (in, out))."
    )
  return Layout(IN + OUT)


def layout_hint(where: str, ndim: int) -> str:
  """A ``layout_pattern`` template for a kernel, for error messages (the roles are the user's to say)."""
  name = where.rsplit("/", 2)[-2] if where.count("/") >= 1 else where
  return "{" + repr(name) + ": '" + "?" * ndim + "'}, each '?' one of 's', 'i', 'o'"
