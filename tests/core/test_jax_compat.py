"""The JAX internals jlora relies on (`jlora._src.core.jax_compat`): present, and behaving as jlora needs.

When a JAX release moves one of them, these tests fail first, naming it.
"""

import importlib.util
import pathlib
import re
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.xla_metadata import set_xla_metadata

from jlora._src.core import jax_compat
from tests import ROOT


def test_no_internal_is_missing():
  assert jax_compat.MISSING == ()


def test_supported_versions_are_the_declared_ones():
  pyproject = tomllib.loads((pathlib.Path(ROOT) / "pyproject.toml").read_text())
  jax_req = [r for r in pyproject["project"]["dependencies"] if re.match(r"jax\b", r)]
  assert jax_req == [jax_compat.SUPPORTED_JAX]


# -- a JAX that moved an internal: what jlora does then --------------------------------------


def _fresh_compat():
  """A new copy of the compat module, imported against whatever `sys.modules` holds now."""
  spec = importlib.util.spec_from_file_location("_jlora_compat_under_test", jax_compat.__file__)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_moved_eqn_context_fails_at_import_naming_the_supported_versions(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax._src.core", None)
  with pytest.raises(ImportError, match=r"JaxprEqnContext.*jlora supports jax>=0\.10"):
    _fresh_compat()


def test_moved_tracer_types_warn_once_and_keep_auto_factorized(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax._src.interpreters.ad", None)
  with pytest.warns(UserWarning, match=r'JVPTracer.*strategy="auto" computes every LoRA') as rec:
    compat = _fresh_compat()
  assert [w.category for w in rec] == [compat.JaxCompatWarning]
  assert compat.MISSING == ("jax._src.interpreters.ad.JVPTracer/LinearizeTracer, batching.BatchTracer",)
  assert compat.differentiated({"a": jnp.ones(2)})  # as under training: factorized


def test_moved_name_stacks_warn_once_and_bind_without_them(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax._src.source_info_util", None)
  monkeypatch.delattr(sys.modules["jax._src"], "source_info_util")
  with pytest.warns(UserWarning, match="does not keep its module names") as rec:
    compat = _fresh_compat()
  assert [w.category for w in rec] == [compat.JaxCompatWarning]
  assert compat.MISSING == ("jax._src.source_info_util",)
  (eqn,) = jax.make_jaxpr(jnp.sin)(1.0).jaxpr.eqns
  with compat.source_context(eqn):
    np.testing.assert_allclose(compat.bind(eqn, [1.0])[0], np.sin(1.0), rtol=1e-6)


def _rebind_all(fn, *args, source=False):
  """``fn`` re-evaluated equation by equation through `jax_compat.bind` (what the interpreter does)."""
  closed = jax.make_jaxpr(fn)(*args)

  def run(*xs):
    env = dict(zip(closed.jaxpr.invars, xs))
    env.update(zip(closed.jaxpr.constvars, closed.consts))
    for eqn in closed.jaxpr.eqns:
      invals = [v.val if isinstance(v, jax.extend.core.Literal) else env[v] for v in eqn.invars]
      if source:
        with jax_compat.source_context(eqn):
          outs = jax_compat.bind(eqn, invals)
      else:
        outs = jax_compat.bind(eqn, invals)
      env.update(zip(eqn.outvars, outs))
    return [env[v] for v in closed.jaxpr.outvars]

  return run


def test_bind_rebinds_nested_jit_scan_and_custom_jvp():
  # get_bind_params turns a jit's, scan's and custom_jvp's params back into bind arguments.
  @jax.custom_jvp
  def f(x):
    return jnp.sin(x)

  f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * t[0]))

  def fn(x, w):
    h = jax.jit(lambda x: x @ w)(x)
    h = jax.lax.scan(lambda c, _: (f(c) * 2.0, None), h, None, length=3)[0]
    return jnp.tanh(h)

  x, w = jnp.linspace(0, 1, 12).reshape(3, 4), jnp.linspace(-1, 1, 20).reshape(4, 5)
  (got,) = jax.jit(_rebind_all(fn, x, w))(x, w)
  np.testing.assert_allclose(got, fn(x, w), rtol=1e-6)


def test_bind_applies_param_overrides():
  closed = jax.make_jaxpr(lambda x: jax.lax.dynamic_slice_in_dim(x, 1, 2))(jnp.arange(6.0))
  (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "dynamic_slice"]
  (out,) = jax_compat.bind(eqn, [jnp.arange(6.0), 1], slice_sizes=(3,))
  np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])


def test_bind_keeps_the_equation_context():
  # eqn.ctx carries what a `with` block set at trace time, e.g. XLA metadata; bind re-enters it.
  def fn(x):
    with set_xla_metadata(jlora_probe="kept"):
      return jnp.sin(x) * 2.0

  x = jnp.ones(4)
  text = jax.jit(_rebind_all(fn, x)).lower(x).as_text()
  assert 'jlora_probe = "kept"' in text


def _op_names(text):
  return set(re.findall(r'loc\("([^"]*)"', text))


def test_source_context_carries_the_name_stack_to_hlo_metadata():
  def fn(x):
    with jax.named_scope("block_7"):
      return jnp.sin(x) @ x.T

  x = jnp.ones((3, 3))
  with_names = jax.jit(_rebind_all(fn, x, source=True)).lower(x).as_text(debug_info=True)
  without = jax.jit(_rebind_all(fn, x)).lower(x).as_text(debug_info=True)
  assert any("block_7/" in n for n in _op_names(with_names)), _op_names(with_names)
  assert not any("block_7" in n for n in _op_names(without))  # the names come from source_context


