"""`jlora.add_weighted` against PEFT's `add_weighted_adapter` on the same factors (needs torch and peft).

A tiny torch model with Linears ``q`` (6 -> 5), ``v`` (6 -> 7) and ``o``
(5 -> 6) carries PEFT adapters with random factors; jlora gets the same
factors transposed (PEFT's ``lora_A.weight`` is ``(r, in)``, jlora's Dense
``lora_A`` ``(in, r)``). The combined updates ``scale * A @ B`` must agree to
1e-5 (the SVD methods are compared by update, as an SVD's signs are arbitrary).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SHAPES = {"q": (6, 5), "v": (6, 7), "o": (5, 6)}  # (in, out)
PARAMS = {m: {"kernel": jnp.zeros(s, jnp.float32)} for m, s in SHAPES.items()}
TOL = 1e-5


class _Tiny(torch.nn.Module):
  def __init__(self):
    super().__init__()
    for m, (i, o) in SHAPES.items():
      setattr(self, m, torch.nn.Linear(i, o))


# (name, r, alpha, targets, alpha_pattern)
ADAPTERS = [
  ("one", 4, 8.0, ("q", "v"), {}),
  ("two", 4, 2.0, ("q", "o"), {"o": 6.0}),
  ("three", 2, 3.0, ("q", "v"), {}),
]


def _peft_model(specs):
  torch.manual_seed(0)
  model = None
  for name, r, alpha, targets, alpha_pattern in specs:
    cfg = peft.LoraConfig(
      r=r,
      lora_alpha=alpha,
      target_modules=list(targets),
      alpha_pattern=alpha_pattern,
      init_lora_weights=False,
    )
    if model is None:
      model = peft.get_peft_model(_Tiny(), cfg, adapter_name=name)
    else:
      model.add_adapter(name, cfg)
  return model


def _jlora_adapter(model, name, r, alpha, targets, alpha_pattern):  # noqa: PLR0917
  lora = {}
  for m in targets:
    layer = getattr(model.base_model.model, m)
    a = layer.lora_A[name].weight.detach().numpy().T
    b = layer.lora_B[name].weight.detach().numpy().T
    lora[m] = {"kernel": {"lora_A": jnp.asarray(a), "lora_B": jnp.asarray(b)}}
  cfg = jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern)
  return lora, cfg


def _peft_deltas(model, name):
  out = {}
  for m in SHAPES:
    layer = getattr(model.base_model.model, m)
    if hasattr(layer, "lora_A") and name in layer.lora_A:
      b = layer.lora_B[name].weight.detach().numpy()
      a = layer.lora_A[name].weight.detach().numpy()
      out[m] = layer.scaling[name] * (b @ a).T
  return out


def _jlora_deltas(lora, cfg):
  return {
    m: cfg.scale_for(m)
    * np.asarray(node["kernel"]["lora_A"], np.float64)
    @ np.asarray(node["kernel"]["lora_B"], np.float64)
    for m, node in lora.items()
  }


def _both(specs, weights, method, **kw):
  model = _peft_model(specs)
  pairs = [_jlora_adapter(model, *s) for s in specs]
  peft_kw = {k: v for k, v in kw.items() if k in ("density", "majority_sign_method", "svd_clamp")}
  if "r" in kw:
    peft_kw["svd_rank"] = kw["r"]
  model.add_weighted_adapter([s[0] for s in specs], weights, "mix", combination_type=method, **peft_kw)
  lora, cfg = jlora.add_weighted(pairs, weights, method=method, **kw)
  return model, lora, cfg


DETERMINISTIC = [
  ("linear", {}),
  ("ties", {"density": 0.5}),
  ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
  ("magnitude_prune", {"density": 0.6}),
  ("cat", {}),
  ("svd", {}),
  ("svd", {"r": 3}),
  ("ties_svd", {"density": 0.5, "r": 3}),
  ("magnitude_prune_svd", {"density": 0.7}),
  ("svd", {"r": 2, "svd_clamp": 0.9}),
]


@pytest.mark.parametrize("method,kw", DETERMINISTIC, ids=[f"{m}-{k}" for m, k in DETERMINISTIC])
def test_matches_peft(method, kw):
  specs = ADAPTERS[:2]  # same rank: every method applies
  model, lora, cfg = _both(specs, [0.7, -0.3], method, **kw)
  want = _peft_deltas(model, "mix")
  got = _jlora_deltas(lora, cfg)
  assert sorted(got) == sorted(want) == ["o", "q", "v"]  # the union of the targets
  for m in want:
    np.testing.assert_allclose(got[m], want[m], atol=TOL, rtol=TOL, err_msg=f"{method} at {m}")
  peft_cfg = model.peft_config["mix"]
  assert (cfg.r, cfg.lora_alpha) == (peft_cfg.r, peft_cfg.lora_alpha)
  assert set(cfg.target_modules) == set(peft_cfg.target_modules)
  assert cfg.scale_for("q") == 1.0


@pytest.mark.parametrize(
  "method,kw", [("cat", {}), ("svd", {}), ("svd", {"r": 5}), ("ties_svd", {"density": 0.4})]
)
def test_matches_peft_mixed_ranks(method, kw):
  model, lora, cfg = _both(ADAPTERS, [0.5, 0.2, 1.5], method, **kw)
  want = _peft_deltas(model, "mix")
  got = _jlora_deltas(lora, cfg)
  for m in want:
    np.testing.assert_allclose(got[m], want[m], atol=TOL, rtol=TOL, err_msg=f"{method} at {m}")
  assert cfg.r == model.peft_config["mix"].r == {"cat": 10, "svd": kw.get("r", 4), "ties_svd": 4}[method]


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_matches_peft_with_rank_pattern(method):
  """A `rank_pattern` rank counts as PEFT's adapter rank (the largest): cat sums them, svd takes the
  largest, and the kernels of smaller rank are zero-padded to the result's rank."""
  specs = [("one", 4, 8.0, ("q", "v"), {}), ("two", 3, 6.0, ("q", "v"), {})]
  model = None
  torch.manual_seed(1)
  for name, r, alpha, targets, _ in specs:
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), rank_pattern={"v": 2},
                          init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(_Tiny(), cfg, adapter_name=name) if model is None else model
    if name not in model.peft_config:
      model.add_adapter(name, cfg)
  pairs = []
  for name, r, alpha, targets, _ in specs:
    lora, _ = _jlora_adapter(model, name, r, alpha, targets, {})
    pairs.append(
      (lora, jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern={"v": 2}))
    )
  if method == "linear":  # PEFT's rule: the adapters' ranks (4 and 3) differ
    with pytest.raises(ValueError, match=r"one rank .*\[4, 3\]"):
      jlora.add_weighted(pairs, [0.6, 0.9], method=method)
    return
  model.add_weighted_adapter(["one", "two"], [0.6, 0.9], "mix", combination_type=method)
  lora, cfg = jlora.add_weighted(pairs, [0.6, 0.9], method=method)
  want, got = _peft_deltas(model, "mix"), _jlora_deltas(lora, cfg)
  for m in want:
    np.testing.assert_allclose(got[m], want[m], atol=TOL, rtol=TOL, err_msg=f"{method} at {m}")
  assert cfg.r == model.peft_config["mix"].r == {"cat": 7, "svd": 4}[method]
  assert lora["v"]["kernel"]["lora_A"].shape == (6, cfg.r)


