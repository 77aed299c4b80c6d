"""Index arithmetic of kernel views (`jlora._src.interpret.values`), each against an independent computation.

A `LoraValue` view must always mean the same kernel as the view of the dense
kernel: ``view(x).delta() == view(x.delta())`` for every view operation; the
dense side is computed here with numpy. Tolerances: float32 factors, deltas
compared at ``rtol=atol=1e-6``.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora._src.interpret import values as V
from jlora._src.interpret.values import LoraValue, Probe

RNG = np.random.default_rng(0)
R = 3  # the rank in every case


def _lora(shape, a_axes, b_axes, scale=0.5, site="k"):
  """A random `LoraValue` of a kernel with ``shape``; each factor holds its axes in the given order."""
  a = RNG.standard_normal([shape[i] for i in a_axes] + [R]).astype(np.float32)
  b = RNG.standard_normal([shape[i] for i in b_axes] + [R]).astype(np.float32)
  w = RNG.standard_normal(shape).astype(np.float32)
  return LoraValue(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), tuple(a_axes), tuple(b_axes), scale, site)


def _dense_delta(x: LoraValue) -> np.ndarray:
  """``scale * sum_r a[..., r] * b[..., r]`` by explicit loops over the view's index space (numpy)."""
  a, b = np.asarray(x.a, np.float64), np.asarray(x.b, np.float64)
  out = np.zeros(x.shape)
  for idx in itertools.product(*map(range, x.shape)):
    av = a[tuple(idx[i] for i in x.a_axes)]
    bv = b[tuple(idx[i] for i in x.b_axes)]
    out[idx] = x.scale * float(av @ bv)
  return out


def _close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


# -- reshape_groups, letters ----------------------------------------------------------------


def _groups_by_prefix_products(old, new):
  """Independent reshape grouping: boundaries where the running products of the non-unit sizes meet."""
  oi = [i for i, d in enumerate(old) if d != 1]
  ni = [j for j, d in enumerate(new) if d != 1]
  if math.prod(old) != math.prod(new):
    return None
  cut_o = {math.prod(old[i] for i in oi[: k + 1]): k for k in range(len(oi))}
  cut_n = {math.prod(new[j] for j in ni[: k + 1]): k for k in range(len(ni))}
  groups, lo_o, lo_n = [], 0, 0
  for p in sorted(set(cut_o) & set(cut_n)):
    groups.append((oi[lo_o : cut_o[p] + 1], ni[lo_n : cut_n[p] + 1]))
    lo_o, lo_n = cut_o[p] + 1, cut_n[p] + 1
  return groups


@pytest.mark.parametrize(
  ("old", "new"),
  [
    ((2, 3, 4), (6, 4)),
    ((6, 4), (2, 3, 4)),
    ((4, 6), (6, 4)),  # no common boundary inside: one run
    ((1, 6, 1, 4), (6, 4, 1)),  # unit axes belong to no run
    ((2, 3, 4, 5), (3, 2, 20)),
    ((8,), (2, 2, 2)),
    ((), (1, 1)),
  ],
)
def test_reshape_groups_match_prefix_products(old, new):
  assert V.reshape_groups(old, new) == _groups_by_prefix_products(old, new)


def _random_factors(size):
  """A random shape of ``size`` elements, with unit axes sprinkled in."""
  out = []
  while size > 1:
    d = int(RNG.choice([f for f in (2, 3, 4, 6) if size % f == 0]))
    out.append(d)
    size //= d
  for _ in range(int(RNG.integers(0, 3))):
    out.insert(int(RNG.integers(0, len(out) + 1)), 1)
  return tuple(out)


def test_reshape_groups_of_random_shapes():
  for _ in range(200):
    old = _random_factors(int(RNG.choice([1, 6, 24, 36, 48, 72])))
    new = _random_factors(math.prod(old))
    assert V.reshape_groups(old, new) == _groups_by_prefix_products(old, new), (old, new)


def test_reshape_groups_of_different_sizes_is_none():
  assert V.reshape_groups((2, 3), (7,)) is None
  assert V.reshape_groups((2, 3), (2, 3, 5)) is None