def _seen_by(transform):
  """What `differentiated` says inside ``transform`` applied to a scalar loss of a tree."""
  seen = []

  def loss(tree):
    seen.append(jax_compat.differentiated(tree))
    return jnp.sum(tree["a"] ** 2)

  transform(loss)({"a": jnp.ones(3), "b": None})
  return seen


def _batched(transform):
  return lambda loss: lambda t: jax.vmap(transform(loss))(jax.tree_util.tree_map(lambda x: x[None], t))


DIFFERENTIATED = {
  "grad": jax.grad,
  "value_and_grad": jax.value_and_grad,
  "vjp": lambda f: lambda t: jax.vjp(f, t),
  "jvp": lambda f: lambda t: jax.jvp(f, (t,), (t,)),
  "linearize": lambda f: lambda t: jax.linearize(f, t),
  "jit_of_grad": lambda f: jax.jit(jax.grad(f)),
  "vmap_of_grad": _batched(jax.grad),
  "grad_of_vmap": lambda f: jax.grad(lambda t: jnp.sum(_batched(lambda g: g)(f)(t))),
}

NOT_DIFFERENTIATED = {
  "eager": lambda f: f,
  "jit": jax.jit,
  "vmap": _batched(lambda g: g),
  "jit_of_vmap": lambda f: jax.jit(_batched(lambda g: g)(f)),
  "make_jaxpr": jax.make_jaxpr,
  # Documented limit: a jitted function traces before autodiff reaches it (use strategy="factorized").
  "grad_of_jit": lambda f: jax.grad(jax.jit(f)),
}


@pytest.mark.parametrize("name", DIFFERENTIATED)
def test_differentiated_under_autodiff(name):
  assert _seen_by(DIFFERENTIATED[name]) == [True]


@pytest.mark.parametrize("name", NOT_DIFFERENTIATED)
def test_not_differentiated_outside_autodiff(name):
  assert _seen_by(NOT_DIFFERENTIATED[name]) == [False]


def test_differentiated_looks_only_at_the_given_tree():
  def loss(w, tree):
    assert not jax_compat.differentiated(tree)  # gradients flow into w, not tree
    assert jax_compat.differentiated(w)
    return jnp.sum(w * tree)

  jax.grad(loss)(jnp.ones(2), jnp.ones(2))


def test_batched_sees_vmap_through_autodiff():
  tree = {"a": jnp.ones(3)}
  seen = []

  def f(t):
    seen.append(jax_compat.batched(t))
    return jnp.sum(t["a"])

  f(tree)
  jax.vmap(f)({"a": jnp.ones((2, 3))})
  jax.vmap(jax.grad(f))({"a": jnp.ones((2, 3))})
  assert seen == [False, True, True]


# -- equation params a JAX release renamed: one accessor each ------------------------------


def test_scan_counts_of_a_traced_scan():
  def fn(w, c, xs):
    return jax.lax.scan(lambda c, x: ((c[0] * w + x, c[1] + 1.0), c[0]), c, xs)

  closed = jax.make_jaxpr(fn)(jnp.ones(3), (jnp.ones(3), 0.0), jnp.ones((4, 3)))
  (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
  assert jax_compat.scan_counts(eqn.params) == (1, 2)  # w; the two carries; then the one xs
  assert len(eqn.invars) == 4


class _Leaf:
  """jax 0.11's ``FTSingleton``: one operand."""

  def __len__(self):
    return 1


class _Tuple:
  """jax 0.11's ``FTTuple``: ``unpack`` gives its parts; its length is its number of operands."""

  def __init__(self, *elts):
    self.elts = elts

  def unpack(self):
    return self.elts

  def __len__(self):
    return sum(len(e) for e in self.elts)


class _Filtered:
  """jax 0.11's ``FTFiltered`` (``filter_with_mask``): its length counts the kept operands only."""

  def __init__(self, mask):
    self.mask = mask

  def __len__(self):
    return sum(self.mask)


def _nones(n):
  return _Tuple(*(_Leaf() for _ in range(n)))  # ft.nones(n): a tuple of n singletons


def test_scan_counts_read_jax_0_11_flat_trees():
  # jax 0.11 replaced num_consts/num_carry by ft_in, a flat tree of (consts, carry, xs), built as
  # jax/_src/lax/control_flow/loops.py does at jax-v0.11.0 (with the jax/_src/flattree.py classes above).
  # `lax.scan` (loops.py:459-463): ft.pack((ft.nones(len(consts)), ft.nones(num_carry), ft.nones(num_xs)))
  traced = {"ft_in": _Tuple(_nones(2), _nones(3), _nones(1)), "ft_out": _Tuple(_nones(3), _nones(1))}
  assert jax_compat.scan_counts(traced) == (2, 3)
  # the JVP's tangent scan (loops.py:869-874): residuals and the nonzero consts are the consts,
  # ft.pack(((ft.nones(len(int_res)), nz_consts_g), nz_carry_g, (nz_xs_g, ft.nones(len(ext_res)))))
  consts = _Tuple(_nones(4), _Filtered([True, False, True]))
  tangent = {"ft_in": _Tuple(consts, _Filtered([True, True]), _Tuple(_Filtered([False]), _nones(2)))}
  assert jax_compat.scan_counts(tangent) == (6, 2)


def test_scan_counts_of_an_unknown_spelling_names_the_supported_versions():
  with pytest.raises(RuntimeError, match=r"consts and carry counts of a `scan`.*jlora supports jax>=0\.10"):
    jax_compat.scan_counts({"jaxpr": None, "length": 2})