def test_linear_and_cat_are_the_combination():
  """cat gives exactly sum_k w_k * delta_k; linear gives its cross-term form."""
  model = _peft_model(ADAPTERS)
  pairs = [_jlora_adapter(model, *s) for s in ADAPTERS]
  weights = [0.5, -1.0, 2.0]
  want = {m: 0.0 for m in SHAPES}
  for (lora, cfg), w in zip(pairs, weights):
    for m, d in _jlora_deltas(lora, cfg).items():
      want[m] = want[m] + w * d
  lora, cfg = jlora.add_weighted(pairs, weights, method="cat")
  got = _jlora_deltas(lora, cfg)
  for m in SHAPES:
    np.testing.assert_allclose(got[m], want[m], atol=TOL, rtol=TOL)
  # linear: A = sum sign*sqrt|w s| A_k, B = sum sqrt|w s| B_k (one kernel, two adapters of rank 4).
  (la, ca), (lb, cb) = pairs[:2]
  lora, cfg = jlora.add_weighted([(la, ca), (lb, cb)], [0.5, -1.0], method="linear")
  fa = (ca.scale_for("q") * 0.5) ** 0.5
  fb = (cb.scale_for("q") * 1.0) ** 0.5
  qa, qb = la["q"]["kernel"], lb["q"]["kernel"]
  a = fa * np.asarray(qa["lora_A"]) - fb * np.asarray(qb["lora_A"])
  b = fa * np.asarray(qa["lora_B"]) + fb * np.asarray(qb["lora_B"])
  np.testing.assert_allclose(_jlora_deltas(lora, cfg)["q"], a @ b, atol=TOL, rtol=TOL)