def test_letters():
  lab = V.letters(52)
  assert len(set(lab)) == 52 and all(len(c) == 1 and c.isalpha() for c in lab)
  assert V.letters(3) == ["a", "b", "c"]
  with pytest.raises(ValueError, match="more than 52 axes"):
    V.letters(53)


# -- LoraValue -----------------------------------------------------------------------------

CASES = {
  "dense": ((4, 6), (0,), (1,)),
  "transposed": ((6, 4), (1,), (0,)),  # stored (out, in)
  "stacked": ((3, 4, 5), (0, 1), (0, 2)),
  "multi_axis": ((2, 3, 4, 5), (0, 1), (2, 3)),
  "reordered_factor": ((2, 3, 5), (1, 0), (2,)),  # a holds its axes as (3, 2, r)
}


@pytest.mark.parametrize("case", CASES)
def test_delta_is_the_sum_over_the_rank(case):
  x = _lora(*CASES[case])
  _close(x.delta(), _dense_delta(x))
  np.testing.assert_allclose(x.dense(), np.asarray(x.w) + _dense_delta(x), rtol=1e-5, atol=1e-5)


def test_delta_of_a_dense_kernel_is_scale_a_bt():
  x = _lora((4, 6), (0,), (1,), scale=2.5)
  _close(x.delta(), 2.5 * np.asarray(x.a, np.float64) @ np.asarray(x.b, np.float64).T)
  assert x.rank == R and x.shape == (4, 6)


@pytest.mark.parametrize("case", CASES)
def test_transpose_is_the_transposed_delta(case):
  x = _lora(*CASES[case])
  perms = list(itertools.permutations(range(len(x.shape))))
  # Every permutation in one compiled program (eagerly, each would be programs of its own).
  deltas = jax.jit(lambda x: [x.transpose(p, jnp.transpose(x.w, p)).delta() for p in perms])(x)
  for perm, delta in zip(perms, deltas):
    _close(delta, np.transpose(_dense_delta(x), perm))


@pytest.mark.parametrize(
  ("case", "new_shape"),
  [
    ("dense", (2, 2, 6)),  # split the fan-in axis
    ("dense", (4, 2, 3)),  # split the fan-out axis
    ("dense", (4, 1, 6)),  # add a unit axis (carried by b)
    ("dense", (1, 4, 6, 1)),
    ("multi_axis", (6, 20)),  # merge each factor's axes
    ("multi_axis", (6, 4, 5)),
    ("stacked", (3, 4, 5, 1)),
  ],
)
def test_reshape_is_the_reshaped_delta(case, new_shape):
  x = _lora(*CASES[case])
  y = x.reshape(new_shape, jnp.reshape(x.w, new_shape))
  assert y is not None and y.shape == new_shape
  _close(y.delta(), _dense_delta(x).reshape(new_shape))


def test_reshape_drops_unit_axes_from_the_factors():
  x = _lora((4, 6), (0,), (1,)).reshape((4, 1, 6), jnp.zeros((4, 1, 6)))
  y = x.reshape((4, 6), jnp.zeros((4, 6)))
  assert (y.a_axes, y.b_axes) == ((0,), (1,)) and y.a.shape == (4, R) and y.b.shape == (6, R)
  _close(y.delta(), _dense_delta(x).reshape(4, 6))


@pytest.mark.parametrize(
  ("case", "new_shape"),
  [
    ("dense", (24,)),  # merges a fan-in with a fan-out axis: not a factored view
    ("stacked", (12, 5)),  # merges the stacked axis (in both factors) with fan-in
    ("reordered_factor", (6, 5)),  # a run stored out of order in its factor
  ],
)
def test_reshape_across_factors_is_refused(case, new_shape):
  x = _lora(*CASES[case])
  assert x.reshape(new_shape, jnp.reshape(x.w, new_shape)) is None


