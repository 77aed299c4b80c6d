"""Two-operand contractions and the rank-r products' factor gradients (contractions)."""

import functools
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora._src.interpret import contractions
from jlora._src.interpret.contractions import contract, factor_product

K = jax.random.split(jax.random.key(11), 6)


@pytest.fixture
def one_device():
  """An explicit mesh of one device. On the suite's 8 host devices, without a mesh, the tokens'
  placement is unknown and the product is `contract` (see the sharding tests at the end)."""
  mesh = jax.make_mesh((1,), ("one",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    yield mesh


class Case(NamedTuple):
  act_lab: str
  act_shape: tuple[int, ...]
  f_lab: str
  f_shape: tuple[int, ...]
  out_lab: str
  rule: bool  # whether the labels allow the rule (else the product is `contract`)

  def product(self, act, f):
    return factor_product(act, self.act_lab, f, self.f_lab, self.out_lab)

  def einsum(self, act, f):
    return jnp.einsum(f"{self.act_lab},{self.f_lab}->{self.out_lab}", act, f)

  def operands(self):
    return jax.random.normal(K[0], self.act_shape), jax.random.normal(K[1], self.f_shape)


CASES = [
  Case("bsd", (2, 4, 5), "dr", (5, 3), "bsr", True),  # x @ A, tokens on two axes
  Case("bsr", (2, 4, 3), "ro", (3, 7), "bso", True),  # t @ B
  Case("bsr", (2, 4, 3), "rnh", (3, 2, 4), "bsnh", True),  # an einsum kernel's B (N, H)
  Case("bsnh", (2, 4, 2, 3), "nhr", (2, 3, 5), "bsr", True),  # an o-projection's A (N, H)
  Case("bcsd", (2, 2, 3, 5), "dr", (5, 3), "bcsr", True),  # three token axes
  Case("td", (6, 5), "dr", (5, 3), "tr", False),  # one token axis: nothing to merge
  Case("bsr", (2, 4, 3), "ro", (3, 7), "sbo", False),  # tokens in another order in the output
  Case("dbs", (5, 2, 4), "dr", (5, 3), "bsr", False),  # tokens trailing in the input
  Case("bsd", (2, 4, 5), "bdr", (2, 5, 3), "bsr", False),  # a batched factor
]


def _id(c: Case) -> str:
  return f"{c.act_lab},{c.f_lab}->{c.out_lab}"


def _transforms(g, operands, ct, tangents, fs):
  """``g(act, f)`` and what the rule must get right under each transformation, in one compiled program."""
  act, f = operands
  loss = lambda a, w: jnp.sum(g(a, w) * ct)  # noqa: E731
  sq = lambda a, w: jnp.sum(g(a, w) ** 2)  # noqa: E731
  return {
    "value": g(act, f),
    "grad": jax.grad(loss, (0, 1))(act, f),
    # Forward mode and forward-over-reverse (a Hessian-vector product) go through the rule too.
    "jvp": jax.jvp(g, (act, f), tangents),
    "hvp": jax.jvp(jax.grad(sq, (0, 1)), (act, f), tangents)[1],
    # vmap over a leading adapter axis of the factor.
    "vmap": jax.vmap(jax.grad(loss, 1), (None, 0))(act, fs),
  }


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_factor_product_matches_einsum_values_and_gradients(case, one_device):
  act, f = case.operands()
  fp, ein = case.product, case.einsum
  ct = jax.random.normal(K[2], ein(act, f).shape)
  tangents = (jax.random.normal(K[3], act.shape), jax.random.normal(K[4], f.shape))
  args = ((act, f), ct, tangents, jnp.stack([f, 2 * f]))
  got, want = (jax.jit(functools.partial(_transforms, g))(*args) for g in (fp, ein))
  for what in got:
    chex.assert_trees_all_close(got[what], want[what], atol=1e-4 if what == "hvp" else 1e-5, rtol=1e-5)
  # The rule is taken exactly where the labels allow it; elsewhere the product is `contract`.
  assert ("custom_jvp_call" in str(jax.make_jaxpr(fp)(act, f))) == case.rule


def _n_tokens(case: Case) -> int:
  return int(np.prod([n for c, n in zip(case.act_lab, case.act_shape) if c not in case.f_lab]))


def _factor_grad_dots(case: Case) -> list:
  """The ``dot_general``s of the factor's gradient, as (lhs shape, rhs shape, dimension numbers)."""
  act, f = case.operands()
  ct = jax.random.normal(K[2], case.einsum(act, f).shape)

  def loss(w):
    return jnp.sum(case.product(act, w) * ct)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(f).jaxpr
  dots = []
  stack = [jaxpr]
  while stack:
    j = stack.pop()
    for eqn in j.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["dimension_numbers"]))
      stack += jax.extend.core.jaxprs_in_params(eqn.params)
  return dots


