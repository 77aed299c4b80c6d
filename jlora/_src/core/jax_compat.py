"""The JAX internals jlora relies on, in one place; the rest of jlora imports only public JAX.

The interpreter (`jlora._src.interpret.evaluator`) re-evaluates a model's jaxpr through the
public extension API, `jax.extend.core` (jaxprs, equations, literals, primitives).
Three things it needs are not public. Each is wrapped here, and each behaves in a
stated way when a JAX release moves it, never silently:

* `bind` re-binds an equation's primitive on new inputs. It needs
  ``Primitive.get_bind_params`` (an equation's params back into bind arguments,
  e.g. a ``jit`` equation's jaxpr; one value, the params, since jax 0.10) and
  ``JaxprEqn.ctx.manager`` (re-enters the equation's context: its abstract mesh,
  compute type, XLA metadata). jlora cannot run a model without them, so a JAX
  lacking either fails at ``import jlora`` with an `ImportError` naming the JAX
  versions jlora supports (a ``get_bind_params`` that returns another shape
  raises `RuntimeError` with the same message at the first bind).
* `source_context` re-enters an equation's name stack (``jax._src.source_info_util``),
  so the HLO metadata and profiles of a wrapped model keep the model's module names.
  Cosmetic: without it jlora runs unchanged, without those names, and
  ``import jlora`` warns once (`JaxCompatWarning`).
* `differentiated` tells whether gradients flow into a tree in the current trace,
  from the autodiff and batching tracer types (``jax._src.interpreters.ad.JVPTracer``,
  ``LinearizeTracer``, ``jax._src.interpreters.batching.BatchTracer``);
  ``strategy="auto"`` stays factorized where it is true. Without them it is always
  true: ``"auto"`` is factorized everywhere (correct, and memory-safe for training;
  slower for serving many tokens, where ``strategy="merged"`` helps), and
  ``import jlora`` warns once (`JaxCompatWarning`).

Equation params that a JAX release renamed are read through one accessor each
(`scan_counts`, `shard_map_manual_axes`), which knows every supported spelling
and raises `RuntimeError` naming the supported versions on any other.

`MISSING` lists the internals this JAX lacks (empty on a supported JAX);
``tests/test_jax_compat.py`` checks each one is present and behaves as jlora relies on.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jex

# The JAX versions jlora supports: pyproject.toml's requirement (tests/test_jax_compat.py checks they agree).
SUPPORTED_JAX = "jax>=0.10,<0.12"


class JaxCompatWarning(UserWarning):
  """This JAX moved an internal jlora uses; jlora runs in a documented degraded mode."""


def _moved(what: str) -> str:
  return (
    f"jlora: this JAX ({jax.__version__}) has no {what}. jlora supports {SUPPORTED_JAX}, "
    "the versions its CI tests; install one of those (or a jlora release that supports this JAX)."
  )


# -- bind: required ----------------------------------------------------------------------

try:
  from jax._src.core import JaxprEqnContext as _EqnContext
except ImportError as e:  # a JAX that moved it
  raise ImportError(_moved("`jax._src.core.JaxprEqnContext`")) from e
if not hasattr(_EqnContext, "manager"):  # pragma: no cover
  raise ImportError(_moved("`JaxprEqnContext.manager`"))
if not hasattr(jex.Primitive, "get_bind_params"):  # pragma: no cover
  raise ImportError(_moved("`jax.extend.core.Primitive.get_bind_params`"))


def bind(eqn: Any, invals: Sequence[Any], **overrides: Any) -> list[Any]:
  """Binds ``eqn``'s primitive on ``invals`` in ``eqn``'s context (``overrides`` replace params)."""
  params = eqn.primitive.get_bind_params({**eqn.params, **overrides})
  if not isinstance(params, dict):  # pragma: no cover - the pre-0.10 (subfuns, params) convention
    raise RuntimeError(_moved("one-value `Primitive.get_bind_params`"))
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


# -- optional internals: a degraded mode, announced once at import ----------------------

_missing: list[str] = []

try:
  from jax._src import source_info_util as _source_info
except ImportError:  # a JAX that moved it
  _source_info = None
if not all(hasattr(_source_info, f) for f in ("current_name_stack", "user_context")):  # pragma: no cover
  _source_info = None
  _missing.append("jax._src.source_info_util")

try:
  from jax._src.interpreters.ad import JVPTracer as _JVPTracer
  from jax._src.interpreters.ad import LinearizeTracer as _LinearizeTracer
  from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # a JAX that moved them
  _JVPTracer = _LinearizeTracer = _BatchTracer = None
  _missing.append("jax._src.interpreters.ad.JVPTracer/LinearizeTracer, batching.BatchTracer")

MISSING: tuple[str, ...] = tuple(_missing)

if _source_info is None:
  warnings.warn(
    _moved("`jax._src.source_info_util`")
    + " Until then the HLO metadata of a wrapped model does not keep its module names.",
    JaxCompatWarning,
    stacklevel=2,
  )
if _JVPTracer is None:
  warnings.warn(
    _moved("`jax._src.interpreters.ad.JVPTracer`/`LinearizeTracer` or `batching.BatchTracer`")
    + ' Until then strategy="auto" computes every LoRA branch factorized, as under training '
    '(correct; slower for serving many tokens, where strategy="merged" helps).',
    JaxCompatWarning,
    stacklevel=2,
  )


def source_context(eqn: Any) -> contextlib.AbstractContextManager:
  """Re-enters ``eqn``'s name stack below the current one, for the ops bound inside."""
  if _source_info is None:  # degraded mode, announced at import
    return contextlib.nullcontext()
  name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
  return _source_info.user_context(eqn.source_info.traceback, name_stack=name_stack)


