"""Nothing silent: a battery of wrong inputs to config, targets, adapters, merge and wrap.

Each case is ``(id, call, exception type, message regex)``: the call must raise
jlora's own exception (never an AttributeError/KeyError/TypeError from inside
numpy or jax, never a silently wrong result) whose message names the field or
parameter path and the fix. Trees are tiny and nothing is jitted, so the whole
table runs in seconds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

KEY = jax.random.key(0)
CFG = jlora.LoraConfig(r=2, target_modules=("q_proj", "v_proj"), init_lora_weights=False)


def _layer():
  return {
    "q_proj": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
    "v_proj": {"kernel": jnp.ones((4, 3))},
  }


@functools.cache
def _tree():
  return {"layers_0": _layer(), "layers_1": _layer(), "head": {"kernel": jnp.ones((4, 2))}}


@functools.cache
def _lora(cfg=CFG):
  return jlora.init(_tree(), cfg, key=KEY)


def _edit(tree, path, value=None, drop=False):
  """A copy of a nested dict with ``path`` set to ``value`` (or removed)."""
  out = jax.tree_util.tree_map(lambda x: x, tree)  # new dicts, same arrays
  node = out
  for k in path[:-1]:
    node = node.setdefault(k, {})
  if drop:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return out


def _pair(shape_a=(4, 2), shape_b=(2, 3)):
  return {"lora_A": jnp.ones(shape_a), "lora_B": jnp.ones(shape_b)}


def _cfg(**kw):
  return jlora.LoraConfig(**{"r": 2, "target_modules": ("q_proj", "v_proj"), **kw})


def _fn(params, x):
  """A plain model of ``_tree()``: every kernel used as a linear layer."""
  for name in ("layers_0", "layers_1"):
    layer = params[name]
    x = jnp.tanh(x @ layer["q_proj"]["kernel"] + layer["q_proj"]["bias"]) @ layer["v_proj"]["kernel"].T
  return x @ params["head"]["kernel"]


X = jnp.ones((2, 4))


def _wrapped(cfg=CFG, **kw):
  return jlora.wrap(_fn, cfg, **kw)


def _w_tree():
  """A model whose linear weight is a leaf named ``w``: only the model tells 'all-linear' it is linear."""
  return {"enc": {"kernel": jnp.ones((4, 4)), "w": jnp.ones((4, 3))}}


def _w_fn(params, x):
  return (x @ params["enc"]["kernel"]) @ params["enc"]["w"]


ALL_LINEAR = jlora.LoraConfig(r=2, target_modules="all-linear")


def _int8_tree():
  return {"q_proj": {"kernel": jnp.full((4, 3), 100, jnp.int8)}, "v_proj": {"kernel": jnp.ones((4, 3))}}


def _merge(lora, cfg=CFG, tree=None, **kw):
  return lambda: jlora.merge(_tree() if tree is None else tree, lora() if callable(lora) else lora, cfg, **kw)


def _bad_fp16():
  tree = {"q_proj": {"kernel": jnp.full((4, 3), 60000.0, jnp.float16)}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), dtype="float32")
  lora = {"q_proj": {"kernel": {"lora_A": jnp.full((4, 2), 100.0), "lora_B": jnp.full((2, 3), 100.0)}}}
  return jlora.merge(tree, lora, cfg, safe_merge=True)


def _no_head_copy():
  cfg = _cfg(modules_to_save=("head",))
  return jlora.merge(_tree(), _lora(_cfg(init_lora_weights=False)), cfg)


def _extra_head_copy():
  lora = _edit(_lora(), ("head", "kernel"), jnp.ones((4, 2)))
  return jlora.merge(_tree(), lora, CFG)


CASES = [
  # -- config ------------------------------------------------------------------------------------
  (
    "config-target-modules-int",
    lambda: _cfg(target_modules=5),
    TypeError,
    r"`target_modules` must be a string \(regex\), or a list/tuple of module names; got int: 5",
  ),
  (
    "config-alpha-pattern-bad-regex",
    lambda: _cfg(alpha_pattern={"q_proj[": 2.0}),
    ValueError,
    r"`alpha_pattern` pattern 'q_proj\[' is not a valid regex",
  ),
  (
    "config-rank-pattern-flag-not-at-start",  # compiles alone; not as jlora matches it (a path suffix)
    lambda: _cfg(rank_pattern={"(?i)q_proj": 4}),
    ValueError,
    r"`rank_pattern` pattern '\(\?i\)q_proj' is not a valid regex \(jlora matches it as .*'\(\?i:q_proj\)'",
  ),
  (
    "config-lora-alpha-past-float32",
    lambda: _cfg(lora_alpha=1e39),
    ValueError,
    r"`lora_alpha` must be a finite number > 0 and at most 3\.403e\+38 .*float32.*got 1e\+39",
  ),
  (
    "config-alpha-pattern-past-float32",
    lambda: _cfg(alpha_pattern={"q_proj": 1e39}),
    ValueError,
    r"`alpha_pattern\['q_proj'\]` must be a finite number > 0 and at most 3\.403e\+38",
  ),
  (
    "apply-dropout-key-int",
    lambda: _wrapped(_cfg(lora_dropout=0.1))(_tree(), _lora(), X, lora_dropout_key=3),
    TypeError,
    r"`lora_dropout_key` must be a PRNG key such as `jax.random.key\(0\)`.*got int 3",
  ),
  (
    "apply-dropout-key-batch",
    lambda: _wrapped(_cfg(lora_dropout=0.1))(_tree(), _lora(), X, lora_dropout_key=jax.random.split(KEY, 4)),
    ValueError,
    r"`lora_dropout_key` must be one PRNG key; got a batch of keys of shape \(4,\)",
  ),
  (
    "apply-dropout-raw-key-batch",
    lambda: _wrapped(_cfg(lora_dropout=0.1))(
      _tree(), _lora(), X, lora_dropout_key=jax.random.split(jax.random.PRNGKey(0), 4)
    ),
    ValueError,
    r"`lora_dropout_key` must be one PRNG key; got a batch of keys of shape \(4, 2\)",
  ),
  (
    "add-weighted-weights-none",
    lambda: jlora.add_weighted([(_lora(), CFG), (_lora(), CFG)], None),
    ValueError,
    r"`weights` must be 2 finite numbers, one per adapter \(e.g. weights=\[0.5, 0.5\]\); got None",
  ),
  (
    "ltt-float",
    lambda: _cfg(layers_to_transform=1.5),
    TypeError,
    r"`layers_to_transform` must be an int or a list",
  ),
  (
    "ltt-str",
    lambda: _cfg(layers_to_transform="3"),
    TypeError,
    r"`layers_to_transform` must be an int.*got str",
  ),
  ("ltt-dict", lambda: _cfg(layers_to_transform={0: 1}), TypeError, r"`layers_to_transform` must be an int"),
  (
    "ltt-empty",
    lambda: _cfg(layers_to_transform=[]),
    ValueError,
    r"`layers_to_transform` must be non-negative",
  ),
  (
    "ltt-float-item",
    lambda: _cfg(layers_to_transform=[0, 1.0]),
    ValueError,
    r"`layers_to_transform` must be",
  ),
  (
    "target-equals-saved",
    lambda: _cfg(target_modules=("head",), modules_to_save=("head",)),
    ValueError,
    r"`target_modules` and `modules_to_save` both name \['head'\]",
  ),
  (
    "target-overlaps-saved",
    lambda: _cfg(modules_to_save=["v_proj", "head"]),
    ValueError,
    r"both name \['v_proj'\].*remove it from one",
  ),
  (
    "saved-empty-string",
    lambda: _cfg(modules_to_save=""),
    ValueError,
    r"`modules_to_save` must not be an empty",
  ),
  (
    "exclude-not-str",
    lambda: _cfg(exclude_modules=[1]),
    ValueError,
    r"`exclude_modules` must hold non-empty strings",
  ),
  ("alpha-bool", lambda: _cfg(lora_alpha=True), TypeError, r"`lora_alpha` must be a number"),
  ("dropout-str", lambda: _cfg(lora_dropout="0.1"), ValueError, r"`lora_dropout` must be a number"),
  (
    "alpha-pattern-str",
    lambda: _cfg(alpha_pattern={"q": "2"}),
    ValueError,
    r"`alpha_pattern\['q'\]` must be",
  ),
  (
    "layout-pattern-list",
    lambda: _cfg(layout_pattern=["io"]),
    TypeError,
    r"`layout_pattern` must be a mapping",
  ),
  (
    "from-dict-bad-r",
    lambda: jlora.LoraConfig.from_dict({"target_modules": ["q"], "r": "8"}),
    ValueError,
    r"`r`",
  ),
  # -- a config that is not a LoraConfig ----------------------------------------------------------
  (
    "init-dict-config",
    lambda: jlora.init(_tree(), {"r": 2}, key=KEY),
    TypeError,
    r"`config` must be .*from_dict",
  ),
  (
    "init-none-config",
    lambda: jlora.init(_tree(), None, key=KEY),
    TypeError,
    r"`config` must be a jlora.LoraConfig",
  ),
  (
    "wrap-dict-config",
    lambda: jlora.wrap(_fn, CFG.to_dict()),
    TypeError,
    r"`config` must be a jlora.LoraConfig",
  ),
  (
    "wrap-none-config",
    lambda: jlora.wrap(_fn, None),
    TypeError,
    r"`config` must be a jlora.LoraConfig; got NoneType",
  ),
  (
    "merge-dict-config",
    _merge(_lora, cfg={"r": 2}),
    TypeError,
    r"`config` must be a jlora.LoraConfig; got dict",
  ),
  ("merge-none-config", _merge(_lora, cfg=None), TypeError, r"`config` must be a jlora.LoraConfig"),
  (
    "unmerge-dict-config",
    lambda: jlora.unmerge(_tree(), _lora(), {"r": 2}),
    TypeError,
    r"`config` must be a jlora.LoraConfig",
  ),
  # -- targets -----------------------------------------------------------------------------------
  (
    "int8-kernel-by-name",
    lambda: jlora.init(_int8_tree(), _cfg(), key=KEY),
    ValueError,
    r"entry 'q_proj' matches 'q_proj/kernel', an integer \(int8\) kernel: LoRA cannot adapt an integer "
    r"\(quantized\) kernel.*Dequantize",
  ),
  (
    "int8-kernel-by-param-path",
    lambda: jlora.init(_int8_tree(), _cfg(target_modules=("q_proj/kernel",)), key=KEY),
    ValueError,
    r"an integer \(int8\) kernel",
  ),
  (
    "all-saved-nothing-left",
    lambda: jlora.init(
      _tree(), _cfg(target_modules=".*_proj", modules_to_save=("q_proj", "v_proj")), key=KEY
    ),
    ValueError,
    r"leaves nothing to adapt \(a module in `modules_to_save` is trained in full",
  ),
  (
    "all-excluded",
    lambda: jlora.init(_tree(), _cfg(exclude_modules=("q_proj", "v_proj")), key=KEY),
    ValueError,
    r"leaves nothing to adapt",
  ),
  (
    "target-typo",
    lambda: jlora.init(_tree(), _cfg(target_modules=("q_prj",)), key=KEY),
    ValueError,
    r"'q_prj'",
  ),
  (
    "ltt-out-of-range",
    lambda: jlora.init(_tree(), _cfg(layers_to_transform=5), key=KEY),
    ValueError,
    r"selects none",
  ),
  (
    "layout-pattern-wrong-rank",
    lambda: jlora.init(_tree(), _cfg(layout_pattern={"q_proj": "sio"}), key=KEY),
    ValueError,
    r"`layout_pattern` gives 'sio' for kernel 'layers_0/q_proj/kernel'",
  ),
  # -- adapter trees that do not agree with the config ---------------------------------------------
  (
    "missing-v-proj",
    _merge(lambda: _edit(_lora(), ("layers_1", "v_proj"), drop=True)),
    ValueError,
    r"no adapter for \['layers_1/v_proj/kernel'\], which the config targets \(`target_modules`=\('q_proj', "
    r"'v_proj'\)\).*`jlora.init`",
  ),
  (
    "missing-layer",
    _merge(lambda: _edit(_lora(), ("layers_1",), drop=True)),
    ValueError,
    r"no adapter for \['layers_1/q_proj/kernel', 'layers_1/v_proj/kernel'\]",
  ),
  ("lora-none", _merge(None), TypeError, r"`lora` must be the adapter tree .*got NoneType"),
  ("lora-empty", _merge({}), ValueError, r"The adapter tree is empty: nothing would be adapted"),
  (
    "lora-array",
    _merge(jnp.ones((4, 2))),
    TypeError,
    r"`lora` must be the adapter tree.*ArrayImpl of shape \(4, 2\)",
  ),
  ("lora-is-base", _merge(_tree), ValueError, r"holds no adapter .*Is it the base tree\?"),
  (
    "adapter-on-untargeted",
    _merge(lambda: _edit(_lora(), ("head", "kernel"), _pair((4, 2), (2, 2)))),
    ValueError,
    r"adapter at 'head/kernel', but the config does not adapt that kernel: no `target_modules` entry matches",
  ),
  (
    "adapter-on-excluded",
    _merge(_lora, cfg=_cfg(exclude_modules=("layers_1/v_proj",))),
    ValueError,
    r"'layers_1/v_proj/kernel'.*`exclude_modules`=\('layers_1/v_proj',\) excludes it",
  ),
  (
    "adapter-on-deselected-layer",
    _merge(_lora, cfg=_cfg(layers_to_transform=0)),
    ValueError,
    r"'layers_1/q_proj/kernel', but `layers_to_transform`=\(0,\) does not select it \(layer 1\)",
  ),
  (
    "adapter-on-saved-module",
    _merge(_lora, cfg=_cfg(target_modules=".*_proj", modules_to_save=("v_proj",))),
    ValueError,
    r"'layers_0/v_proj/kernel'.*its module is in `modules_to_save`",
  ),
  (
    "adapter-on-bias",
    _merge(lambda: _edit(_lora(), ("layers_0", "q_proj", "bias"), _pair((3,), (3,)))),
    ValueError,
    r"'layers_0/q_proj/bias'.*1-D leaf",
  ),
  (
    "adapter-on-head-all-linear",
    _merge(lambda: _edit(_lora(ALL_LINEAR), ("head", "kernel"), _pair((4, 2), (2, 2))), cfg=ALL_LINEAR),
    ValueError,
    r"'head/kernel'.*'all-linear' never adapts the output head",
  ),
  ("missing-saved-copy", _no_head_copy, ValueError, r"no trained copy of \['head/kernel'\], whose module"),
  (
    "extra-full-copy",
    _extra_head_copy,
    ValueError,
    r"full copy of 'head/kernel', but `modules_to_save`=None",
  ),
  (
    "array-where-adapter",
    _merge(lambda: _edit(_lora(), ("layers_0", "q_proj", "kernel"), jnp.ones((4, 3)))),
    ValueError,
    r"plain array at 'layers_0/q_proj/kernel', where the config adapts the kernel with LoRA",
  ),
  (
    "half-adapter",
    _merge(lambda: _edit(_lora(), ("layers_0", "q_proj", "kernel"), {"lora_A": jnp.ones((4, 2))})),
    ValueError,
    r"adapter at 'layers_0/q_proj/kernel' is not a dict of exactly 'lora_A' and 'lora_B'",
  ),
  (
    "adapter-extra-key",
    _merge(lambda: _edit(_lora(), ("layers_0", "q_proj", "kernel"), {**_pair(), "scale": jnp.ones(())})),
    ValueError,
    r"not a dict of exactly 'lora_A' and 'lora_B'",
  ),
  (
    "adapter-off-tree",
    _merge(lambda: _edit(_lora(), ("layers_9",), {"q_proj": {"kernel": _pair()}})),
    ValueError,
    r"entry at 'layers_9/q_proj/kernel' but the base tree has no leaf there",
  ),
  (
    "wrong-rank",
    _merge(_lora, cfg=_cfg(r=3)),
    ValueError,
    r"'layers_0/q_proj/kernel' has rank 2 but the config gives",
  ),
  (
    "wrong-factor-shapes",
    _merge(lambda: _edit(_lora(), ("layers_0", "q_proj", "kernel"), _pair((5, 2), (2, 3)))),
    ValueError,
    r"lora_A \(5, 2\) and lora_B \(2, 3\), which do not factor the kernel of shape \(4, 3\)",
  ),
  (
    "adapter-on-int8-kernel",
    lambda: jlora.merge(
      _int8_tree(), {"q_proj": {"kernel": _pair()}}, jlora.LoraConfig(r=2, target_modules=("v_proj",))
    ),
    ValueError,
    r"adapter on 'q_proj/kernel', an integer \(int8\) kernel: LoRA cannot adapt",
  ),
  (
    "unmerge-missing",
    lambda: jlora.unmerge(_tree(), _edit(_lora(), ("layers_0", "q_proj"), drop=True), CFG),
    ValueError,
    r"no adapter for \['layers_0/q_proj/kernel'\]",
  ),
  # -- safe_merge -----------------------------------------------------------------------------------
  (
    "safe-merge-nan",
    _merge(
      lambda: _edit(_lora(), ("layers_0", "v_proj", "kernel", "lora_A"), jnp.full((4, 2), jnp.nan)),
      safe_merge=True,
    ),
    ValueError,
    r"lora_A of the adapter at 'layers_0/v_proj/kernel' contains NaN or Inf",
  ),
  (
    "safe-merge-fp16-overflow",
    _bad_fp16,
    ValueError,
    r"merged kernel at 'q_proj/kernel' \(float16\) would contain NaN or Inf: .*exceeds the range of float16",
  ),
  (
    "safe-merge-under-jit",
    lambda: jax.jit(lambda lo: jlora.merge(_tree(), lo, CFG, safe_merge=True))(_lora()),
    TypeError,
    r"`safe_merge=True` .* cannot run under `jax.jit`",
  ),
  # -- wrap -----------------------------------------------------------------------------------------
  ("wrap-not-callable", lambda: jlora.wrap("model", CFG), TypeError, r"`apply_fn` must be callable; got str"),
  (
    "wrap-bad-strategy",
    lambda: jlora.wrap(_fn, CFG, strategy="fast"),
    ValueError,
    r"`strategy` must be one of",
  ),
  (
    "apply-lora-params-x",
    lambda: _wrapped()(_lora(), _tree(), X),
    ValueError,
    r"first argument of the wrapped apply is an adapter tree.*swapped.*apply\(tree, lora, \*args",
  ),
  (
    "apply-params-x-lora",
    lambda: _wrapped()(_tree(), X, _lora()),
    ValueError,
    r"adapter tree was passed as argument 3 of the wrapped apply, and its second argument is ArrayImpl",
  ),
  (
    "apply-merged-lora-params-x",
    lambda: _wrapped(strategy="merged")(_lora(), _tree(), X),
    ValueError,
    r"the base and adapter trees are swapped",
  ),
  ("apply-lora-none", lambda: _wrapped()(_tree(), None, X), TypeError, r"`lora` must be the adapter tree"),
  ("apply-lora-empty", lambda: _wrapped()(_tree(), {}, X), ValueError, r"The adapter tree is empty"),
  (
    "apply-missing-adapter",
    lambda: _wrapped()(_tree(), _edit(_lora(), ("layers_1", "v_proj"), drop=True), X),
    ValueError,
    r"no adapter for \['layers_1/v_proj/kernel'\]",
  ),
  (
    "apply-merged-missing-adapter",
    lambda: _wrapped(strategy="merged")(_tree(), _edit(_lora(), ("layers_0", "q_proj"), drop=True), X),
    ValueError,
    r"no adapter for \['layers_0/q_proj/kernel'\]",
  ),
  (
    "apply-merged-dropout",
    lambda: _wrapped(_cfg(lora_dropout=0.1), strategy="merged")(_tree(), _lora(), X, lora_dropout_key=KEY),
    ValueError,
    r"LoRA dropout needs the factorized path",
  ),
  (
    "all-linear-wrap-misses-linear-w",
    lambda: jlora.wrap(_w_fn, ALL_LINEAR)(_w_tree(), jlora.init(_w_tree(), ALL_LINEAR, key=KEY), X),
    ValueError,
    r"no adapter for \['enc/w'\], which the config targets \(`target_modules`='all-linear'\)",
  ),
  (
    "all-linear-merged-misses-linear-w",
    lambda: jlora.wrap(_w_fn, ALL_LINEAR, strategy="merged")(
      _w_tree(), jlora.init(_w_tree(), ALL_LINEAR, key=KEY), X
    ),
    ValueError,
    r"no adapter for \['enc/w'\]",
  ),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_battery_size():
  assert len(CASES) >= 60
  assert len({c[0] for c in CASES}) == len(CASES)


def test_safe_merge_refuses_what_a_plain_merge_overflows():
  """The fp16 case above is real: without `safe_merge` the merged kernel is inf."""
  tree = {"q_proj": {"kernel": jnp.full((4, 3), 60000.0, jnp.float16)}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",), dtype="float32")
  lora = {"q_proj": {"kernel": {"lora_A": jnp.full((4, 2), 100.0), "lora_B": jnp.full((2, 3), 100.0)}}}
  assert np.isinf(np.asarray(jlora.merge(tree, lora, cfg)["q_proj"]["kernel"])).all()
