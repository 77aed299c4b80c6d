"""`wrap` and `infer_layouts`: running a model with adapters, and reading its kernel layouts."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from jlora._src.adapters import adapters, dora
from jlora._src.adapters.bank import BankConfig
from jlora._src.adapters.merge import merge
from jlora._src.core import agreement, jax_compat, layouts, paths, targets
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config
from jlora._src.core.qarray import QuantizedArray, is_quantized
from jlora._src.interpret import evaluator as interpreter
from jlora._src.interpret import values
from jlora._src.interpret.rules import routing as interpreter_routing

Strategy = Literal["auto", "factorized", "merged"]
Routing = Literal["gather", "ragged"]
_STRATEGIES = ("auto", "factorized", "merged")
_CACHE_SIZE = 32


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, QuantizedArray))


def _traceable(x: Any) -> Any:
  """What the model is traced with: a quantized weight stands for its dequantized array."""
  return jax.ShapeDtypeStruct(x.shape, jax.numpy.dtype(x.dtype)) if is_quantized(x) else x


def _aval(x: Any) -> Any:
  return _traceable(x) if is_quantized(x) else jax.typeof(x)


class _Traced(NamedTuple):
  closed: Any  # ClosedJaxpr of the model over its array inputs
  out_tree: Any
  tree_slots: dict[paths.Path, int]  # base leaf path -> position among the jaxpr's inputs
  dynamic: list[Any]  # the array inputs, in order
  key: Any = None  # the trace cache's key (None: not cacheable)


def _trace(
  fn: Callable, tree: Any, args: Sequence[Any], kwargs: Mapping[str, Any], cache: dict | None
) -> _Traced:
  """Traces ``fn(tree, *args, **kwargs)`` to a jaxpr over its array leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    (tree, tuple(args), dict(kwargs)), is_leaf=is_quantized
  )
  leaves = [leaf for _, leaf in flat]
  dyn_idx = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
  dynamic = [leaves[i] for i in dyn_idx]
  tree_slots = {}
  for slot, i in enumerate(dyn_idx):
    key_path = flat[i][0]
    if isinstance(key_path[0], jax.tree_util.SequenceKey) and key_path[0].idx == 0:
      tree_slots[paths.normalize(key_path[1:])] = slot

  cache_key = None
  if cache is not None and not any(isinstance(x, jax.core.Tracer) for x in dynamic):
    dynamic_set = set(dyn_idx)
    static = tuple((i, leaf) for i, leaf in enumerate(leaves) if i not in dynamic_set)
    try:
      cache_key = (treedef, static, tuple(_aval(x) for x in dynamic))
      hash(cache_key)
    except TypeError:
      cache_key = None
    if cache_key is not None and cache_key in cache:
      closed, out_tree = cache[cache_key]
      return _Traced(closed, out_tree, tree_slots, dynamic, cache_key)

  def flat_fn(*dyn):
    full = list(leaves)
    for i, v in zip(dyn_idx, dyn):
      full[i] = v
    t, a, k = jax.tree_util.tree_unflatten(treedef, full)
    return fn(t, *a, **k)

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*map(_traceable, dynamic))
  out_tree = jax.tree_util.tree_structure(out_shape)
  if cache_key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
    if len(cache) >= _CACHE_SIZE:
      cache.pop(next(iter(cache)))
    cache[cache_key] = (closed, out_tree)
  return _Traced(closed, out_tree, tree_slots, dynamic, cache_key)


def _lora_value(item: adapters.Bound, routed: tuple[float, ...] | None = None) -> values.LoraValue:
  """The interpreter's view of an adapted kernel; for a bank (``routed``: the adapters' scales),
  ``item``'s factors hold all N adapters on a leading axis, laid side by side on the rank axis."""
  spec = item.spec
  lay = spec.layout
  stacked = len(lay.stacked_axes)

  def canonical(a: Any, b: Any) -> tuple[Any, Any]:
    a, b = adapters.expand_layers(spec, *adapters.canonical(spec, a, b))
    return a, jax.numpy.moveaxis(b, stacked, -1)

  if routed is None:
    a, b = canonical(item.a, item.b)
  else:
    fold = lambda f: jax.numpy.moveaxis(f, 0, -2).reshape(*f.shape[1:-1], -1)  # noqa: E731
    a, b = map(fold, jax.vmap(canonical)(item.a, item.b))
  value = values.LoraValue(
    w=item.kernel,
    a=a,
    b=b,
    a_axes=lay.stacked_axes + lay.in_axes,
    b_axes=lay.stacked_axes + lay.out_axes,
    scale=spec.scale,
    site=spec.where,
    routed=routed,
  )
  if item.m is None:
    return value
  if routed is not None:
    raise ValueError(
      f"The adapter at {spec.where!r} is a DoRA adapter (`use_dora=True`): a bank of adapters "
      "(`jlora.stack`) routes plain LoRA adapters only; stack adapters made without `use_dora`, or "
      "apply this one alone."
    )
  return dataclasses.replace(value, g=dora.scale(value, item.m, spec.layers))


