"""The cost of a jlora train step against the hand-written ideal.

Builds a GPT-style decoder (see ``_gpt.py``) and three AdamW train steps in one
process: full fine-tuning, ``jlora.wrap`` with an ``"all-linear"`` rank-16
adapter, and hand-written factorized LoRA baked into the layers (the
overhead-free ideal). It reports, side by side:

* step FLOPs (``compiled.cost_analysis()["flops"]``);
* step temp bytes (``compiled.memory_analysis().temp_size_in_bytes``);
* compile time (``lower`` + ``compile`` wall time, median of repeats, caches
  cleared before each);
* step time: median of one step per round over rounds in which the variants
  are interleaved; ratios are the median of the ratios measured within a
  round, so that slow phases of a shared machine hit the variants alike;
* a batch-1, one-token decode step (greedy, in a jitted scan) at two widths:
  ``d=256``, whose weights fit in the CPU's last-level cache, so that the step
  is bound by per-op dispatch, and ``d=512``, whose weights stream from memory
  each step, as real decoding does. At each, the base model, the base model on
  ``jlora.merge``-d params, the hand-written model with the adapters unmerged,
  and the wrapped apply with unmerged adapters (``"auto"`` and
  ``"factorized"``), against the base model and against hand-written.

A ``frozen`` step (kernels frozen, only LayerNorms trained: every activation
gradient, no kernel gradient, no LoRA branch) is measured too: it is LoRA's
matmul-only limit and splits the step time into its parts.

Prints the tables and each threshold of the issue as PASS/FAIL and writes
``benchmarks/results/lora_step.json``.

Usage::

  python benchmarks/lora_step.py            # d=256, 4 layers, seq 128, batch 8
  python benchmarks/lora_step.py --quick    # tiny sizes, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt  # noqa: E402

import jlora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("full", "hand", "jlora", "jlora_unfused", "frozen", "qlora_nf4", "qlora_int8", "qwix")
DECODE = ("base", "merged", "hand", "auto", "factorized")


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return {"flops": float(cost["flops"]), "temp_bytes": int(mem.temp_size_in_bytes)}


def _compile(fn: Callable, args: tuple, reps: int) -> tuple[Any, float]:
  """Lowers and compiles ``fn`` ``reps`` times from cold caches; (compiled, median seconds)."""
  times, compiled = [], None
  for _ in range(reps):
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    times.append(time.perf_counter() - t0)
  return compiled, statistics.median(times)


def _time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
  """Seconds of one call of each ``fn`` (each blocks) per round, the variants interleaved.

  Each round runs every variant once, in alternating order, so that slow phases
  of a shared machine hit all of them alike; `_paired` compares them round by round.
  """
  out: dict[str, list[float]] = {k: [] for k in fns}
  for fn in fns.values():  # warm up
    jax.block_until_ready(fn())
  for r in range(rounds):
    for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
      t0 = time.perf_counter()
      jax.block_until_ready(fns[k]())
      out[k].append(time.perf_counter() - t0)
  return out


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
  """Median over rounds of ``time(a) / time(b)`` measured in the same round."""
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _decode(cfg: _gpt.GPTConfig, args: argparse.Namespace, key: jax.Array) -> dict[str, Any]:
  """Batch-1 one-token decode steps at ``cfg``'s width, each against the base model.

  Variants: the base model; the base model on ``jlora.merge``-d params; the
  hand-written model with the same adapters baked into its layers (unmerged,
  the overhead-free ideal); ``jlora.wrap`` with unmerged adapters under the
  ``"auto"`` and ``"factorized"`` strategies. The adapters are random (B is not
  zero), so the outputs are checked against the merged model too.
  """
  model, hand_model = _gpt.GPT(cfg), _gpt.GPT(cfg, lora_rank=cfg.rank)
  lcfg = _gpt.lora_config(cfg)
  tok = jnp.zeros((1, 1), jnp.int32)
  k_init, k_lora = jax.random.split(key)
  variables = model.init(k_init, tok)
  lora = jlora.init(variables, dataclasses.replace(lcfg, init_lora_weights=False), key=k_lora)
  merged = jax.block_until_ready(jlora.merge(variables, lora, lcfg))
  base_fn = jax.jit(model.apply)
  calls = {
    "base": (base_fn, (variables, tok)),
    "merged": (base_fn, (merged, tok)),
    "hand": (jax.jit(hand_model.apply), (_gpt.hand_params(variables, lora), tok)),
    "auto": (jax.jit(jlora.wrap(model.apply, lcfg, strategy="auto")), (variables, lora, tok)),
    "factorized": (jax.jit(jlora.wrap(model.apply, lcfg, strategy="factorized")), (variables, lora, tok)),
  }
  res: dict[str, Any] = {name: _cost(fn.lower(*a).compile()) for name, (fn, a) in calls.items()}
  # Merged params run the base model's own program: the same HLO, so the same cost.
  res["merged"]["same_program_as_base"] = (
    base_fn.lower(merged, tok).as_text() == base_fn.lower(variables, tok).as_text()
  )
  ref = np.asarray(base_fn(merged, tok))
  for name in ("hand", "auto", "factorized"):
    got = np.asarray(calls[name][0](*calls[name][1]))
    res[name]["max_abs_err_vs_merged"] = float(np.max(np.abs(got - ref)))

  n = args.decode_iters

  def loop(fn, a):
    # Greedy generation of n tokens inside one jitted scan, as a serving loop runs: the time per
    # step is the device program's, not Python's per-call dispatch of the (larger) argument list.
    def generate(*a):
      def body(tok, _):
        logits = fn(*a[:-1], tok)
        return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), None

      return jax.lax.scan(body, a[-1], None, length=n)[0]

    gen = jax.jit(generate)
    return lambda: gen(*a)

  times = _time_interleaved({k: loop(*v) for k, v in calls.items()}, args.decode_rounds)
  for name, ts in times.items():
    res[name]["time_s"] = statistics.median(ts) / n
    res[name]["time_min_s"] = min(ts) / n
    res[name]["flops_vs_base"] = res[name]["flops"] / res["base"]["flops"]
    res[name]["time_vs_base"] = _paired(times, name, "base")
  res["auto"]["time_vs_hand"] = _paired(times, "auto", "hand")
  res["factorized"]["time_vs_hand"] = _paired(times, "factorized", "hand")
  return res


def _no_bias_temp(cfg: _gpt.GPTConfig) -> dict[str, float]:
  """Temp bytes of the full and jlora steps on ``cfg`` without biases (compiled, not run)."""
  variants = _gpt.make_variants(dataclasses.replace(cfg, bias=False), key=jax.random.key(1))
  out: dict[str, float] = {}
  for name in ("full", "jlora"):
    v = variants[name]
    out[name] = _cost(v.step.lower(*v.state, *v.static).compile())["temp_bytes"]
  out["jlora/full"] = out["jlora"] / out["full"]
  return out


def _table(title: str, cols: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> None:
  head = f"{title:<20}" + "".join(f"{c:>14}" for c in cols)
  print(head)
  print("-" * len(head))
  for label, cells in rows:
    print(f"{label:<20}" + "".join(f"{c:>14}" for c in cells))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
  _gpt.add_size_args(p)
  p.add_argument("--no-bias", action="store_true", help="no biases on the blocks' linear layers")
  p.add_argument(
    "--mlp", choices=("gelu", "swiglu"), default="gelu", help="swiglu: gate/up/down (seven linear types)"
  )
  p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (one step each)")
  p.add_argument("--compile-reps", type=int, default=3)
  p.add_argument(
    "--decode-widths", default="256,512", help="d_model of the decode models; the last is the checked one"
  )
  p.add_argument("--decode-iters", type=int, default=32, help="greedy decode steps per timed sample")
  p.add_argument("--decode-rounds", type=int, default=30, help="interleaved decode timing rounds")
  p.add_argument("--out", type=Path, default=RESULTS / "lora_step.json")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.layers, args.seq, args.batch, args.rank, args.vocab = 64, 2, 32, 2, 4, 512
    args.rounds, args.compile_reps, args.decode_widths = 3, 1, "64,128"
    args.decode_iters, args.decode_rounds = 5, 3
  cfg = _gpt.config_from(args, bias=not args.no_bias, mlp=args.mlp)

  variants = _gpt.make_variants(cfg, key=jax.random.key(0))
  names = [n for n in STEPS if n in variants]  # qwix where installed
  adapted = sorted(
    jax.tree_util.keystr(kp[:-1])
    for kp, _ in jax.tree_util.tree_leaves_with_path(variants["jlora"].state[0])
    if kp[-1].key == "lora_A"
  )
  if any("lm_head" in a for a in adapted):
    raise RuntimeError(f"'all-linear' adapted the output head: {adapted}")

  steps: dict[str, dict[str, Any]] = {}
  for name in names:
    v = variants[name]
    compiled, secs = _compile(v.step, (*v.state, *v.static), args.compile_reps)
    v.step = compiled
    steps[name] = {**_cost(compiled), "compile_s": secs, "trainable_params": v.n_trainable}
  times = _time_interleaved({k: variants[k].run for k in names}, rounds=args.rounds)
  no_bias = _no_bias_temp(cfg)
  for name, ts in times.items():
    steps[name]["time_s"] = statistics.median(ts)
    steps[name]["time_min_s"] = min(ts)
    steps[name]["n_timed"] = len(ts)
  widths = [int(w) for w in args.decode_widths.split(",")]
  decode = {
    w: _decode(dataclasses.replace(cfg, d_model=w, n_heads=max(1, w // 64)), args, jax.random.key(w))
    for w in widths
  }

  pairs = (
    ("jlora", "hand"),
    ("jlora", "full"),
    ("hand", "full"),
    ("frozen", "full"),
    ("qlora_nf4", "jlora"),
    ("qlora_int8", "jlora"),
    ("jlora", "jlora_unfused"),
    *((("jlora", "qwix"), ("qwix", "full")) if "qwix" in names else ()),
  )
  ratios = {
    f"{k}.{a}/{b}": steps[a][k] / steps[b][k] for k in ("flops", "temp_bytes", "compile_s") for a, b in pairs
  }
  ratios.update({f"time_s.{a}/{b}": _paired(times, a, b) for a, b in pairs})
  top = widths[-1]
  checks = {
    "flops jlora/hand <= 1.02": ratios["flops.jlora/hand"] <= 1.02,
    "time jlora/hand <= 1.05": ratios["time_s.jlora/hand"] <= 1.05,
    "temp jlora/hand <= 1.05": ratios["temp_bytes.jlora/hand"] <= 1.05,
    f"decode d={top} unmerged (auto)/base <= 1.10": decode[top]["auto"]["time_vs_base"] <= 1.10,
    **{
      f"decode d={w} unmerged (auto)/hand-written <= 1.05": decode[w]["auto"]["time_vs_hand"] <= 1.05
      for w in widths
    },
    **{
      f"decode d={w} merged/base = 1.00 (same program)": bool(decode[w]["merged"]["same_program_as_base"])
      for w in widths
    },
    "compile jlora/full <= 1.5": ratios["compile_s.jlora/full"] <= 1.5,
    "time jlora/full <= 0.85": ratios["time_s.jlora/full"] <= 0.85,
    "time jlora/hand <= 0.80": ratios["time_s.jlora/hand"] <= 0.80,
    "temp jlora/full <= 1.00 (no biases)": no_bias["jlora/full"] <= 1.0,
  }

  # -- tables ------------------------------------------------------------------
  print(
    f"\nGPT decoder d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} seq={cfg.seq_len} "
    f"batch={cfg.batch} vocab={cfg.vocab}; all-linear LoRA r={cfg.rank}; AdamW; "
    f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs"
  )
  rows = []
  for key, label, fmt in (
    ("flops", "FLOPs", lambda x: f"{x / 1e9:.2f} G"),
    ("time_s", "time (median)", lambda x: f"{x * 1e3:.1f} ms"),
    ("time_min_s", "time (min)", lambda x: f"{x * 1e3:.1f} ms"),
    ("temp_bytes", "temp bytes", lambda x: f"{x / 2**20:.1f} MiB"),
    ("compile_s", "compile", lambda x: f"{x:.2f} s"),
  ):
    cells = [fmt(steps[n][key]) for n in names]
    if f"{key}.jlora/hand" in ratios:
      cells += [f"{ratios[f'{key}.{a}/{b}']:.3f}" for a, b in pairs[:3]]
    rows.append((label, cells))
  rows.append(("trainable", [f"{steps[n]['trainable_params']:,}" for n in names]))
  _table("train step", [*names, "jlora/hand", "jlora/full", "hand/full"], rows)
  print(
    f"sibling fusion: jlora / jlora_unfused time {ratios['time_s.jlora/jlora_unfused']:.3f}, "
    f"temp {ratios['temp_bytes.jlora/jlora_unfused']:.3f}, flops {ratios['flops.jlora/jlora_unfused']:.3f}"
  )
  if "qwix" in names:
    t, m = ratios["time_s.jlora/qwix"], ratios["temp_bytes.jlora/qwix"]
    print(f"qwix: jlora/qwix time {t:.3f}, temp {m:.3f}")
  print(
    f"no biases: temp bytes full {no_bias['full'] / 2**20:.1f} MiB, jlora {no_bias['jlora'] / 2**20:.1f} MiB "
    f"(jlora/full {no_bias['jlora/full']:.3f})"
  )
  print(
    "quantized base / full-precision base (jlora): "
    + ", ".join(f"{q}: time {ratios[f'time_s.{q}/jlora']:.3f}, temp {ratios[f'temp_bytes.{q}/jlora']:.3f}"
                for q in ("qlora_nf4", "qlora_int8"))
  )  # fmt: skip
  print("(time ratios: median over rounds of the ratio measured within a round)")

  for w, dec in decode.items():
    print(f"\nbatch-1 decode, d={w} (one token; greedy, {args.decode_iters} steps in a jitted scan)")
    rows = [
      (label, [fmt(dec[n][key]) if key in dec[n] else "" for n in DECODE])
      for key, label, fmt in (
        ("flops", "FLOPs", lambda x: f"{x / 1e6:.2f} M"),
        ("time_s", "time (median)", lambda x: f"{x * 1e6:.0f} us"),
        ("time_min_s", "time (min)", lambda x: f"{x * 1e6:.0f} us"),
        ("flops_vs_base", "FLOPs / base", lambda x: f"{x:.3f}"),
        ("time_vs_base", "time / base", lambda x: f"{x:.3f}"),
        ("time_vs_hand", "time / hand", lambda x: f"{x:.3f}"),
        ("max_abs_err_vs_merged", "max |err| vs merged", lambda x: f"{x:.1e}"),
      )
    ]
    _table(f"decode d={w}", DECODE, rows)
  print()
  result = {
    "config": dataclasses.asdict(cfg),
    "quick": args.quick,
    "environment": {
      "jax": jax.__version__,
      "device": jax.devices()[0].device_kind,
      "platform": jax.default_backend(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
    },
    "adapted_modules": len(adapted),
    "steps": steps,
    "no_bias_temp_bytes": no_bias,
    "decode": {str(w): dec for w, dec in decode.items()},
    "ratios": ratios,
    "checks": checks,
  }
  return _gpt.finish(checks, args.out, result)


if __name__ == "__main__":
  main()
