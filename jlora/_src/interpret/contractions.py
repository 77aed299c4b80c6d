"""Two-operand contractions, and the rank-``r`` products of a LoRA branch.

`contract` is ``einsum`` for two operands as one ``lax.dot_general``.

`factor_product` is `contract` for an activation and a LoRA factor, with a
gradient for the factor that contracts the tokens as one axis. A factor's
gradient sums over the tokens: ``dA = x^T dt`` and ``dB = t^T g``. When the
tokens span two axes (``batch x seq``), autodiff writes this as a ``dot_general``
over two leading axes of both operands. XLA:CPU lowers that dot by first
transposing the token-sized operand (``x`` or ``g``) into a new buffer, and it
fuses that transpose into the operand's elementwise producer, such as an
activation's backward pass. The fused loop then reads its inputs with a stride.
On the benchmark's GPT it took about 20 ms per layer, against 3 ms for the same
transpose in full fine-tuning. With the token axes merged into one (a reshape of
leading axes, which moves nothing), the same dot reads both operands in place.

The forward product is the plain contraction, so nothing changes when the output
is not differentiated. Through a `jax.custom_jvp`, autodiff gets a tangent that
merges the tokens. Forward mode, ``vmap`` and higher derivatives keep working.

The merge is a reshape only where the token axes are whole on each device; where
a later token axis may be split across devices, a merged axis has no sharding
that matches, so the product is `contract` instead (`_merge_is_local`). Merging
sequence-sharded activations under GSPMD all-gathers them over the sequence
axis (the tests force the merge on a 2 x 4 mesh and find the all-gathers), and
under explicit sharding the reshape, or the tangent's type, is an error. The
merge is taken on one device, inside `jax.shard_map` (its values are local),
and under explicit sharding where no token axis but the first is sharded. It is
not taken where a mesh has an auto axis of more than one device, or where there
is no mesh but more than one device: there GSPMD may shard the tokens however it
likes, and nothing in the trace says how. On several devices, explicit sharding
(`jax.sharding.AxisType.Explicit` under `jax.set_mesh`) shows the placement, and
the merge is taken where it is safe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import custom_derivatives
from jax.sharding import AxisType

__all__ = ["contract", "factor_product"]


def contract(x: jax.Array, x_lab: str, y: jax.Array, y_lab: str, out_lab: str, **opts: Any) -> jax.Array:
  """``einsum(f"{x_lab},{y_lab}->{out_lab}", x, y)`` as one ``lax.dot_general`` (and a transpose).

  `jnp.einsum` would trace a nested ``jit`` and plan a contraction path at each of the
  interpreter's thousands of calls; a two-operand contraction needs neither. Labels that
  appear in one operand only and not in the output are summed first.
  """
  x = _sum_unused(x, x_lab, y_lab + out_lab)
  x_lab = "".join(c for c in x_lab if c in y_lab + out_lab)
  y = _sum_unused(y, y_lab, x_lab + out_lab)
  y_lab = "".join(c for c in y_lab if c in x_lab + out_lab)
  shared = [c for c in x_lab if c in y_lab]
  batch = [c for c in shared if c in out_lab]
  contracted = [c for c in shared if c not in out_lab]
  dims = (
    ([x_lab.index(c) for c in contracted], [y_lab.index(c) for c in contracted]),
    ([x_lab.index(c) for c in batch], [y_lab.index(c) for c in batch]),
  )
  res = jax.lax.dot_general(x, y, dims, **opts)
  res_lab = batch + [c for c in x_lab if c not in shared] + [c for c in y_lab if c not in shared]
  return _permute(res, "".join(res_lab), out_lab)


def _sum_unused(x: jax.Array, lab: str, keep: str) -> jax.Array:
  axes = tuple(i for i, c in enumerate(lab) if c not in keep)
  return x.sum(axis=axes) if axes else x


def _permute(x: jax.Array, lab: str, to: str) -> jax.Array:
  perm = [lab.index(c) for c in to]
  return x if perm == sorted(perm) else jax.lax.transpose(x, perm)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """``act`` (``act_lab``) with a factor (``f_lab``) to ``out_lab``; ``n_tokens``: how many
  leading axes of ``act`` and of the output are the tokens the factor's gradient sums over."""

  act_lab: str
  f_lab: str
  out_lab: str
  n_tokens: int
  opts: tuple[tuple[str, Any], ...]