def _bind_bank(tree: Any, lora: Any, bank: BankConfig, hint: Callable[[], Any]) -> list[adapters.Bound]:
  """Binds a bank's stacked tree: adapter 0's part is checked against the base (as one adapter of
  ``bank.lora_config``), and each bound item then carries all N adapters' factors."""
  n = bank.num_adapters
  leaves = paths.leaves_with_paths(lora)
  for path, leaf in leaves:
    if getattr(leaf, "ndim", 0) < 1 or leaf.shape[0] != n:
      raise ValueError(
        f"The bank's adapter tree has {tuple(getattr(leaf, 'shape', ()))} at {paths.to_str(path)!r}, but its "
        f"config stacks {n} adapters: every leaf needs a leading adapter axis of size {n}. Pass `bank.lora` "
        "with its own `bank.config`."
      )
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), lora)  # shapes suffice
  bound, _ = adapters.bind(tree, one, bank.lora_config, hint)
  full = dict(leaves)
  return [
    dataclasses.replace(
      item, a=full[(*item.spec.path, paths.LORA_A)], b=full[(*item.spec.path, paths.LORA_B)]
    )
    for item in bound
  ]


def _linear_reader(traced: _Traced, tree: Any, cache: dict) -> Callable[[], set[paths.Path]]:
  """For "all-linear": the weights this call uses as linear layers, read from its trace (once per trace)."""

  def read() -> set[paths.Path]:
    if traced.key is None:
      return linear_weights(_probe_uses(traced, tree))
    if traced.key not in cache:
      if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
      cache[traced.key] = linear_weights(_probe_uses(traced, tree))
    return cache[traced.key]

  return read


def _inputs(
  traced: _Traced, bound: list[adapters.Bound], saved: Mapping[paths.Path, Any], bank: BankConfig | None
) -> list[Any]:
  """The interpreter's inputs: adapted kernels as `LoraValue`s (a bank's routed), trained copies in
  their leaves' places, quantized weights as `QuantView`s, everything else as traced."""
  vals = [values.QuantView(x) if is_quantized(x) else x for x in traced.dynamic]
  for path, leaf in saved.items():
    vals[traced.tree_slots[path]] = leaf
  for item in bound:
    routed = None if bank is None else bank.entry(item.spec.path).scales
    vals[traced.tree_slots[item.spec.path]] = _lora_value(item, routed)
  return vals


def _make_apply(
  apply_fn: Callable[..., Any],
  config: LoraConfig | BankConfig,
  strategy: Strategy,
  routing: Routing,
  *,
  fuse_siblings: bool,
  dora_recompute: bool,
) -> Callable[..., Any]:
  """The wrapped apply of `wrap`, with its trace and all-linear caches."""
  warned: set[str] = set()
  cache: dict = {}
  linear_cache: dict = {}
  bank = config if isinstance(config, BankConfig) else None
  rates = tuple(c.lora_dropout for c in bank.configs) if bank else (config.lora_dropout,)

  @functools.wraps(apply_fn)
  def apply(
    tree: Any,
    lora: Any,
    *args: Any,
    lora_dropout_key: jax.Array | None = None,
    adapter_ids: jax.Array | None = None,
    **kwargs: Any,
  ) -> Any:
    agreement.check_call_order(tree, lora, args)
    route = None
    if bank is not None:
      route = interpreter_routing.routing(bank.num_adapters, adapter_ids, routing, rates)
    elif adapter_ids is not None:
      raise ValueError(
        "`adapter_ids` routes examples to the adapters of a bank, but this apply wraps one adapter's "
        "LoraConfig: stack the adapters with `bank = jlora.stack(...)` and wrap `bank.config`."
      )
    _check_dropout_key(lora_dropout_key)
    dropout = lora_dropout_key is not None and max(rates) > 0.0
    if strategy == "merged" and dropout:
      raise ValueError(
        "LoRA dropout needs the factorized path: use strategy='auto' or 'factorized' "
        "for training with `lora_dropout_key`."
      )
    # One trace of the model serves the layout and linear-weight reads and the interpretation (the
    # trained `modules_to_save` copies have their base leaves' shapes: they only change the values).
    traced = _trace(apply_fn, tree, args, kwargs, cache)
    hint = lambda: _layouts_from_uses(_probe_uses(traced, tree), tree)  # noqa: E731
    if bank is not None:
      bound, saved = _bind_bank(tree, lora, bank, hint), {}
    else:
      linear = _linear_reader(traced, tree, linear_cache) if config.target_modules == ALL_LINEAR else None
      bound, saved = adapters.bind(tree, lora, config, hint, linear=linear)
    if strategy == "merged":
      return apply_fn(merge(tree, lora, config), *args, **kwargs)
    ctx = interpreter.Context(
      strategy=strategy,
      differentiated=jax_compat.differentiated(lora),
      batched=jax_compat.batched(lora),
      dropout_rate=max(rates),
      key=lora_dropout_key if dropout else None,
      warned=warned,
      fuse_siblings=fuse_siblings and route is None,  # a bank routes each branch itself
      routing=route,
      dora_recompute=dora_recompute,
    )
    outs = interpreter.eval_jaxpr(
      traced.closed.jaxpr, traced.closed.consts, _inputs(traced, bound, saved, bank), ctx
    )
    outs = interpreter.plain_outputs(outs, ctx, "the model's output")
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)

  return apply