def _pairs():
  return [_jlora_adapter(_peft_model(ADAPTERS[:2]), *s) for s in ADAPTERS[:2]]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_deterministic_and_density_one_is_its_base(method):
  pairs = _pairs()
  kw = {"r": 4} if method.endswith("svd") else {}
  one, _ = jlora.add_weighted(pairs, [0.7, 0.3], method=method, density=0.5, key=jax.random.key(3), **kw)
  two, _ = jlora.add_weighted(pairs, [0.7, 0.3], method=method, density=0.5, key=jax.random.key(3), **kw)
  other, _ = jlora.add_weighted(pairs, [0.7, 0.3], method=method, density=0.5, key=jax.random.key(4), **kw)
  jax.tree.map(np.testing.assert_array_equal, one, two)
  assert not np.array_equal(one["q"]["kernel"]["lora_A"], other["q"]["kernel"]["lora_A"])
  base = method.replace("dare_", "").replace("linear_svd", "svd")
  base_kw = {"density": 1.0} if "ties" in base else {}
  full, cfg = jlora.add_weighted(pairs, [0.7, 0.3], method=method, density=1.0, key=jax.random.key(3), **kw)
  ref, ref_cfg = jlora.add_weighted(pairs, [0.7, 0.3], method=base, **base_kw, **kw)
  got, want = _jlora_deltas(full, cfg), _jlora_deltas(ref, ref_cfg)
  for m in want:
    np.testing.assert_allclose(got[m], want[m], atol=TOL, rtol=TOL)


def test_dare_keeps_density_of_entries_rescaled():
  """One adapter of rank 64 (weight 1, scale 1): the merged A is A * mask / density."""
  params = {"w": {"kernel": jnp.zeros((256, 128))}}
  pairs = []
  for seed in range(2):
    cfg = jlora.LoraConfig(r=64, lora_alpha=64.0, target_modules=("w",), init_lora_weights=False)
    pairs.append((jlora.init(params, cfg, key=jax.random.key(seed)), cfg))
  zero = jax.tree.map(jnp.zeros_like, pairs[1][0])
  lora, _ = jlora.add_weighted(
    [pairs[0], (zero, pairs[1][1])], [1.0, 1.0], method="dare_linear", density=0.3, key=jax.random.key(0)
  )
  a0 = np.asarray(pairs[0][0]["w"]["kernel"]["lora_A"])
  a = np.asarray(lora["w"]["kernel"]["lora_A"])
  kept = a != 0
  assert abs(kept.mean() - 0.3) < 0.01  # 16384 entries: the std of the kept fraction is 0.0036
  np.testing.assert_allclose(a[kept], a0[kept] / 0.3, rtol=1e-6)


