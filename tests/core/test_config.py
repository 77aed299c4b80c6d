"""LoraConfig: validation at construction, per-module values, serialisation."""

import math

import pytest

import jlora


def test_defaults_and_scale():
  cfg = jlora.LoraConfig(target_modules=["q_proj", "v_proj"])
  assert cfg.r == 8 and cfg.lora_alpha == 8.0 and cfg.target_modules == ("q_proj", "v_proj")
  assert cfg.scale_for("layers_0/q_proj") == 1.0
  rs = jlora.LoraConfig(r=16, lora_alpha=8, target_modules=("q",), use_rslora=True)
  assert rs.scale_for("q") == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_pattern_longest_match_wins():
  cfg = jlora.LoraConfig(
    r=8,
    lora_alpha=16,
    target_modules=("q_proj", "v_proj"),
    rank_pattern={"q_proj": 4, r"layers_1/.*q_proj": 2},
    alpha_pattern={"v_proj": 32},
  )
  assert cfg.rank_for("layers_0/attn/q_proj") == 4
  assert cfg.rank_for("layers_1/attn/q_proj") == 2
  assert cfg.rank_for("layers_0/attn/v_proj") == 8
  assert cfg.scale_for("layers_0/attn/v_proj") == 32 / 8
  assert cfg.scale_for("layers_1/attn/q_proj") == 16 / 2
  # A pattern is matched against the whole path or a '/'-suffix of it, not a substring.
  assert cfg.rank_for("layers_0/attn/xq_proj") == 8


def test_round_trip_dict_and_json():
  cfg = jlora.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=("a", "b"),
    exclude_modules="x.*",
    layers_to_transform=[2, 0],
    layers_pattern="layers",
    rank_pattern={"a": 2},
    alpha_pattern={"b": 3.0},
    use_rslora=True,
    init_lora_weights="gaussian",
    modules_to_save=("head",),
    layout_pattern={"attn/query": (0, 1), "c_attn": "oi"},
    dtype="bfloat16",
  )
  assert cfg.layers_to_transform == (0, 2)
  again = jlora.LoraConfig.from_dict(cfg.to_dict())
  assert again == cfg
  import json

  assert jlora.LoraConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_config_is_frozen_and_hashable():
  cfg = jlora.LoraConfig(target_modules=("q",), rank_pattern={"q": 2})
  with pytest.raises(AttributeError):
    cfg.r = 3  # type: ignore[misc]
  assert hash(cfg) == hash(jlora.LoraConfig(target_modules=("q",), rank_pattern={"q": 2}))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(r=0), "`r` must be a positive integer"),
    (dict(r=2.0), "`r` must be a positive integer"),
    (dict(r=True), "`r` must be a positive integer"),
    (dict(lora_alpha=-1), "`lora_alpha` must be a finite number > 0"),
    (dict(lora_alpha=float("nan")), "`lora_alpha` must be a finite number > 0"),
    (dict(lora_alpha="8"), "`lora_alpha` must be a number"),
    (dict(lora_dropout=1.0), r"`lora_dropout` must be a number in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"`lora_dropout` must be a number in \[0, 1\)"),
    (dict(target_modules=None), "`target_modules` is required"),
    (dict(target_modules=()), "`target_modules` must name at least one module"),
    (dict(target_modules=("q", "")), "`target_modules` must hold non-empty strings"),
    (dict(target_modules=3), "`target_modules` must be a string"),
    (dict(target_modules="(unclosed"), "`target_modules` pattern .* is not a valid regex"),
    (dict(exclude_modules="all-linear"), "`exclude_modules` cannot be 'all-linear'"),
    (dict(layers_to_transform=[-1]), "`layers_to_transform` must be non-negative"),
    (dict(layers_to_transform=[1, 1]), "`layers_to_transform` has repeated indices"),
    (dict(layers_to_transform=True), "`layers_to_transform` must be an int"),
    (dict(layers_pattern="layers"), "`layers_pattern` is only used with `layers_to_transform`"),
    (dict(rank_pattern={"q": 0}), r"`rank_pattern\['q'\]` must be a positive integer"),
    (dict(rank_pattern=[1]), "`rank_pattern` must be a mapping"),
    (dict(rank_pattern={"(": 2}), "`rank_pattern` pattern .* is not a valid regex"),
    (dict(alpha_pattern={"q": 0}), r"`alpha_pattern\['q'\]` must be a finite number > 0"),
    (dict(layout_pattern={"q": (0, 0)}), r"`layout_pattern\['q'\]` must be a string of axis roles"),
    (dict(layout_pattern={"q": "ii"}), r"`layout_pattern\['q'\]` must be .* at least one 'i' and one 'o'"),
    (dict(layout_pattern={"q": "iox"}), r"`layout_pattern\['q'\]` must be a string of axis roles"),
    (dict(use_rslora=1), "`use_rslora` must be a bool"),
    (dict(init_lora_weights="pissa_niter_x"), "`init_lora_weights` must be one of"),
    (dict(dtype="int8"), "`dtype` must be None or one of"),
  ],
)
def test_validation_errors_name_the_field(kwargs, match):
  kwargs = {"target_modules": ("q",), **kwargs}
  with pytest.raises((ValueError, TypeError), match=match):
    jlora.LoraConfig(**kwargs)


def test_from_dict_rejects_unknown_and_invalid_fields():
  with pytest.raises(ValueError, match=r"Unknown LoraConfig field\(s\) \['rank'\]"):
    jlora.LoraConfig.from_dict({"target_modules": ["q"], "rank": 4})
  with pytest.raises(ValueError, match="`r` must be a positive integer"):
    jlora.LoraConfig.from_dict({"target_modules": ["q"], "r": -4})
  with pytest.raises(TypeError, match="must be a JSON object"):
    jlora.LoraConfig.from_dict(["q"])


def test_layers_to_transform_type_and_overlap_with_modules_to_save():
  with pytest.raises(
    TypeError, match=r"`layers_to_transform` must be an int or a list of ints .*got float: 1.5"
  ):
    jlora.LoraConfig(target_modules=("q",), layers_to_transform=1.5)
  assert jlora.LoraConfig(target_modules=("q",), layers_to_transform=range(2)).layers_to_transform == (0, 1)
  with pytest.raises(ValueError, match=r"both name \['head'\].*`modules_to_save`"):
    jlora.LoraConfig(target_modules=("q", "head"), modules_to_save="head")


def test_check_config_says_how_to_build_one():
  from jlora._src.core.config import check_config  # noqa: PLC0415

  cfg = jlora.LoraConfig(target_modules=("q",))
  assert check_config(cfg) is cfg
  with pytest.raises(TypeError, match=r"got dict\. Build one with .*LoraConfig.from_dict"):
    check_config(cfg.to_dict())
  with pytest.raises(TypeError, match=r"got NoneType"):
    check_config(None)