def _check_dropout_key(key: Any) -> None:
  """Raises unless ``key`` is ``None`` or one PRNG key: a typed key of shape ``()``
  (`jax.random.key`) or a raw 1-D uint32 key (`jax.random.PRNGKey`)."""
  if key is None:
    return
  dtype = getattr(key, "dtype", None)
  shape = tuple(getattr(key, "shape", ()))
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  if (typed and shape == ()) or (dtype == np.uint32 and len(shape) == 1):
    return
  if typed or (dtype == np.uint32 and len(shape) > 1):
    raise ValueError(
      f"`lora_dropout_key` must be one PRNG key; got a batch of keys of shape {shape}. Pass one key "
      "(each LoRA branch folds in its own counter), e.g. `keys[0]` or `jax.random.split(key)[0]`; to give "
      "each example its own key, `jax.vmap` the wrapped apply over the keys."
    )
  raise TypeError(
    f"`lora_dropout_key` must be a PRNG key such as `jax.random.key(0)` (or a raw `jax.random.PRNGKey(0)`); "
    f"got {type(key).__name__} {key!r}."
  )


def wrap(
  apply_fn: Callable[..., Any],
  config: LoraConfig | BankConfig,
  *,
  strategy: Strategy = "auto",
  fuse_siblings: bool = True,
  routing: Routing = "gather",
  dora_recompute: bool = False,
) -> Callable[..., Any]:
  """Wraps a model's apply function so it runs with a LoRA adapter tree.

  The result is called as ``apply(tree, lora, *args, **kwargs)`` where
  ``apply_fn(tree, *args, **kwargs)`` is the model's own call: a Linen
  ``model.apply``; for NNX, the ``apply_fn`` of ``graphdef, state, apply_fn =
  jlora.nnx_split(model)`` (not ``lambda state, x: nnx.merge(graphdef,
  state)(x)``, whose state shares its variables with the model); or a plain
  function of a params dict. It computes exactly what
  ``apply_fn(jlora.merge(tree, lora, config), *args, **kwargs)`` computes, but
  without forming the merged kernels: each adapted kernel's contribution is
  computed factorized, ``x @ W + scale * ((dropout(x) @ A) @ B)``, where the
  kernel meets a ``dot_general``, a convolution or an embedding ``gather``,
  through reshapes, transposes, casts, ``jit``, ``remat``, ``scan``, loops and
  custom-derivative functions. A use it cannot factor materialises the merged
  kernel for that use only and emits one `MaterializationWarning` naming the
  parameter path.

  Shapes: kernel ``(*stacked, *fan_in, *fan_out)``, ``lora_A``
  ``(*stacked, *fan_in, r)``, ``lora_B`` ``(*stacked, r, *fan_out)``.

  Many adapters in one batch: wrap a bank's config (`jlora.stack`) and call
  ``apply(tree, bank.lora, *args, adapter_ids=ids)``; example ``e`` (the
  leading batch axis) runs with adapter ``ids[e]``, or with the base model
  alone for ``-1``, exactly as ``apply_fn(jlora.merge(tree, *bank.adapter(ids[e])),
  ...)`` would, always factorized. Every input to an adapted kernel must keep
  the example axis leading (a model that flattens batch and sequence, or
  sorts tokens for experts, is an error). Ids are traced (no retrace when they
  change); concrete ids out of ``[-1, N)`` raise, and under ``jit`` such an
  id makes its example's output NaN (never a silently clipped adapter).

  Args:
    apply_fn: the model's apply function; its first argument is the tree.
    config: the config the adapter tree was made with, or a bank's
      `BankConfig` (``bank.config``).
    strategy: ``"factorized"`` always computes the LoRA branch factorized;
      ``"merged"`` merges every kernel once up front (fastest for serving
      many tokens; no dropout); ``"auto"`` (default) is factorized wherever
      gradients flow into the adapter (detected at trace time: under
      ``jax.grad``/``value_and_grad``/``vjp``, including inside ``jit``),
      dropout is on or the adapter is batched (``vmap`` over adapter trees),
      and otherwise picks, per kernel use, whichever costs fewer FLOPs for
      the static shapes (merged when a kernel sees more tokens than
      ``in*out/(in+out)``); a merged use still has factorized gradients, so
      ``grad`` of an already-jitted apply forms no kernel-sized gradient.
      A bank is always factorized (``"auto"``; ``"merged"`` is an error).
    fuse_siblings: kernels that read the same input (q/k/v, gate/up) compute
      their rank-r products ``x @ A_i`` as one product ``x @ concat(A_i)``,
      and so their ``A`` gradients as one product too (fewer, larger dots;
      equal to the unfused result up to float rounding). Not with LoRA
      dropout (each branch draws its own mask). ``False`` computes each
      branch on its own (for comparison).
    routing: for a bank, how each example's branch is computed:
      ``"gather"`` (default) gathers each example's adapter factors and
      contracts them batched (BGMV); ``"ragged"`` sorts the examples by
      adapter and uses ``lax.ragged_dot_general`` over the groups (SGMV),
      where the product allows (Dense-like kernels; others gather). See the
      README's measurements for which is faster where.
    dora_recompute: for a DoRA adapter (``use_dora=True``): compute each
      adapted product ``y = x @ W + scale * (x @ A) @ B`` again in the
      backward pass instead of keeping it. The magnitude's gradient reads
      ``y`` (``tokens x out`` per adapted kernel), so by default (``False``,
      PEFT's way) a DoRA step keeps it and needs more temp bytes than a LoRA
      step at many tokens; ``True`` brings them back to about a LoRA step's
      for one more base product per kernel in the backward pass (the
      README's DoRA figures). The results are the same.

  Returns:
    ``apply(tree, lora, *args, lora_dropout_key=None, **kwargs)`` (for a bank,
    ``adapter_ids=`` too: a 1-D integer array, one id per example). LoRA dropout
    (``config.lora_dropout``) is applied only when ``lora_dropout_key`` is
    given (training); without it (evaluation) there is none. The function is
    pure and traces once under ``jax.jit``.

    Its ``inspect.signature`` is ``apply_fn``'s with ``lora`` after the first
    parameter and a keyword-only ``lora_dropout_key``.

  Raises:
    ValueError: for an unknown ``strategy``; when called, if the adapter tree
      does not agree with ``config`` and the tree (an adapter missing, extra or
      of the wrong shape, naming the path; for ``"all-linear"`` every weight
      the model uses as a linear layer in the call needs one), or the base and
      adapter trees are swapped; for a bank, ``"merged"`` or an unknown
      ``routing``, and when called, ``adapter_ids`` missing, not 1-D, out of
      range (concrete) or not one per example at an adapted kernel, or a bank
      kernel used where it cannot be routed (a convolution, ``ragged_dot``);
      ``adapter_ids`` given for a plain `LoraConfig`; ``dora_recompute=True``
      for a config without ``use_dora`` or with ``strategy="merged"``; a
      ``lora_dropout_key`` that is a batch of keys.
    TypeError: if ``config`` is not a `LoraConfig` or `BankConfig`, or
      ``fuse_siblings`` or ``dora_recompute`` not a bool; when called, for
      ``adapter_ids`` that are not integers or a ``lora_dropout_key`` that is
      not a PRNG key.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(3, name="q_proj")
    >>> x = jnp.ones((2, 4))
    >>> variables = {"params": {"q_proj": model.init(jax.random.key(0), x)["params"]}}
    >>> apply_fn = lambda v, x: model.apply({"params": v["params"]["q_proj"]}, x)
    >>> cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = jlora.init(variables, cfg, key=jax.random.key(1))
    >>> apply = jlora.wrap(apply_fn, cfg)
    >>> y = apply(variables, lora, x)
    >>> bool(jnp.allclose(y, apply_fn(jlora.merge(variables, lora, cfg), x), atol=1e-6))
    True
  """
  if strategy not in _STRATEGIES:
    raise ValueError(f"`strategy` must be one of {_STRATEGIES}; got {strategy!r}.")
  if not callable(apply_fn):
    raise TypeError(f"`apply_fn` must be callable; got {type(apply_fn).__name__}.")
  if not isinstance(fuse_siblings, bool):
    raise TypeError(f"`fuse_siblings` must be True or False; got {fuse_siblings!r}.")
  if not isinstance(dora_recompute, bool):
    raise TypeError(f"`dora_recompute` must be True or False; got {dora_recompute!r}.")
  if isinstance(config, BankConfig):
    if strategy == "merged":
      raise ValueError(
        "A bank is never merged (each example has its own adapter): use strategy='auto' or 'factorized'."
      )
    if routing not in interpreter_routing.DESIGNS:
      raise ValueError(f"`routing` must be one of {interpreter_routing.DESIGNS}; got {routing!r}.")
  else:
    config = check_config(config)
  if dora_recompute and not (isinstance(config, LoraConfig) and config.use_dora):
    raise ValueError(
      "`dora_recompute=True` applies to a DoRA adapter, but the config is not one (`use_dora=False`, "
      "or a bank, which holds no DoRA adapters): drop `dora_recompute`, or wrap a "
      "`LoraConfig(..., use_dora=True)`."
    )
  if dora_recompute and strategy == "merged":
    raise ValueError(
      "`dora_recompute=True` recomputes factorized DoRA products, but strategy='merged' forms the DoRA "
      "kernels instead: use strategy='auto' or 'factorized' with it."
    )
  apply = _make_apply(
    apply_fn, config, strategy, routing, fuse_siblings=fuse_siblings, dora_recompute=dora_recompute
  )
  apply.__signature__ = _signature(apply_fn, apply, isinstance(config, BankConfig))
  return apply


