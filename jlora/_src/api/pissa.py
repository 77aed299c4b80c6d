"""PiSSA and OLoRA: adapters initialised from the kernel, and the residual base they need.

PEFT's ``init_lora_weights="pissa"`` takes the top-``r`` singular triplets of a
weight ``W`` (PyTorch's ``(out, in)``; ``W = V S Uh``): ``lora_A = sqrt(S_r/s) Uh_r``
``(r, in)``, ``lora_B = V_r sqrt(S_r/s)`` ``(out, r)`` with ``s`` the LoRA scale,
and the base becomes ``W - s B A``; ``"pissa_niter_<n>"`` does the same with
randomized SVD (Halko et al., ``torch.svd_lowrank``: ``n`` subspace iterations);
``"olora"`` takes the QR factors, ``lora_B = Q[:, :r]``, ``lora_A = R[:r]``, base
``W - s B A``. The model at init is the base model; training then moves the
principal part.

jlora never changes the base, so `init_with_residual` returns the adapter and a
new base tree, the *residual*, in which each adapted kernel is ``W - s B A``.
The two belong together: the adapter on the original base counts the principal
part twice. `jlora.init` refuses these inits and names this function.

Shapes: a jlora kernel in canonical order, ``(*stacked, *fan_in, *fan_out)``,
reshaped to ``(*stacked, in, out)``, is PyTorch's ``W`` transposed, one matrix
per stacked entry (each layer of a scanned kernel gets its own decomposition);
A ``(*stacked, *fan_in, r)`` and B ``(*stacked, r, *fan_out)`` in canonical order
(`spec.canonical`) are PEFT's ``lora_A.weight.T`` and ``lora_B.weight.T``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src.adapters import quantize
from jlora._src.adapters.bind import bound_adapters
from jlora._src.adapters.create import add_saved_copies
from jlora._src.adapters.spec import AdapterSpec, from_canonical, plan
from jlora._src.api.initialize import init, read_model
from jlora._src.core import layouts as layouts_lib
from jlora._src.core import paths, targets
from jlora._src.core.config import LoraConfig, check_config, pissa_niter, residual_init
from jlora._src.core.qarray import is_quantized

_HIGHEST = jax.lax.Precision.HIGHEST


class LoraWithResidual(NamedTuple):
  """What `init_with_residual` returns: use ``residual`` as the base wherever ``lora`` goes.

  Attributes:
    lora: the adapter tree.
    residual: the base tree with each adapted kernel replaced by
      ``W - scale * A @ B`` (the other leaves are the base's own arrays).
  """

  lora: dict
  residual: Any


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=_HIGHEST)


def _svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, ...]:
  """``torch.svd_lowrank(w, q, niter)`` for one matrix (Halko et al. 2009, Algorithm 5.1), with an
  explicit key: ``(U (m, q), S (q,), Vh (q, n))``."""
  tall = w.shape[0] >= w.shape[1]
  a = w if tall else w.T
  qr = lambda x: jnp.linalg.qr(x)[0]  # noqa: E731
  basis = qr(_mm(a, jax.random.normal(key, (a.shape[1], q), a.dtype)))
  for _ in range(niter):
    basis = qr(_mm(a, qr(_mm(a.T, basis))))
  u, s, vh = jnp.linalg.svd(_mm(basis.T, a), full_matrices=False)
  u = _mm(basis, u)
  return (u, s, vh) if tall else (vh.T, s, u.T)


def _factor(w: jax.Array, rank: int, scale: float, init: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``(lora_A (r, in), lora_B (out, r))`` of one ``(out, in)`` weight, in its dtype."""
  if init == "olora":
    q, r = jnp.linalg.qr(w)
    return r[:rank], q[:, :rank]
  niter = pissa_niter(init)
  if niter is None:
    v, s, uh = jnp.linalg.svd(w, full_matrices=False)
  else:
    v, s, uh = _svd_lowrank(w, rank, niter, key)
  root = jnp.sqrt(s[:rank] / scale)
  return root[:, None] * uh[:rank], v[:, :rank] * root[None, :]


def _check_spec(spec: AdapterSpec, config: LoraConfig) -> None:
  init = config.init_lora_weights
  if spec.path[-1] in targets.EMBEDDING_LEAVES or {"gather", "conv_general_dilated"} & spec.layout.ops:
    embedding = spec.path[-1] in targets.EMBEDDING_LEAVES or "gather" in spec.layout.ops
    what = "an embedding" if embedding else "a conv"
    raise ValueError(
      f"`init_lora_weights`={init!r} on {spec.where!r}, {what} kernel: PEFT computes PiSSA and OLoRA for "
      "linear layers only. Leave it out of `target_modules` (or add it to `exclude_modules`)."
    )
  n_in, n_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
  if spec.rank > min(n_in, n_out):
    raise ValueError(
      f"`init_lora_weights`={init!r} on {spec.where!r} needs rank <= min(in, out) = {min(n_in, n_out)} "
      f"(the kernel is {n_in} x {n_out} as a linear layer); the config gives rank {spec.rank}. Lower `r` "
      "or set `rank_pattern` for this module."
    )


def principal_pair(spec: AdapterSpec, kernel: Any, config: LoraConfig, key: jax.Array, dtype: Any):
  """``(lora_A, lora_B, residual kernel)`` of one adapter, the factors in the kernel's axis order.

  The kernel (dequantized if quantized) is decomposed in float32 (float64 for a
  float64 kernel, under x64), one matrix per selected stacked entry; the
  residual keeps the kernel's dtype (a quantized kernel is quantized again in
  its format; unselected layers are unchanged).
  """
  _check_spec(spec, config)
  full = kernel.dequantize(jnp.float32) if is_quantized(kernel) else jnp.asarray(kernel)
  full = full.astype(jnp.result_type(jnp.float32, full.dtype))
  canon = jnp.transpose(full, spec.layout.kernel_perm())
  n_stacked = len(spec.layout.stacked_axes)
  if spec.layers is not None:
    canon_sel = canon[jnp.asarray(spec.layers)]
  else:
    canon_sel = canon
  stacked = canon_sel.shape[:n_stacked]
  n_in, n_out = math.prod(spec.in_shape), math.prod(spec.out_shape)
  k = canon_sel.reshape((-1, n_in, n_out))
  keys = jax.random.split(key, k.shape[0])
  factor = lambda m, kk: _factor(m.T, spec.rank, spec.scale, config.init_lora_weights, kk)  # noqa: E731
  a_pt, b_pt = jax.vmap(factor)(k, keys)  # (S, r, in), (S, out, r)
  a_c = jnp.swapaxes(a_pt, -1, -2)  # (S, in, r)
  b_c = jnp.swapaxes(b_pt, -1, -2)  # (S, r, out)
  res = (k - spec.scale * _mm(a_c, b_c)).reshape(canon_sel.shape)
  if spec.layers is not None:
    res = canon.at[jnp.asarray(spec.layers)].set(res)
  res = jnp.transpose(res, tuple(np.argsort(spec.layout.kernel_perm())))
  if is_quantized(kernel):
    res = quantize.like(kernel, res)
  else:
    res = res.astype(kernel.dtype)
  a = a_c.reshape(stacked + spec.in_shape + (spec.rank,)).astype(dtype)
  b = b_c.reshape(stacked + (spec.rank,) + spec.out_shape).astype(dtype)
  a, b = from_canonical(spec, a, b)
  return a, b, res


def init_with_residual(
  tree: Any,
  config: LoraConfig,
  *,
  key: jax.Array,
  apply_fn: Callable[..., Any] | None = None,
  example_args: Sequence[Any] = (),
  example_kwargs: Mapping[str, Any] | None = None,
) -> LoraWithResidual:
  """Creates a PiSSA or OLoRA adapter and the residual base it must run on.

  For ``config.init_lora_weights`` ``"pissa"``, ``"pissa_niter_<n>"`` or
  ``"olora"`` (see the module doc), each adapted kernel ``W`` is decomposed as
  PEFT does, the adapter takes its principal part and the returned ``residual``
  tree holds ``W - scale * A @ B`` in its place, so that
  ``wrap(apply_fn, config)(residual, lora, x) == apply_fn(tree, x)`` at init.
  Use ``residual`` as the base from now on (training, `merge`, checkpoints);
  the adapter on the original ``tree`` counts the principal part twice. To
  share the trained adapter as plain LoRA on the original base, export it with
  ``jlora.export_peft(..., initial_lora=lora_at_init)``.

  Shapes: as `jlora.init` (Dense ``(in, out)``: A ``(in, r)``, B ``(r, out)``;
  PEFT's ``lora_A.weight`` ``(r, in)`` is A transposed). Each entry of a stacked
  kernel (a layer of a scanned kernel) gets its own decomposition; N-D kernels
  are decomposed as the linear layer of their flattened fan-in and fan-out;
  `rank_pattern` and `layers_to_transform` apply. A quantized kernel
  (`jlora.quantize`) is decomposed dequantized and its residual quantized again
  in its format (as PEFT's QPiSSA). For the other inits the adapter is
  `jlora.init`'s and ``residual`` is ``tree`` itself.

  Args:
    tree: the base tree.
    config: the LoRA config.
    key: a PRNG key (``"pissa_niter_<n>"`` draws its random projections from
      it, one split per adapter and stacked entry).
    apply_fn: as in `jlora.init`, to read kernel layouts from the model.
    example_args: example positional inputs for ``apply_fn``.
    example_kwargs: example keyword inputs for ``apply_fn``.

  Returns:
    ``LoraWithResidual(lora, residual)``; unpack as ``lora, residual = ...``.

  Raises:
    ValueError: as `jlora.init`, and for a rank above ``min(in, out)`` of a
      kernel or an embedding or conv kernel (PEFT decomposes linear layers only).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights="pissa")
    >>> lora, residual = jlora.init_with_residual(params, cfg, key=jax.random.key(1))
    >>> merged = jlora.merge(residual, lora, cfg)["q_proj"]["kernel"]
    >>> bool(jnp.allclose(merged, params["q_proj"]["kernel"], atol=1e-5))
    True
  """

  config = check_config(config)
  if not residual_init(config.init_lora_weights):
    kw = dict(apply_fn=apply_fn, example_args=example_args, example_kwargs=example_kwargs)
    lora = init(tree, config, key=key, **kw)
    return LoraWithResidual(lora, tree)
  layouts, linear = None, None
  if apply_fn is not None:
    layouts, linear = read_model(apply_fn, tree, config, example_args, example_kwargs or {})
  specs = plan(tree, config, layouts, linear)
  leaves = dict(paths.leaves_with_paths(tree))
  out: dict = {}
  residual: dict[paths.Path, Any] = {}
  for spec, k in zip(specs, jax.random.split(key, len(specs))):
    kernel = leaves[spec.path]
    dtype = config.dtype or kernel.dtype
    a, b, residual[spec.path] = principal_pair(spec, kernel, config, k, dtype)
    paths.nested_set(out, spec.path, {paths.LORA_A: a, paths.LORA_B: b})
  add_saved_copies(out, tree, config, specs)
  new_base = jax.tree_util.tree_map_with_path(
    lambda kp, leaf: residual.get(paths.normalize(kp), leaf), tree, is_leaf=is_quantized
  )
  return LoraWithResidual(out, new_base)


def to_plain_lora(
  lora: Any, initial_lora: Any, config: LoraConfig, *, base: Any = None
) -> tuple[dict, LoraConfig]:
  """A trained PiSSA/OLoRA adapter as plain LoRA on the ORIGINAL base (PEFT's weight conversion).

  With ``W = W_res + s B0 A0`` at init and ``W_res + s B A`` after training, the
  update to the original ``W`` is ``s (B A - B0 A0)``: a LoRA adapter of rank
  ``2r`` with ``A = [A; A0]`` and ``B = [B, -B0]`` (concatenated on the rank
  axis), ``r`` and ``lora_alpha`` doubled (``lora_alpha`` times ``sqrt(2)``
  with ``use_rslora``), `rank_pattern`/`alpha_pattern` doubled, and
  ``init_lora_weights=True``: PEFT's ``save_pretrained(...,
  path_initial_model_for_weight_conversion=...)``. Saved copies
  (`modules_to_save`, biases) are the trained ones.

  Shapes: each factor keeps its kernel's axis order; only its rank axis doubles.

  Args:
    lora: the trained adapter tree.
    initial_lora: the adapter tree `init_with_residual` returned (before training).
    config: their config.
    base: the base tree (original or residual: only shapes are read), to read
      layouts the factor shapes alone leave open.

  Returns:
    ``(plain_lora, plain_config)`` for `jlora.wrap`/`merge` on the original base.

  Raises:
    ValueError: if the two trees do not hold the same adapters, or with
      ``use_rslora`` together with `rank_pattern` or `alpha_pattern` (as PEFT).
  """
  config = check_config(config)
  if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
    raise ValueError(
      "Converting to plain LoRA is not supported with `use_rslora=True` together with `rank_pattern` or "
      "`alpha_pattern` (as in PEFT): the doubled rank would change their scales."
    )
  trained, _ = bound_adapters(lora, config, base)
  initial = {item.spec.path: item for item in bound_adapters(initial_lora, config, base)[0]}
  if set(initial) != {item.spec.path for item in trained}:
    raise ValueError(
      "`initial_lora` and `lora` hold adapters at different paths: pass the adapter tree "
      "`jlora.init_with_residual` returned for this `lora`, before training."
    )
  out: dict = {}
  for item in trained:
    first = initial[item.spec.path]
    ax_a = item.spec.layout.factor_axes("a").index(layouts_lib.RANK)
    ax_b = item.spec.layout.factor_axes("b").index(layouts_lib.RANK)
    a = jnp.concatenate([jnp.asarray(item.a), jnp.asarray(first.a, item.a.dtype)], axis=ax_a)
    b = jnp.concatenate([jnp.asarray(item.b), -jnp.asarray(first.b, item.b.dtype)], axis=ax_b)
    paths.nested_set(out, item.spec.path, {paths.LORA_A: a, paths.LORA_B: b})
  for path, node in paths.adapter_items(lora):
    if not paths.is_adapter(node):
      paths.nested_set(out, path, node)
  plain = dataclasses.replace(
    config,
    r=2 * config.r,
    lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
    rank_pattern={k: 2 * v for k, v in config.rank_pattern},
    alpha_pattern={k: 2 * v for k, v in config.alpha_pattern},
    init_lora_weights=True,
  )
  return out, plain
