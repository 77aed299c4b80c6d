"""`wrap`: running a model with adapters, each adapted kernel's product computed factorized.

The narrative reference (banks, strategies, DoRA recomputation, every error) is `docs/wrap_reference.md`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np

from jlora._src.adapters.bank import BankConfig
from jlora._src.adapters.bind import bind, bind_bank, lora_value
from jlora._src.adapters.merge import merge
from jlora._src.adapters.spec import Bound
from jlora._src.api.layout_inference import layouts_from_uses, linear_weights, probe_uses
from jlora._src.api.trace import Traced, remember, trace
from jlora._src.core import agreement, jax_compat, paths
from jlora._src.core.config import ALL_LINEAR, LoraConfig, check_config
from jlora._src.core.qarray import is_quantized
from jlora._src.interpret import evaluator as interpreter
from jlora._src.interpret import values
from jlora._src.interpret.rules import routing as interpreter_routing

Strategy = Literal["auto", "factorized", "merged"]
Routing = Literal["gather", "ragged"]
_STRATEGIES = ("auto", "factorized", "merged")


def _linear_reader(traced: Traced, tree: Any, cache: dict) -> Callable[[], set[paths.Path]]:
  """For "all-linear": the weights this call uses as linear layers, read from its trace (once per trace)."""

  def read() -> set[paths.Path]:
    if traced.key is None:
      return linear_weights(probe_uses(traced, tree))
    if traced.key not in cache:
      remember(cache, traced.key, linear_weights(probe_uses(traced, tree)))
    return cache[traced.key]

  return read


def _bind(
  traced: Traced, tree: Any, lora: Any, config: LoraConfig | BankConfig, linear_cache: dict
) -> tuple[list[Bound], dict[paths.Path, Any]]:
  """The adapters of ``lora`` bound to ``tree`` (a bank's: each with all N adapters' factors) and the
  trained copies; layouts the factor shapes leave open, and "all-linear"'s weights, come from ``traced``."""
  hint = lambda: layouts_from_uses(probe_uses(traced, tree), tree)  # noqa: E731
  if isinstance(config, BankConfig):
    return bind_bank(tree, lora, config, hint), {}
  linear = _linear_reader(traced, tree, linear_cache) if config.target_modules == ALL_LINEAR else None
  return bind(tree, lora, config, hint, linear=linear)


def _inputs(
  traced: Traced, bound: list[Bound], saved: Mapping[paths.Path, Any], bank: BankConfig | None
) -> list[Any]:
  """The interpreter's inputs: adapted kernels as `LoraValue`s (a bank's routed), trained copies in
  their leaves' places, quantized weights as `QuantView`s, everything else as traced."""
  vals = [values.QuantView(x) if is_quantized(x) else x for x in traced.dynamic]
  for path, leaf in saved.items():
    vals[traced.tree_slots[path]] = leaf
  for item in bound:
    routed = None if bank is None else bank.entry(item.spec.path).scales
    vals[traced.tree_slots[item.spec.path]] = lora_value(item, routed)
  return vals


def _route(bank: BankConfig | None, adapter_ids: Any, routing: Routing, rates: tuple[float, ...]) -> Any:
  """A bank's routing of the examples to its adapters (`interpreter_routing.routing`); ``None`` without a
  bank, where ``adapter_ids`` is an error."""
  if bank is not None:
    return interpreter_routing.routing(bank.num_adapters, adapter_ids, routing, rates)
  if adapter_ids is not None:
    raise ValueError(
      "`adapter_ids` routes examples to the adapters of a bank, but this apply wraps one adapter's "
      "LoraConfig: stack the adapters with `bank = jlora.stack(...)` and wrap `bank.config`."
    )
  return None


def _dropout_on(strategy: Strategy, key: Any, rates: tuple[float, ...]) -> bool:
  """Whether LoRA dropout runs in this call: a key is given and some rate is positive."""
  _check_dropout_key(key)
  dropout = key is not None and max(rates) > 0.0
  if strategy == "merged" and dropout:
    raise ValueError(
      "LoRA dropout needs the factorized path: use strategy='auto' or 'factorized' "
      "for training with `lora_dropout_key`."
    )
  return dropout


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
    route = _route(bank, adapter_ids, routing, rates)
    dropout = _dropout_on(strategy, lora_dropout_key, rates)
    # One trace of the model serves the layout and linear-weight reads and the interpretation (the
    # trained `modules_to_save` copies have their base leaves' shapes: they only change the values).
    traced = trace(apply_fn, tree, args, kwargs, cache)
    bound, saved = _bind(traced, tree, lora, config, linear_cache)
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

  ``apply(tree, lora, *args, **kwargs)`` computes what
  ``apply_fn(jlora.merge(tree, lora, config), *args, **kwargs)`` computes, without
  forming the merged kernels: each adapted kernel's product is computed
  factorized, ``x @ W + scale * ((dropout(x) @ A) @ B)`` (kernel
  ``(*stacked, *fan_in, *fan_out)``, ``lora_A`` ``(*stacked, *fan_in, r)``,
  ``lora_B`` ``(*stacked, r, *fan_out)``). A use it cannot factor merges that
  kernel for that use only, with one `MaterializationWarning`. With a bank's
  config (`jlora.stack`), ``adapter_ids=`` routes each example to its adapter.
  The full reference (banks, strategies, NNX, errors): ``docs/wrap_reference.md``.

  Args:
    apply_fn: the model's apply function; its first argument is the tree.
    config: the adapter tree's `LoraConfig`, or a bank's `BankConfig`.
    strategy: ``"auto"`` (default: factorized under gradients, dropout or
      ``vmap``, else the cheaper per use), ``"factorized"`` or ``"merged"``.
    fuse_siblings: compute the rank-r products of kernels that read the same
      input as one product (q/k/v, gate/up).
    routing: for a bank, ``"gather"`` (BGMV, default) or ``"ragged"`` (SGMV).
    dora_recompute: for a DoRA adapter, recompute each adapted product in the
      backward pass instead of keeping it (fewer temp bytes, same results).

  Returns:
    ``apply(tree, lora, *args, lora_dropout_key=None, **kwargs)`` (for a bank,
    ``adapter_ids=`` too), pure, tracing once under ``jax.jit``; dropout only
    with a ``lora_dropout_key``. Its signature is ``apply_fn``'s with ``lora``
    second and the keyword-only arguments.

  Raises:
    ValueError: for an unknown ``strategy`` or ``routing``, a bank with
      ``"merged"``, or ``dora_recompute`` without a DoRA config or with
      ``"merged"``; when called, for an adapter tree that does not fit
      ``config`` and the tree (naming the path), and bad ``adapter_ids`` or
      ``lora_dropout_key``.
    TypeError: for a ``config`` of another type or non-bool flags; when
      called, for ``adapter_ids`` or a ``lora_dropout_key`` of the wrong type.

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
