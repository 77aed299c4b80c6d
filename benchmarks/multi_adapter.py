"""Serving a mixed batch of many adapters (a `jlora.stack` bank) in one step.

The GPT-style decoder of ``_gpt.py`` (adapters on every linear layer of the
blocks, rank 16) serves one batch of ``--batch`` examples whose adapters are
drawn from a bank of N = 1, 4, 16, 64 (example ``e`` uses adapter ``e % N``),
in two phases: prefill (``--seq`` tokens per example) and batch decode (one
token per example, no KV cache: the linear layers' share of a decode step).
For each N it compares, in FLOPs (``cost_analysis``), temp bytes
(``memory_analysis``) and time (median of interleaved rounds):

* ``gather``: the bank routed with ``routing="gather"`` (BGMV);
* ``ragged``: the bank routed with ``routing="ragged"`` (SGMV, ``ragged_dot``);
* ``single``: one adapter for the whole batch, unmerged (``strategy="factorized"``),
  the baseline the issue's targets are relative to;
* ``separate``: each adapter's sub-batch run separately with its own adapter
  (the sum of the N calls);
* ``base``: the model without adapters.

Every routed output is checked against the separate runs. Prints the device,
the tables and the issue's targets (64 adapters: time <= 1.3x and FLOPs <= 1.1x
the single adapter, and faster than the separate sub-batches) as PASS/FAIL, and
writes ``benchmarks/results/multi_adapter.json``.

Usage::

  python benchmarks/multi_adapter.py           # d=256, 4 layers, batch 64, prefill seq 32
  python benchmarks/multi_adapter.py --quick   # tiny sizes, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt  # noqa: E402
from lora_step import _time_interleaved  # noqa: E402

import jlora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
ROUTED = ("gather", "ragged")


def _cost(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, float]:
  compiled = fn.lower(*args, **kwargs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost["flops"]), "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def _adapters(variables: Any, n: int, rank: int, key: jax.Array) -> list[tuple[Any, jlora.LoraConfig]]:
  cfg = jlora.LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=TARGETS, init_lora_weights=False)
  return [(jlora.init(variables, cfg, key=k), cfg) for k in jax.random.split(key, n)]


def _phase(model: Any, variables: Any, tokens: jax.Array, pairs: list, rounds: int) -> dict[str, Any]:
  """All variants for one phase (``tokens``: the batch) and one bank (``pairs``)."""
  n, batch = len(pairs), tokens.shape[0]
  ids = jnp.arange(batch, dtype=jnp.int32) % n
  bank = jlora.stack(pairs)
  cfg = pairs[0][1]
  single = jax.jit(jlora.wrap(model.apply, cfg, strategy="factorized"))
  base = jax.jit(model.apply)
  routed = {d: jax.jit(jlora.wrap(model.apply, bank.config, routing=d)) for d in ROUTED}
  subs = [(k, tokens[k::n]) for k in range(n)]  # adapter k's examples: e % n == k

  res: dict[str, Any] = {
    "base": _cost(base, variables, tokens),
    "single": _cost(single, variables, pairs[0][0], tokens),
  }
  for d, fn in routed.items():
    res[d] = _cost(fn, variables, bank.lora, tokens, adapter_ids=ids)
  costs: dict[tuple[int, ...], dict[str, float]] = {}  # one program per sub-batch shape
  for k, x in subs:
    if x.shape not in costs:
      costs[x.shape] = _cost(single, variables, pairs[k][0], x)
  sep = [costs[x.shape] for _, x in subs]
  res["separate"] = {key: sum(c[key] for c in sep) for key in ("flops", "temp_bytes")}

  want = np.zeros((batch, *model.apply(variables, tokens[:1]).shape[1:]), np.float32)
  for k, x in subs:
    want[k::n] = np.asarray(single(variables, pairs[k][0], x))
  scale = float(np.max(np.abs(want)))
  for d, fn in routed.items():
    got = np.asarray(fn(variables, bank.lora, tokens, adapter_ids=ids))
    res[d]["max_rel_err_vs_separate"] = float(np.max(np.abs(got - want))) / scale

  def separate() -> list[Any]:
    return [single(variables, pairs[k][0], x) for k, x in subs]

  calls = {
    "base": lambda: base(variables, tokens),
    "single": lambda: single(variables, pairs[0][0], tokens),
    "separate": separate,
    **{d: (lambda fn=fn: fn(variables, bank.lora, tokens, adapter_ids=ids)) for d, fn in routed.items()},
  }
  times = _time_interleaved(calls, rounds)
  for name, ts in times.items():
    res[name]["time_s"] = statistics.median(ts)
    res[name]["time_vs_single"] = statistics.median(a / b for a, b in zip(ts, times["single"]))
    res[name]["flops_vs_single"] = res[name]["flops"] / res["single"]["flops"]
  return res


def _print(phase: str, by_n: dict[int, dict[str, Any]]) -> None:
  names = ("base", "single", "gather", "ragged", "separate")
  print(f"\n{phase}: time (ms) | time / single | FLOPs / single | temp MiB")
  print(f"{'N':>4} " + "".join(f"{n:>30}" for n in names))
  for n, res in by_n.items():
    cells = [
      f"{1e3 * res[k]['time_s']:8.2f} {res[k]['time_vs_single']:6.2f} {res[k]['flops_vs_single']:6.3f} "
      f"{res[k]['temp_bytes'] / 2**20:7.2f}"
      for k in names
    ]
    print(f"{n:>4} " + "".join(f"{c:>30}" for c in cells))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes, N = 1 and 4 (smoke test)")
  _gpt.add_size_args(p, seq=32, batch=64, seq_help="prefill tokens per example")
  p.add_argument("--adapters", default="1,4,16,64", help="bank sizes N")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--out", type=Path, default=RESULTS / "multi_adapter.json")
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.layers, args.vocab, args.batch, args.seq, args.rank = 64, 2, 256, 8, 8, 4
    args.adapters, args.rounds = "1,4", 2
  cfg = _gpt.config_from(args)
  model = _gpt.GPT(cfg)
  key = jax.random.key(0)
  k_init, k_tok, k_lora = jax.random.split(key, 3)
  prefill = jax.random.randint(k_tok, (args.batch, args.seq), 0, args.vocab)
  variables = model.init(k_init, prefill)
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} devices)"
  print(f"device: {device}; jax {jax.__version__}; {platform.processor() or platform.machine()}")
  sizes_txt = f"d={cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab}"
  print(f"model: {sizes_txt}; batch {args.batch}, rank {args.rank}")
  sizes = [int(s) for s in args.adapters.split(",")]
  all_pairs = _adapters(variables, max(sizes), args.rank, k_lora)
  phases = {"prefill": prefill, "decode": prefill[:, :1]}
  result: dict[str, Any] = {
    "device": device,
    "jax": jax.__version__,
    "args": {k: v for k, v in vars(args).items() if k != "out"},
    "phases": {},
    "checks": {},
  }
  for phase, tokens in phases.items():
    by_n = {n: _phase(model, variables, tokens, all_pairs[:n], args.rounds) for n in sizes}
    result["phases"][phase] = {str(n): r for n, r in by_n.items()}
    _print(phase, by_n)
    top, n_max = by_n[max(sizes)], max(sizes)
    checks = {}
    for d in ROUTED:
      checks[f"{phase} N={n_max}: {d} time <= 1.3x single"] = top[d]["time_vs_single"] <= 1.3
      checks[f"{phase} N={n_max}: {d} FLOPs <= 1.1x single"] = top[d]["flops_vs_single"] <= 1.1
      checks[f"{phase} N={n_max}: {d} faster than separate sub-batches"] = (
        top[d]["time_s"] < top["separate"]["time_s"]
      )
    checks[f"{phase}: routed outputs equal the separate runs (rel err < 1e-4)"] = all(
      r[d]["max_rel_err_vs_separate"] < 1e-4 for r in by_n.values() for d in ROUTED
    )
    result["checks"].update(checks)
  print()
  return _gpt.finish(result["checks"], args.out, result)


if __name__ == "__main__":
  main()
