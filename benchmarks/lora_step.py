"""Issue 3, item 5: the cost of a jlora train step against the hand-written ideal.

Builds a GPT-style decoder (see ``_gpt.py``) and three AdamW train steps in one
process: full fine-tuning, ``jlora.wrap`` with an ``"all-linear"`` rank-16
adapter, and hand-written factorized LoRA baked into the layers (the
overhead-free ideal). It reports, side by side:

* step FLOPs (``compiled.cost_analysis()["flops"]``);
* step temp bytes (``compiled.memory_analysis().temp_size_in_bytes``);
* compile time (``lower`` + ``compile`` wall time, median of repeats, caches
  cleared before each);
* step time (median over rounds in which the variants are interleaved, so
  that load from other processes hits them alike);
* a batch-1, one-token decode step: the wrapped apply with unmerged adapters
  (strategies ``"auto"`` and ``"factorized"``) and the base model run on
  ``jlora.merge``-d params, each against the base model.

A ``frozen`` step (kernels frozen, only LayerNorms trained: every activation
gradient, no kernel gradient, no LoRA branch) is measured too: it is LoRA's
matmul-only limit and splits the step time into its parts.

Prints one table with each threshold of the issue as PASS/FAIL and writes
``benchmarks/results/lora_step.json``.

Usage::

  python benchmarks/lora_step.py            # d=256, 4 layers, seq 128, batch 8
  python benchmarks/lora_step.py --quick    # tiny sizes, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt  # noqa: E402

import jlora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("full", "hand", "jlora", "frozen")


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


def _time_interleaved(
  fns: dict[str, Callable[[], Any]], rounds: int, per_round: int
) -> dict[str, list[float]]:
  """Seconds per call of each ``fn`` (each blocks), variants interleaved round by round."""
  out: dict[str, list[float]] = {k: [] for k in fns}
  for fn in fns.values():  # warm up
    jax.block_until_ready(fn())
  for r in range(rounds):
    order = list(fns) if r % 2 == 0 else list(reversed(fns))
    for k in order:
      for _ in range(per_round):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[k]())
        out[k].append(time.perf_counter() - t0)
  return out


def _decode(cfg: _gpt.GPTConfig, variables: Any, lora: Any, args: argparse.Namespace) -> dict[str, Any]:
  """A batch-1 one-token forward: wrapped apply (unmerged) and merged params vs the base model."""
  model = _gpt.GPT(cfg)
  lcfg = _gpt.lora_config(cfg)
  tok = jnp.zeros((1, 1), jnp.int32)
  merged = jax.block_until_ready(jlora.merge(variables, lora, lcfg))
  base_fn = jax.jit(model.apply)
  calls = {
    "base": (base_fn, (variables, tok)),
    "merged": (base_fn, (merged, tok)),
    "auto": (jax.jit(jlora.wrap(model.apply, lcfg, strategy="auto")), (variables, lora, tok)),
    "factorized": (jax.jit(jlora.wrap(model.apply, lcfg, strategy="factorized")), (variables, lora, tok)),
  }
  res: dict[str, Any] = {}
  for name, (fn, a) in calls.items():
    res[name] = _cost(fn.lower(*a).compile())
  # Merged params run the base model's own program: the same HLO, so the same cost.
  res["merged"]["same_program_as_base"] = (
    base_fn.lower(merged, tok).as_text() == base_fn.lower(variables, tok).as_text()
  )
  ref = np.asarray(base_fn(merged, tok))
  for name in ("auto", "factorized"):
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
    jax.block_until_ready(gen(*a))
    return lambda: jax.block_until_ready(gen(*a))

  times = _time_interleaved({k: loop(*v) for k, v in calls.items()}, args.decode_rounds, 1)
  for name, ts in times.items():
    res[name]["time_s"] = statistics.median(ts) / n
    res[name]["time_min_s"] = min(ts) / n
  return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
  p.add_argument("--steps-per-round", type=int, default=2)
  p.add_argument("--compile-reps", type=int, default=3)
  p.add_argument("--decode-iters", type=int, default=32, help="greedy decode steps per timed sample")
  p.add_argument("--decode-rounds", type=int, default=25, help="interleaved decode timing rounds")
  p.add_argument("--out", type=Path, default=RESULTS / "lora_step.json")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.layers, args.seq, args.batch, args.rank, args.vocab = 64, 2, 32, 2, 4, 512
    args.rounds, args.steps_per_round, args.compile_reps = 2, 2, 1
    args.decode_iters, args.decode_rounds = 5, 3
  cfg = _gpt.GPTConfig(
    vocab=args.vocab,
    d_model=args.d_model,
    n_layers=args.layers,
    n_heads=max(1, args.d_model // 64),
    seq_len=args.seq,
    batch=args.batch,
    rank=args.rank,
    alpha=2.0 * args.rank,
  )

  variants = _gpt.make_variants(cfg, key=jax.random.key(0))
  variables = variants["jlora"].static[0]
  adapted = sorted(
    jax.tree_util.keystr(kp[:-1])
    for kp, _ in jax.tree_util.tree_leaves_with_path(variants["jlora"].state[0])
    if kp[-1].key == "lora_A"
  )
  if any("lm_head" in a for a in adapted):
    raise RuntimeError(f"'all-linear' adapted the output head: {adapted}")

  steps: dict[str, dict[str, Any]] = {}
  for name in STEPS:
    v = variants[name]
    compiled, secs = _compile(v.step, (*v.state, *v.static), args.compile_reps)
    v.step = compiled
    steps[name] = {**_cost(compiled), "compile_s": secs, "trainable_params": v.n_trainable}
  times = _time_interleaved(
    {k: variants[k].run for k in STEPS}, rounds=args.rounds, per_round=args.steps_per_round
  )
  for name, ts in times.items():
    steps[name]["time_s"] = statistics.median(ts)
    steps[name]["time_min_s"] = min(ts)
    steps[name]["n_timed"] = len(ts)
  decode = _decode(cfg, variables, variants["jlora"].state[0], args)

  r = lambda a, b, k: steps[a][k] / steps[b][k]
  d = lambda a, k: decode[a][k] / decode["base"][k]
  ratios = {
    f"{k}.{a}/{b}": r(a, b, k)
    for k in ("flops", "temp_bytes", "time_s", "compile_s")
    for a, b in (("jlora", "hand"), ("jlora", "full"), ("hand", "full"), ("frozen", "full"))
  }
  ratios.update(
    {f"decode.{k}.{a}/base": d(a, k) for a in ("auto", "factorized", "merged") for k in ("flops", "time_s")}
  )
  checks = {
    "flops jlora/hand <= 1.02": ratios["flops.jlora/hand"] <= 1.02,
    "time jlora/hand <= 1.05": ratios["time_s.jlora/hand"] <= 1.05,
    "temp jlora/hand <= 1.05": ratios["temp_bytes.jlora/hand"] <= 1.05,
    "decode unmerged (auto)/base <= 1.10": ratios["decode.time_s.auto/base"] <= 1.10,
    "decode merged/base = 1.00 (same program)": bool(decode["merged"]["same_program_as_base"]),
    "compile jlora/full <= 1.5": ratios["compile_s.jlora/full"] <= 1.5,
  }

  # -- table -------------------------------------------------------------------
  gf = lambda x: f"{x / 1e9:.2f} G"
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  ms = lambda x: f"{x * 1e3:.1f} ms"
  sec = lambda x: f"{x:.2f} s"
  print(
    f"\nGPT decoder d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} seq={cfg.seq_len} "
    f"batch={cfg.batch} vocab={cfg.vocab}; all-linear LoRA r={cfg.rank}; AdamW; "
    f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs"
  )
  head = f"{'train step':<16}{'full':>12}{'hand':>12}{'jlora':>12}{'frozen':>12}"
  head += f"{'jlora/hand':>12}{'jlora/full':>12}{'hand/full':>11}"
  print(head)
  print("-" * len(head))
  for key, label, fmt in (
    ("flops", "FLOPs", gf),
    ("time_s", "time (median)", ms),
    ("time_min_s", "time (min)", ms),
    ("temp_bytes", "temp bytes", mib),
    ("compile_s", "compile", sec),
  ):
    row = f"{label:<16}" + "".join(f"{fmt(steps[n][key]):>12}" for n in ("full", "hand", "jlora", "frozen"))
    row += f"{r('jlora', 'hand', key):>12.3f}{r('jlora', 'full', key):>12.3f}{r('hand', 'full', key):>11.3f}"
    print(row)
  print(
    f"{'trainable':<16}"
    + "".join(f"{steps[n]['trainable_params']:>12,}" for n in ("full", "hand", "jlora", "frozen"))
  )
  head = f"\n{'decode (b=1,t=1)':<16}{'base':>12}{'merged':>12}{'auto':>12}{'factorized':>12}"
  head += f"{'merged/base':>12}{'auto/base':>12}{'fact/base':>11}"
  print(head)
  print("-" * (len(head) - 1))
  for key, label, fmt in (
    ("flops", "FLOPs", lambda x: f"{x / 1e6:.2f} M"),
    ("time_s", "time (median)", lambda x: f"{x * 1e6:.0f} us"),
    ("time_min_s", "time (min)", lambda x: f"{x * 1e6:.0f} us"),
  ):
    row = f"{label:<16}" + "".join(
      f"{fmt(decode[n][key]):>12}" for n in ("base", "merged", "auto", "factorized")
    )
    row += f"{d('merged', key):>12.3f}{d('auto', key):>12.3f}{d('factorized', key):>11.3f}"
    print(row)
  print()
  for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}  {name}")

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
    "decode": decode,
    "ratios": ratios,
    "checks": checks,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2))
  print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  main()