def factor_product(
  act: jax.Array, act_lab: str, f: jax.Array, f_lab: str, out_lab: str, **opts: Any
) -> jax.Array:
  """`contract` of an activation and a LoRA factor, whose factor gradient contracts the tokens
  as one axis (module docstring).

  Args:
    act: the token-carrying operand: the branch input ``x``, or ``t = x @ A``.
    act_lab: ``act``'s labels.
    f: the factor (``A`` or ``B``), in ``act``'s dtype.
    f_lab: ``f``'s labels.
    out_lab: the output's labels.
    **opts: ``dot_general``'s ``precision`` and ``preferred_element_type``.

  Returns:
    ``einsum(f"{act_lab},{f_lab}->{out_lab}", act, f)``. Where there are fewer
    than two token axes (labels of ``act`` the factor lacks), or they do not lead
    both ``act`` and the output in one order, or a label is batched or summed,
    or the tokens may be split across devices (module docstring), this is
    `contract` itself.

  Example:
    >>> import jax.numpy as jnp
    >>> x, a = jnp.ones((2, 4, 3)), jnp.ones((3, 2))
    >>> factor_product(x, "bsd", a, "dr", "bsr").shape
    (2, 4, 2)
  """
  tokens = "".join(c for c in act_lab if c not in f_lab)
  plain = (
    len(tokens) < 2
    or not (act_lab.startswith(tokens) and out_lab.startswith(tokens))
    or any(c in out_lab for c in f_lab if c in act_lab)  # a batched factor axis
    or any(c not in out_lab for c in tokens)  # a summed activation axis
    or any(c not in act_lab + out_lab for c in f_lab)  # a summed factor axis
    or not _merge_is_local(act, len(tokens))
  )
  if plain:
    return contract(act, act_lab, f, f_lab, out_lab, **opts)
  return _factor_product(act, f, _Spec(act_lab, f_lab, out_lab, len(tokens), tuple(opts.items())))


def _merge_is_local(act: jax.Array, n_tokens: int) -> bool:
  """Whether merging ``act``'s ``n_tokens`` leading axes into one keeps each device's part whole."""
  sharding = jax.typeof(act).sharding
  mesh = sharding.mesh
  if mesh.empty:
    return jax.device_count() == 1
  if any(t == AxisType.Auto and n > 1 for t, n in zip(mesh.axis_types, mesh.axis_sizes)):
    return False  # GSPMD decides these axes' shardings after tracing
  return all(p is None for p in tuple(sharding.spec)[1:n_tokens])


def _plain(act: jax.Array, f: jax.Array, spec: _Spec) -> jax.Array:
  return contract(act, spec.act_lab, f, spec.f_lab, spec.out_lab, **dict(spec.opts))


_factor_product = jax.custom_jvp(_plain, nondiff_argnums=(2,))


def _factor_product_jvp(spec: _Spec, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
  act, f = primals
  d_act, d_f = tangents
  opts = dict(spec.opts)
  out = _plain(act, f, spec)
  terms = []
  if not isinstance(d_act, custom_derivatives.SymbolicZero):
    terms.append(_plain(d_act, f, spec))
  if not isinstance(d_f, custom_derivatives.SymbolicZero):
    # ``act`` with its token axes merged into one (``z``): the transpose of this product, the
    # factor's gradient, is then a dot over one leading axis of ``act`` and the cotangent.
    n = spec.n_tokens
    z = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in spec.act_lab + spec.f_lab + spec.out_lab)
    merged = contract(
      act.reshape(-1, *act.shape[n:]), z + spec.act_lab[n:], d_f, spec.f_lab, z + spec.out_lab[n:], **opts
    )
    terms.append(merged.reshape(out.shape))
  return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


_factor_product.defjvp(_factor_product_jvp, symbolic_zeros=True)