def test_stacked_kernel_prunes_per_entry():
  """A kernel stacked over 3 layers is 3 PEFT modules: ties on it equals ties on each layer alone."""
  params = {"w": {"kernel": jnp.zeros((3, 6, 5))}}
  layout = {"w": "sio"}
  pairs = []
  for seed in range(2):
    cfg = jlora.LoraConfig(
      r=2, lora_alpha=4.0, target_modules=("w",), layout_pattern=layout, init_lora_weights=False
    )
    pairs.append((jlora.init(params, cfg, key=jax.random.key(seed)), cfg))
  for method, kw in [("ties", {"density": 0.4}), ("magnitude_prune_svd", {"density": 0.5, "r": 2})]:
    lora, cfg = jlora.add_weighted(pairs, [0.6, 0.4], method=method, **kw)
    for layer in range(3):
      plain = jlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=("w",))
      sliced = [
        ({"w": {"kernel": {f: x[layer] for f, x in lo["w"]["kernel"].items()}}}, plain) for lo, _ in pairs
      ]
      one, one_cfg = jlora.add_weighted(sliced, [0.6, 0.4], method=method, **kw)
      got = np.asarray(lora["w"]["kernel"]["lora_A"][layer]) @ np.asarray(
        lora["w"]["kernel"]["lora_B"][layer]
      )
      want = _jlora_deltas(one, one_cfg)["w"]
      np.testing.assert_allclose(got * cfg.scale_for("w"), want, atol=TOL, rtol=TOL)


def test_nd_kernel_svd_is_the_combination():
  """An "oio" kernel (N, D, H): svd at full rank reproduces sum_k w_k delta_k in the kernel's shape."""
  params = {"q_einsum": {"kernel": jnp.zeros((2, 6, 3))}}
  pairs = []
  for seed, r in enumerate((2, 3)):
    cfg = jlora.LoraConfig(
      r=r, lora_alpha=2.0 * r, target_modules=("q_einsum",), layout_pattern={"q_einsum": "oio"},
      init_lora_weights=False,
    )  # fmt: skip
    pairs.append((jlora.init(params, cfg, key=jax.random.key(seed)), cfg))
  weights = [0.3, -0.8]
  lora, cfg = jlora.add_weighted(pairs, weights, method="svd", r=5, base=params)
  merged = jlora.merge(params, lora, cfg)["q_einsum"]["kernel"]
  want = sum(w * jlora.merge(params, lo, c)["q_einsum"]["kernel"] for (lo, c), w in zip(pairs, weights))
  np.testing.assert_allclose(merged, want, atol=TOL, rtol=TOL)
  assert lora["q_einsum"]["kernel"]["lora_A"].shape == (5, 6)
  assert lora["q_einsum"]["kernel"]["lora_B"].shape == (2, 5, 3)


def test_one_adapter_is_linear():
  (la, ca), _ = _pairs()
  lora, cfg = jlora.add_weighted([(la, ca)], [0.5], method="svd")
  got, want = _jlora_deltas(lora, cfg), _jlora_deltas(la, ca)
  for m in want:
    np.testing.assert_allclose(got[m], 0.5 * want[m], atol=TOL, rtol=TOL)
  assert cfg.r == ca.r