@pytest.mark.parametrize("case", [c for c in CASES if c.rule], ids=_id)
def test_factor_gradient_contracts_the_tokens_as_one_leading_axis(case, one_device):
  # The gradient's token contraction is one dot over one axis of each operand, the first: the
  # tokens merged (a reshape of leading axes), each operand read in place.
  n_tok = _n_tokens(case)
  grads = [d for d in _factor_grad_dots(case) if n_tok in d[0] and n_tok in d[1]]
  assert len(grads) == 1, grads
  lhs, rhs, ((lc, rc), (lb, rb)) = grads[0]
  assert (lhs[0], rhs[0], tuple(lc), tuple(rc), lb, rb) == (n_tok, n_tok, (0,), (0,), (), ())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's lowering of the token contraction")
def test_factor_gradient_compiles_without_transposing_a_token_sized_array(one_device):
  # The measured trap (module docstring): an activation's backward feeding `t^T g`. With autodiff's
  # dot XLA:CPU transposes the tokens x features cotangent; with the rule nothing that size moves.
  b_, s_, d, o, r = 2, 64, 32, 128, 4
  x = jax.random.normal(K[0], (b_, s_, d))
  w, a, b = jax.random.normal(K[1], (d, o)), jax.random.normal(K[2], (d, r)), jax.random.normal(K[3], (r, o))

  def step(product):
    def loss(ab):
      a, b = ab
      h = jnp.tanh(x @ w + product(product(x, "bsd", a, "dr", "bsr"), "bsr", b, "ro", "bso"))
      return jnp.sum(jax.nn.gelu(h) ** 2)

    return jax.jit(jax.grad(loss)).lower((a, b)).compile().as_text()

  big = re.compile(rf"= f32\[{o},{b_},{s_}\]\{{[0-9,]+\}} transpose\(")
  assert big.search(step(contract)), "the trap this rule avoids no longer shows: re-measure the benchmark"
  assert not big.search(step(factor_product))


# -- where the tokens may be split across devices ---------------------------------------------

D_, R_, F_ = 6, 3, 10


@pytest.fixture
def eight_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest simulates them on CPU)")


def _mlp(x, a, b):
  """``t = x @ A``, then ``t @ B``: both products' factor gradients contract the tokens."""
  t = factor_product(x, "bsd", a, "dr", "bsr")
  return jnp.sum(jnp.tanh(factor_product(t, "bsr", b, "ro", "bso")) ** 2)


def _mlp_ref(x, a, b):
  return jnp.sum(jnp.tanh(x @ a @ b) ** 2)


def _rule_taken(x, a, b):
  # A new function each time: `make_jaxpr` reuses the trace of a function it saw with these avals.
  return "custom_jvp_call" in str(jax.make_jaxpr(functools.partial(_mlp))(x, a, b))


def _check_grads(x, a, b):
  got = jax.jit(jax.grad(_mlp, (1, 2)))(x, a, b)
  want = jax.jit(jax.grad(_mlp_ref, (1, 2)))(x, a, b)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)  # gradients of size ~10


def _operands(mesh, spec):
  x = jax.random.normal(K[0], (4, 8, D_))
  a, b = jax.random.normal(K[1], (D_, R_)), jax.random.normal(K[2], (R_, F_))
  if mesh is None:
    return x, a, b
  return jax.device_put(x, NamedSharding(mesh, spec)), *(
    jax.device_put(v, NamedSharding(mesh, P())) for v in (a, b)
  )


def test_tokens_on_many_devices_without_a_mesh_are_contracted_plainly(eight_devices):
  # No mesh, 8 devices: jit's in_shardings may still split the sequence; nothing in the trace says.
  x, a, b = _operands(None, None)
  assert not _rule_taken(x, a, b)
  _check_grads(x, a, b)


