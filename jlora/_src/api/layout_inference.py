"""Layout inference: each kernel's `Layout` read from how the model uses it (`infer_layouts`).

The rules that turn uses into a layout are `jlora._src.core.layouts` (`layouts.from_uses`); reading the
uses needs the interpreter (a `values.Probe` for each leaf, one abstract pass over the model's trace),
so it lives here, in the api stage, above the interpreter: `jlora.init`, `jlora.wrap` (layouts its
factor shapes leave open) and `jlora.import_peft`/`export_peft` call it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax

from jlora._src.api.trace import Traced, trace
from jlora._src.core import layouts, paths, targets
from jlora._src.core.qarray import is_quantized
from jlora._src.interpret import evaluator as interpreter
from jlora._src.interpret import values


def read_uses(
  apply_fn: Callable[..., Any],
  tree: Any,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
  only: Collection[paths.Path] | None = None,
) -> dict[paths.Path, list[tuple[str, dict[int, str]]]]:
  """How the model uses each adaptable leaf: ``{path: [(primitive, {kernel_axis: role})]}``.

  One abstract trace (no FLOPs; ``jax.ShapeDtypeStruct`` inputs work) with a
  `values.Probe` in place of each leaf; leaves the model never uses in a
  ``dot_general``, convolution, ``gather``, ``scan`` or slice have no entry.
  """
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x,
    (tree, args, kwargs),
    is_leaf=is_quantized,
  )
  return probe_uses(trace(apply_fn, abstract[0], abstract[1], abstract[2], None), tree, only)


def probe_uses(
  traced: Traced, tree: Any, only: Collection[paths.Path] | None = None
) -> dict[paths.Path, list[tuple[str, dict[int, str]]]]:
  """`read_uses` on a model's trace: one abstract pass with a `values.Probe` for each leaf."""
  wanted = None if only is None else set(only)
  probes = {c.path: c for c in targets.candidates(tree) if wanted is None or c.path in wanted}
  roles: dict[str, list[tuple[str, dict[int, str]]]] = {}

  def run(*dyn):
    vals = list(dyn)
    for path, cand in probes.items():
      slot = traced.tree_slots[path]
      vals[slot] = values.Probe(vals[slot], tuple((i,) for i in range(len(cand.shape))), paths.to_str(path))
    ctx = interpreter.Context("factorized", False, 0.0, None, set(), roles=roles)
    outs = interpreter.eval_jaxpr(traced.closed.jaxpr, traced.closed.consts, vals, ctx)
    return interpreter.plain_outputs(outs, ctx, "")

  jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(x.shape, jax.numpy.dtype(x.dtype)) for x in traced.dynamic])
  return {path: roles[paths.to_str(path)] for path in probes if roles.get(paths.to_str(path))}


def linear_weights(uses: Mapping[paths.Path, list[tuple[str, dict[int, str]]]]) -> set[paths.Path]:
  """The leaves used as linear-layer weights: in a ``dot_general``, never in a convolution or lookup."""
  ops = {path: {op for op, _ in u} for path, u in uses.items()}
  return {p for p, o in ops.items() if "dot_general" in o and not o & {"conv_general_dilated", "gather"}}


def infer_layouts(
  apply_fn: Callable[..., Any],
  tree: Any,
  *args: Any,
  only: Sequence[paths.Path] | None = None,
  **kwargs: Any,
) -> dict[paths.Path, layouts.Layout]:
  """Reads each kernel's `Layout` from how the model uses it.

  Traces ``apply_fn(tree, *args, **kwargs)`` abstractly (no FLOPs are spent;
  ``jax.ShapeDtypeStruct`` inputs work) and follows every adaptable leaf to
  the ops that consume it, in any storage order: axes a ``dot_general``
  contracts, a convolution's input-channel and spatial axes, or the axes an
  embedding ``gather`` indexes, are fan-in (``i``); the others are fan-out
  (``o``); an axis a ``scan`` (``nn.scan``) iterates over, a dot batches
  over, or the model indexes one entry at a time, is stacked (``s``), and so
  is a fan-out axis whose every entry the model takes apart after the
  product (gemma's fused ``kv_einsum``: one adapter for k, one for v).

  Args:
    apply_fn: the model's apply function; its first argument is the tree.
    tree: the base tree.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    only: restrict to these leaf paths.
    **kwargs: example keyword inputs.

  Returns:
    ``{path: Layout}`` for the leaves the model uses.

  Raises:
    ValueError: if a kernel is used with contradicting roles, or roles that
      give it no layout (naming the path and how to set ``layout_pattern``).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"c_attn": {"kernel": jnp.zeros((12, 4))}}    # stored (out, in), as GPT-2
    >>> fn = lambda p, x: x @ p["c_attn"]["kernel"].T
    >>> jlora.infer_layouts(fn, params, jax.ShapeDtypeStruct((2, 4), jnp.float32))
    {('c_attn', 'kernel'): Layout(roles='oi', ops=frozenset({'dot_general'}))}
  """
  return layouts_from_uses(read_uses(apply_fn, tree, args, kwargs, only), tree)


def read_layouts(
  apply_fn: Callable[..., Any], tree: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, str]]:
  """`infer_layouts` of every kernel without raising: the layouts, and for each kernel whose use gives it
  none (contradicting roles; an N-D leaf the model uses in no product, such as
  a weight-normed convolution's ``weight_v``: `layouts.computed_kernel`), the error that says why."""
  found, refused = layouts_and_refusals(read_uses(apply_fn, tree, args, kwargs), tree)
  for c in targets.candidates(tree):
    if c.path not in found and c.path not in refused and len(c.shape) != 2:
      refused[c.path] = layouts.computed_kernel(c.module, c.shape, paths.to_str(c.path))
  return found, {path: str(e) for path, e in refused.items()}


def layouts_and_refusals(
  uses: Mapping[paths.Path, Any], tree: Any
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, ValueError]]:
  """The layout each use in ``uses`` gives its leaf (`layouts.from_uses`), and the error for each leaf
  whose uses give none."""
  cands = {c.path: c for c in targets.candidates(tree)}
  found, refused = {}, {}
  for path, u in uses.items():
    try:
      found[path] = layouts.from_uses(u, cands[path].shape, paths.to_str(path))
    except ValueError as e:
      refused[path] = e
  return found, refused


def layouts_from_uses(uses: Mapping[paths.Path, Any], tree: Any) -> dict[paths.Path, layouts.Layout]:
  """`layouts_and_refusals`, raising the first refusal."""
  found, refused = layouts_and_refusals(uses, tree)
  if refused:
    raise next(iter(refused.values()))
  return found