def test_errors():
  pairs = _pairs()
  (la, ca), (lb, cb) = pairs
  c2 = jlora.LoraConfig(r=2, lora_alpha=2.0, target_modules=("q",))
  l2 = {"q": {"kernel": {"lora_A": jnp.ones((6, 2)), "lora_B": jnp.ones((2, 5))}}}
  with pytest.raises(ValueError, match="one of"):
    jlora.add_weighted(pairs, [1, 1], method="average")
  with pytest.raises(ValueError, match="one rank"):
    jlora.add_weighted([(la, ca), (l2, c2)], [1, 1], method="linear")
  with pytest.raises(ValueError, match="needs `density`"):
    jlora.add_weighted(pairs, [1, 1], method="ties")
  with pytest.raises(ValueError, match="`density` must be None"):
    jlora.add_weighted(pairs, [1, 1], method="linear", density=0.5)
  with pytest.raises(ValueError, match="pass `key="):
    jlora.add_weighted(pairs, [1, 1], method="dare_linear", density=0.5)
  with pytest.raises(ValueError, match="deterministic"):
    jlora.add_weighted(pairs, [1, 1], method="ties", density=0.5, key=jax.random.key(0))
  with pytest.raises(ValueError, match="`r` is the rank of an SVD"):
    jlora.add_weighted(pairs, [1, 1], method="linear", r=2)
  with pytest.raises(ValueError, match="one per adapter"):
    jlora.add_weighted(pairs, [1.0], method="linear")
  with pytest.raises(ValueError, match=r"`weights` must be 2 finite numbers.*got None"):
    jlora.add_weighted(pairs, None)
  for bad in (math.nan, math.inf, -math.inf):
    with pytest.raises(ValueError, match=rf"`weights\[1\]` is {bad!r}, which would make every combined"):
      jlora.add_weighted(pairs, [0.5, bad], method="svd")
  with pytest.raises(ValueError, match="no rank-6 SVD"):
    jlora.add_weighted(pairs, [1, 1], method="svd", r=6)
  # Adapters for different bases: q is (6, 5) for one, (6, 9) for the other.
  other = {"q": {"kernel": {"lora_A": jnp.ones((6, 4)), "lora_B": jnp.ones((4, 9))}}}
  with pytest.raises(ValueError, match="different bases"):
    jlora.add_weighted([(la, ca), (other, jlora.LoraConfig(r=4, target_modules=("q",)))], [1, 1])
  with pytest.raises(ValueError, match="mix lists and regex"):
    jlora.add_weighted([(la, ca), (l2, jlora.LoraConfig(r=2, target_modules="q"))], [1, 1], method="cat")
  with pytest.raises(ValueError, match="different `layers_to_transform`"):
    cfg = jlora.LoraConfig(r=2, target_modules=("q",), layers_to_transform=0)
    jlora.add_weighted([(l2, c2), (l2, cfg)], [1, 1], method="cat")
  with pytest.raises(ValueError, match="modules_to_save"):
    cfg = jlora.LoraConfig(r=2, target_modules=("q",), modules_to_save=("o",))
    jlora.add_weighted([(l2, c2), (l2, cfg)], [1, 1], method="cat")
  with pytest.raises(TypeError, match="LoraConfig"):
    jlora.add_weighted([(l2, {"r": 2})], [1])


def test_dora_adapters_are_refused_as_peft_combines_no_magnitudes():
  """PEFT's result keeps its new adapter's initial magnitudes (checked below), so jlora refuses."""
  cfg = jlora.LoraConfig(r=2, target_modules=("q",), init_lora_weights=False, use_dora=True)
  lora = jlora.init(PARAMS | {"q": {"kernel": jnp.ones((6, 5))}}, cfg, key=jax.random.key(0))
  (la, ca), _ = _pairs()
  for pairs in ([(la, ca), (lora, cfg)], [(lora, cfg)]):
    with pytest.raises(
      ValueError, match=rf"`adapters\[{len(pairs) - 1}\]` is a DoRA adapter .*`jlora.merge`"
    ):
      jlora.add_weighted(pairs, [0.5] * len(pairs))
  torch.manual_seed(0)
  pcfg = peft.LoraConfig(r=2, target_modules=["q"], init_lora_weights=True, use_dora=True)
  model = peft.get_peft_model(_Tiny(), pcfg, adapter_name="one")
  model.add_adapter("two", pcfg)
  q = model.base_model.model.q
  with torch.no_grad():
    for name in ("one", "two"):
      q.lora_magnitude_vector[name].weight.mul_(3.0)  # trained magnitudes, far from the kernel norms
      q.lora_B[name].weight.normal_()
  model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", combination_type="linear")
  got = q.lora_magnitude_vector["mix"].weight.detach().numpy()  # the norms of W: the init's, not 3x
  np.testing.assert_allclose(got, np.linalg.norm(q.base_layer.weight.detach().numpy(), axis=1), rtol=1e-6)