def test_tokens_on_one_device_without_a_mesh_merge(monkeypatch):
  x, a, b = _operands(None, None)
  monkeypatch.setattr(jax, "device_count", lambda *_: 1)
  assert _rule_taken(x, a, b)
  _check_grads(x, a, b)


@pytest.mark.parametrize("spec", [P("data"), P(None, "seq"), P("data", "seq")], ids=str)
def test_tokens_under_auto_sharding_are_contracted_plainly(spec, eight_devices, monkeypatch):
  # GSPMD would all-gather sequence-sharded activations to merge them; it shards after tracing.
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
  x, a, b = _operands(mesh, spec)
  assert not _rule_taken(x, a, b)
  _check_grads(x, a, b)
  compiled = lambda: jax.jit(jax.grad(_mlp, (1, 2))).lower(x, a, b).compile().as_text()  # noqa: E731
  assert " all-gather" not in compiled()
  # The hazard the check avoids: with the merge forced, the sequence-sharded activations are gathered.
  monkeypatch.setattr(contractions, "_merge_is_local", lambda *_: True)
  assert (" all-gather" in compiled()) == ("seq" in spec)


@pytest.mark.parametrize(
  "spec, merged",
  [(P(), True), (P("data"), True), (P(None, "seq"), False), (P("data", "seq"), False)],
  ids=str,
)
def test_explicitly_sharded_tokens_merge_only_where_each_device_holds_whole_rows(spec, merged, eight_devices):
  # A reshape of (batch@data, seq) keeps each device's rows; one of (batch, seq@seq) cannot be
  # written as a sharding of the merged axis (the reshape or the tangent's type was an error).
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    x, a, b = _operands(mesh, spec)
    assert _rule_taken(x, a, b) == merged
    _check_grads(x, a, b)


def test_tokens_inside_shard_map_are_local_and_merge(eight_devices):
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  x, a, b = _operands(mesh, P("data", "seq"))
  seen = []

  def per_shard(fn):
    def body(x, a, b):
      if fn is _mlp:
        seen.append(_rule_taken(x, a, b))
      return jax.lax.psum(fn(x, a, b), ("data", "seq"))

    return jax.shard_map(body, mesh=mesh, in_specs=(P("data", "seq"), P(), P()), out_specs=P())

  got = jax.jit(jax.grad(per_shard(_mlp), (1, 2)))(x, a, b)
  want = jax.jit(jax.grad(per_shard(_mlp_ref), (1, 2)))(x, a, b)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)  # gradients of size ~10
  assert seen and all(seen)


@pytest.mark.parametrize("spec", [P("data"), P("data", "seq")], ids=str)
def test_wrapped_apply_trains_on_explicitly_sharded_activations(spec, eight_devices):
  # `jax.grad` of a wrapped apply under explicit sharding, against the merged weights' gradient:
  # batch-sharded activations take the rule; batch x sequence-sharded ones (which crashed) do not.
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)

  def apply(params, x):
    h = jax.nn.gelu(x @ params["up"]["kernel"])
    return h @ params["down"]["kernel"]

  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=("up", "down"), init_lora_weights=False)
  with jax.set_mesh(mesh):
    rep = lambda v: jax.device_put(v, NamedSharding(mesh, P()))  # noqa: E731
    params = {
      "up": {"kernel": rep(jax.random.normal(K[3], (D_, F_)))},
      "down": {"kernel": rep(jax.random.normal(K[4], (F_, D_)))},
    }
    lora = jax.tree.map(rep, jlora.init(params, cfg, key=K[5]))
    x = jax.device_put(jax.random.normal(K[0], (4, 8, D_)), NamedSharding(mesh, spec))
    wrapped = jlora.wrap(apply, cfg, strategy="factorized")  # factorized in make_jaxpr's forward too
    loss = lambda y: jnp.sum(jnp.tanh(y) ** 2)  # noqa: E731
    objective = lambda lo: loss(wrapped(params, lo, x))  # noqa: E731
    assert ("custom_jvp_call" in str(jax.make_jaxpr(objective)(lora))) == (spec == P("data"))
    got = jax.jit(jax.grad(objective))(lora)
    want = jax.jit(jax.grad(lambda lo: loss(apply(jlora.merge(params, lo, cfg), x))))(lora)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)  # gradients of size ~10
