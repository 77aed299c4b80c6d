"""The benchmark scripts run, and their deterministic figures hold.

Timings are noisy and are only printed by the scripts; FLOPs, temp bytes and
program identity come from XLA's compiled-program analyses and are asserted here.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tests

ROOT = pathlib.Path(tests.ROOT)
# The scripts run on one device, as the figures in the README were measured: without conftest's 8
# simulated devices (on several devices without a mesh, the factor gradients take autodiff's dots).
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": str(ROOT)}


def _quick(script: str, tmp_path: pathlib.Path) -> dict:
  """The JSON result of ``benchmarks/<script> --quick`` (this checkout's jlora imported)."""
  out = tmp_path / "result.json"
  subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
    check=True,
    capture_output=True,
    text=True,
    env=ENV,
  )
  return json.loads(out.read_text())


@pytest.mark.slow
def test_lora_step_quick(tmp_path):
  result = _quick("lora_step.py", tmp_path)
  ratios, checks = result["ratios"], result["checks"]
  # The wrapped train step is the hand-written one: same FLOPs, same temporaries.
  assert ratios["flops.jlora/hand"] == pytest.approx(1.0, abs=0.02)
  assert ratios["temp_bytes.jlora/hand"] <= 1.05
  # ... and cheaper than full fine-tuning in FLOPs (the matmul-only limit is 2/3).
  assert 2 / 3 < ratios["flops.jlora/full"] < 0.8
  # Sibling fusion changes how the rank-r products are grouped, not their FLOPs.
  assert ratios["flops.jlora/jlora_unfused"] == pytest.approx(1.0, abs=0.01)
  # LoRA never needs more working memory than full fine-tuning (the GPT without biases).
  assert result["no_bias_temp_bytes"]["jlora/full"] < 1.0
  for width, dec in result["decode"].items():
    assert checks[f"decode d={width} merged/base = 1.00 (same program)"]
    # Unmerged decoding does the hand-written model's FLOPs, and every variant computes the
    # merged model's logits.
    assert dec["auto"]["flops"] == pytest.approx(dec["hand"]["flops"], rel=0.02)
    for name in ("hand", "auto", "factorized"):
      assert dec[name]["max_abs_err_vs_merged"] < 1e-4, (width, name)


@pytest.mark.slow
def test_compile_depth_runs():
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "compile_depth.py"), "--depths", "2"],
    check=True,
    capture_output=True,
    text=True,
    env=ENV,
  )
  (row,) = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["2"]]
  full_dots, hand_dots, jlora_dots = map(int, row[-1].split("/"))
  # LoRA's extra products: two forward and four backward rank-r dots per adapted kernel, none for dW;
  # sibling fusion leaves jlora fewer than the hand-written layers (one A product per shared input).
  assert full_dots < jlora_dots < hand_dots < 3 * full_dots


@pytest.mark.slow
def test_dora_step_quick(tmp_path):
  result = _quick("dora_step.py", tmp_path)
  steps, checks = result["steps"], result["checks"]
  # The three DoRA steps compute the same first step; the factorized norms keep the temporaries
  # below both materialising versions (PEFT's dense norm, and the merged kernel).
  assert checks["same first-step loss (1e-4)"]
  assert steps["dora"]["temp_bytes"] < steps["dora_peft"]["temp_bytes"] < steps["dora_merged"]["temp_bytes"]
  assert steps["dora"]["flops"] < steps["dora_merged"]["flops"]
  # Recomputing each product trades the kept outputs for one more base product per kernel.
  assert steps["dora_recompute"]["temp_bytes"] <= steps["dora"]["temp_bytes"]
  assert steps["dora_recompute"]["flops"] > steps["dora"]["flops"]


@pytest.mark.slow
def test_multi_adapter_quick(tmp_path):
  result = _quick("multi_adapter.py", tmp_path)
  assert result["checks"]["prefill: routed outputs equal the separate runs (rel err < 1e-4)"]
  assert result["checks"]["decode: routed outputs equal the separate runs (rel err < 1e-4)"]
  for phase in ("prefill", "decode"):
    for res in result["phases"][phase].values():
      # The gathered branch does one adapter's FLOPs per example: within a few percent of a single
      # adapter's (the gathers and per-example scales), whatever the bank's size.
      assert res["gather"]["flops_vs_single"] < 1.1, phase
      assert res["separate"]["flops_vs_single"] == pytest.approx(1.0, rel=0.01)


@pytest.mark.slow
def test_swiglu_temp_runs():
  args = ["--layers", "1", "--d-model", "128", "--ffn", "512", "--batch", "4", "--seq", "32", "--rank", "4"]
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "swiglu_temp.py"), *args],
    check=True,
    capture_output=True,
    text=True,
    env=ENV,
  )
  rows = {line.split()[0]: list(map(float, line.split()[1:])) for line in proc.stdout.splitlines()[1:]}
  assert set(rows) == {"no", "yes"}
  for full, lora, ratio in rows.values():
    assert full > 0 and lora > 0
    assert ratio == pytest.approx(lora / full, abs=1e-2)
  # What the README describes: without biases XLA:CPU keeps both products of gate and up for the
  # backward pass; with them the excess is smaller. If this stops holding, re-measure the README.
  assert rows["yes"][2] < rows["no"][2]


@pytest.mark.slow
def test_pod_storage_quick(tmp_path):
  """The 2-process save/restore benchmark runs both sides on a real job (its times are only printed)."""
  result = _quick("pod_storage.py", tmp_path)
  assert set(result["times"]) == {"jlora", "orbax"}
  assert all(len(t) == 2 and min(t) > 0 for t in result["times"].values())
  assert result["adapter_bytes"] > 0 and result["ratio"] > 0