def differentiated(tree: Any) -> bool:
  """Whether gradients flow into any leaf of ``tree`` in the current trace.

  True under ``jax.grad``/``value_and_grad``/``vjp``/``jvp``/``linearize``, also
  inside ``jax.vmap`` either side of them; False outside autodiff, and inside a
  ``jax.jit`` that is itself differentiated from outside (the jitted function
  traces before autodiff reaches it).
  """
  if _JVPTracer is None:  # degraded mode, announced at import
    return True
  for leaf in jax.tree_util.tree_leaves(tree):
    t = leaf
    while isinstance(t, jax.core.Tracer):
      if isinstance(t, (_JVPTracer, _LinearizeTracer)):
        return True
      t = t.val if isinstance(t, _BatchTracer) else None
  return False


def batched(tree: Any) -> bool:
  """Whether any leaf of ``tree`` is batched by ``jax.vmap`` in the current trace (through autodiff)."""
  if _BatchTracer is None:  # degraded mode, announced at import
    return False
  for leaf in jax.tree_util.tree_leaves(tree):
    t = leaf
    while isinstance(t, jax.core.Tracer):
      if isinstance(t, _BatchTracer):
        return True
      t = getattr(t, "primal", None)
  return False


# -- equation params a JAX release renamed: one accessor each ------------------------------


def _unreadable(what: str, primitive: str, params: Mapping[str, Any]) -> RuntimeError:
  return RuntimeError(
    f"jlora cannot read the {what} of a `{primitive}` in jax {jax.__version__} (params {sorted(params)}); "
    f"jlora supports {SUPPORTED_JAX}."
  )


def scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a ``scan`` equation, whose operands are its consts, then its
  carry, then its scanned inputs.

  jax 0.10 names the two counts. jax 0.11 replaced them by ``ft_in``, a flat tree
  (``jax._src.flattree``) packing the three operand groups, ``ft.pack((consts, carry, xs))``
  (``lax.scan`` and every scan rule in ``jax/_src/lax/control_flow/loops.py``); each group's
  ``len`` is its number of operands, nested groups included.

  Raises:
    RuntimeError: on a JAX that spells them neither way, naming the supported versions.
  """
  if "num_consts" in params:  # jax 0.10
    return params["num_consts"], params["num_carry"]
  if "ft_in" in params:  # jax 0.11
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)
  raise _unreadable("consts and carry counts", "scan", params)


def shard_map_manual_axes(params: Mapping[str, Any]) -> Any:
  """The mesh axes a ``shard_map`` equation makes manual (``newly_manual_axes`` from jax 0.10.2,
  ``manual_axes`` before)."""
  for name in ("newly_manual_axes", "manual_axes"):
    if name in params:
      return params[name]
  raise _unreadable("manual axes", "shard_map", params)


# -- the distributed runtime's key-value store: required in a multi-process job ---------------


def distributed_client() -> Any:
  """The ``jax.distributed`` client (its key-value store and barriers), or ``None`` outside a job.

  jlora's storage calls agree across the processes of a job through it
  (`jlora._src.io.processes`), as orbax does; ``jax.distributed`` has no public
  accessor for it.

  Raises:
    RuntimeError: in a multi-process job, if this JAX moved the client.
  """
  try:
    from jax._src import distributed  # noqa: PLC0415
  except ImportError:  # pragma: no cover - a JAX that moved it
    distributed = None
  client = getattr(getattr(distributed, "global_state", None), "client", None)
  if client is None and jax.process_count() > 1:  # pragma: no cover - a JAX that moved it
    raise RuntimeError(_moved("`jax._src.distributed.global_state.client`"))
  return client