def _signature(apply_fn: Callable[..., Any], apply: Callable[..., Any], bank: bool) -> inspect.Signature:
  """The wrapped apply's signature (`agreement.call_signature`), with a keyword-only ``adapter_ids``
  before ``**kwargs`` for a bank and without it otherwise."""
  plain = inspect.signature(apply, follow_wrapped=False)
  plain = plain.replace(parameters=[p for n, p in plain.parameters.items() if n != "adapter_ids"])
  sig = agreement.call_signature(apply_fn, plain)
  if not bank:
    return sig
  ids = inspect.Parameter("adapter_ids", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=jax.Array)
  params = list(sig.parameters.values())
  at = len(params) - (1 if params[-1].kind is inspect.Parameter.VAR_KEYWORD else 0)
  return sig.replace(parameters=[*params[:at], ids, *params[at:]])


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
  return _probe_uses(_trace(apply_fn, abstract[0], abstract[1], abstract[2], None), tree, only)


def _probe_uses(
  traced: _Traced, tree: Any, only: Collection[paths.Path] | None = None
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
  return _layouts_from_uses(read_uses(apply_fn, tree, args, kwargs, only), tree)


def read_layouts(
  apply_fn: Callable[..., Any], tree: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, str]]:
  """`infer_layouts` of every kernel without raising: the layouts, and for each kernel whose use gives it
  none (a grouped convolution's, contradicting roles; an N-D leaf the model uses in no product, such as
  a weight-normed convolution's ``weight_v``: `layouts.computed_kernel`), the error that says why."""
  found, refused = _layouts_and_refusals(read_uses(apply_fn, tree, args, kwargs), tree)
  for c in targets.candidates(tree):
    if c.path not in found and c.path not in refused and len(c.shape) != 2:
      refused[c.path] = layouts.computed_kernel(c.module, c.shape, paths.to_str(c.path))
  return found, {path: str(e) for path, e in refused.items()}


def _layouts_and_refusals(
  uses: Mapping[paths.Path, Any], tree: Any
) -> tuple[dict[paths.Path, layouts.Layout], dict[paths.Path, ValueError]]:
  cands = {c.path: c for c in targets.candidates(tree)}
  found, refused = {}, {}
  for path, u in uses.items():
    try:
      found[path] = layouts.from_uses(u, cands[path].shape, paths.to_str(path), cands[path].module)
    except ValueError as e:
      refused[path] = e
  return found, refused


def _layouts_from_uses(uses: Mapping[paths.Path, Any], tree: Any) -> dict[paths.Path, layouts.Layout]:
  found, refused = _layouts_and_refusals(uses, tree)
  if refused:
    raise next(iter(refused.values()))
  return found