def test_peft_rslora_scale_differs():
  """PEFT copies `use_rslora` into its result (scale sqrt(r)); jlora's result has scale 1."""
  specs = ADAPTERS[:2]
  torch.manual_seed(0)
  model = None
  for name, r, alpha, targets, _ in specs:
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=True,
                          init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(_Tiny(), cfg, adapter_name=name) if model is None else model
    if name not in model.peft_config:
      model.add_adapter(name, cfg)
  model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat")
  assert model.base_model.model.q.scaling["mix"] == pytest.approx(math.sqrt(8))
  pairs = []
  for name, r, alpha, targets, _ in specs:
    lo, _ = _jlora_adapter(model, name, r, alpha, targets, {})
    pairs.append((lo, jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=True)))
  lora, cfg = jlora.add_weighted(pairs, [1.0, 1.0], method="cat")
  assert not cfg.use_rslora and cfg.scale_for("q") == 1.0
  want = sum(_jlora_deltas(lo, c)["q"] for lo, c in pairs)
  np.testing.assert_allclose(_jlora_deltas(lora, cfg)["q"], want, atol=TOL, rtol=TOL)
  peft_q = _peft_deltas(model, "mix")["q"]
  np.testing.assert_allclose(peft_q, math.sqrt(8) * want, atol=1e-4, rtol=1e-4)


def test_all_linear_combines_with_a_list_by_the_adapted_modules():
  """PEFT expands 'all-linear' to the model's linear modules before combining: the result names them."""
  keys = iter(jax.random.split(jax.random.key(7), 3))
  base = {m: {"kernel": jax.random.normal(next(keys), s)} for m, s in SHAPES.items()}
  listed = jlora.LoraConfig(r=2, lora_alpha=4.0, target_modules=("q", "v"), init_lora_weights=False)
  linear = jlora.LoraConfig(r=3, lora_alpha=3.0, target_modules="all-linear", init_lora_weights=False)
  pairs = [(jlora.init(base, c, key=jax.random.key(i)), c) for i, c in enumerate((listed, linear))]
  weights = [0.5, -1.5]
  lora, cfg = jlora.add_weighted(pairs, weights, method="cat", base=base)
  assert sorted(cfg.target_modules) == ["o", "q", "v"] and cfg.r == 5
  merged = jlora.merge(base, lora, cfg)
  for m in SHAPES:  # by hand: W + sum_k w_k * (alpha_k / r_k) * A_k @ B_k over the adapters of m
    want = np.asarray(base[m]["kernel"], np.float64)
    for (lo, c), w in zip(pairs, weights):
      if m in lo:
        ab = np.asarray(lo[m]["kernel"]["lora_A"], np.float64) @ np.asarray(lo[m]["kernel"]["lora_B"])
        want = want + w * c.lora_alpha / c.r * ab
    np.testing.assert_allclose(merged[m]["kernel"], want, atol=TOL, rtol=TOL, err_msg=m)
  assert "o" not in pairs[0][0] and np.abs(merged["o"]["kernel"] - base["o"]["kernel"]).max() > 1e-2


def test_a_grouped_conv_adapter_is_refused():
  params = {"g": {"kernel": jnp.ones((3, 3, 2, 4))}}  # HWIO of a convolution with feature_group_count=2

  def fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
      x, p["g"]["kernel"], (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
    )

  x = jnp.ones((1, 5, 5, 4))
  cfg = jlora.LoraConfig(r=2, target_modules=("g",))
  lora = jlora.init(params, cfg, key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  assert lora["g"]["kernel"]["lora_A"].shape == (3, 3, 4, 2)  # over all 4 input channels
  for method in ("linear", "cat", "svd"):
    with pytest.raises(ValueError, match=r"'g/kernel' adapts a grouped convolution.*does not combine it"):
      jlora.add_weighted([(lora, cfg), (lora, cfg)], [0.5, 0.5], method=method, base=params)