@pytest.mark.parametrize("case", CASES)
def test_map_axis_slices_like_the_delta(case):
  x = _lora(*CASES[case])
  for axis in range(len(x.shape)):
    y = x.map_axis(axis, lambda f, d: jax.lax.slice_in_dim(f, 1, None, 1, d))
    idx = tuple(slice(1, None) if i == axis else slice(None) for i in range(len(x.shape)))
    _close(y.delta(), _dense_delta(x)[idx])


def test_cast_casts_both_factors_and_refuses_integers():
  x = _lora((4, 6), (0,), (1,))
  y = x.cast(jnp.bfloat16, x.w.astype(jnp.bfloat16))
  assert y.a.dtype == y.b.dtype == y.w.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y.delta(), np.float64), _dense_delta(x), rtol=0.05, atol=0.05)
  assert x.cast(jnp.int32, x.w.astype(jnp.int32)) is None


def test_factor_in_view_puts_the_rank_at_the_other_factors_axis():
  # A conv kernel (H, W, I, O) whose `a` stores its axes as (I, H, W, r).
  x = _lora((3, 2, 4, 5), (2, 0, 1), (3,))
  got = x.factor_in_view("a", 3)
  np.testing.assert_array_equal(got, np.einsum("ihwr->hwir", np.asarray(x.a)))
  # Contracting it against b over the rank gives the delta: the conv rule's two steps.
  _close(x.scale * np.einsum("hwir,or->hwio", got, np.asarray(x.b)), _dense_delta(x))
  # An embedding (V, D): A is (V, r), already in view order with the rank at D.
  e = _lora((7, 5), (0,), (1,))
  np.testing.assert_array_equal(e.factor_in_view("a", 1), e.a)


# -- Probe, axis_roles -----------------------------------------------------------------------


def _probe(shape):
  return Probe(jnp.zeros(shape), tuple((i,) for i in range(len(shape))), "k")


def test_probe_transpose_permutes_origins():
  p = _probe((2, 3, 4)).transpose((2, 0, 1), jnp.zeros((4, 2, 3)))
  assert p.origin == ((2,), (0,), (1,)) and p.shape == (4, 2, 3)


def test_probe_reshape_tracks_merged_and_split_axes():
  p = _probe((2, 3, 4))
  merged = p.reshape((6, 4), jnp.zeros((6, 4)))
  assert merged.origin == ((0, 1), (2,))
  split = merged.reshape((2, 3, 2, 2), jnp.zeros((2, 3, 2, 2)))
  assert split.origin == ((0, 1), (0, 1), (2,), (2,))
  unit = p.reshape((2, 1, 3, 4), jnp.zeros((2, 1, 3, 4)))
  assert unit.origin == ((0,), (), (1,), (2,))
  assert p.reshape((7,), jnp.zeros((7,))) is None


def test_axis_roles_maps_view_roles_to_kernel_axes():
  assert V.axis_roles(((0, 1), (2,), ()), {0: "i", 1: "o", 2: "s"}) == {0: "i", 1: "i", 2: "o"}
  assert V.axis_roles(((1,), (0,)), {0: "o"}) == {1: "o"}


def test_is_special():
  assert V.is_special(_probe((2, 2))) and V.is_special(_lora((2, 2), (0,), (1,)))
  assert not V.is_special(jnp.zeros(2)) and not V.is_special(None)


# -- FLOP counts ---------------------------------------------------------------------------


def _xla_flops(fn, *shapes):
  cost = jax.jit(fn).lower(*(jnp.ones(s) for s in shapes)).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize(("tokens", "m", "n", "r"), [(7, 5, 3, 2), (16, 8, 32, 4)])
def test_flop_counts_match_xla(tokens, m, n, r):
  # XLA counts a multiply-add as two flops, the merged kernel's add as one.
  assert 2 * V.flops_factorized(tokens, m, n, r) == _xla_flops(
    lambda x, a, b: (x @ a) @ b, (tokens, m), (m, r), (r, n)
  )
  assert 2 * V.flops_merged(m, n, r) == _xla_flops(lambda w, a, b: w + a @ b, (m, n), (m, r), (r, n)) + m * n
