"""DoRA train step vs LoRA train step vs a materialising DoRA, on the GPT of `_gpt`.

Four AdamW train steps on the same all-linear adapter (rank ``r``) of the same
model and batch:

* ``lora``: `jlora.wrap`, plain LoRA;
* ``dora``: `jlora.wrap` with ``use_dora=True``: the column norms from
  ``||W||^2``, ``A^T W`` and ``A^T A`` (never an ``in x out`` update);
  each product ``y`` kept for the magnitude's gradient;
* ``dora_recompute``: the same with ``dora_recompute=True``: each ``y``
  computed again in the backward pass instead of kept;
* ``dora_peft``: as PEFT computes DoRA: the norm from the materialised
  ``W + scale * A @ B`` (a kernel-sized temporary per layer), the products
  factorized (jlora's DoRA with its norm swapped for the dense one);
* ``dora_merged``: ``model.apply(jlora.merge(params, lora, cfg))``: the whole
  DoRA kernel formed, with a kernel-sized gradient.

For each: FLOPs (``compiled.cost_analysis()``), temp bytes
(``compiled.memory_analysis().temp_size_in_bytes``) and the step time, the
variants timed interleaved round by round (ratios: the median of per-round
ratios). Writes ``benchmarks/results/dora_step.json``.

  python benchmarks/dora_step.py            # d_model 256, 4 layers, seq 128, batch 8, r 16
  python benchmarks/dora_step.py --quick    # tiny sizes (CI smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpt  # noqa: E402
import lora_step  # noqa: E402

import jlora  # noqa: E402
from jlora._src.adapters import dora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("lora", "dora", "dora_recompute", "dora_peft", "dora_merged")


def _dense_norm(value: Any) -> jax.Array:
  """PEFT's norm: ``||W + scale * A @ B||`` from the materialised update."""
  v = value.base.astype(jnp.float32) + value.delta()
  fan_in = tuple(i for i in range(v.ndim) if i not in value.b_axes)
  norm = jnp.sqrt(jnp.sum(v * v, axis=fan_in))
  return jax.lax.stop_gradient(jnp.transpose(norm, [sorted(value.b_axes).index(ax) for ax in value.b_axes]))


@contextlib.contextmanager
def _materialised_norm() -> Iterator[None]:
  """Traces with the dense norm in place of jlora's factorized one (benchmark only)."""
  factorized = dora.column_norm
  dora.column_norm = _dense_norm
  try:
    yield
  finally:
    dora.column_norm = factorized


def _steps(cfg: _gpt.GPTConfig, key: jax.Array) -> dict[str, _gpt.Variant]:
  k_init, k_lora, k_tok = jax.random.split(key, 3)
  tokens = jax.random.randint(k_tok, (cfg.batch, cfg.seq_len), 0, cfg.vocab)
  model = _gpt.GPT(cfg)
  variables = model.init(k_init, tokens)
  opt = optax.adamw(1e-3)
  lcfg = _gpt.lora_config(cfg)
  dcfg = jlora.LoraConfig(
    r=cfg.rank, lora_alpha=cfg.alpha, target_modules="all-linear", init_lora_weights=False, use_dora=True
  )
  lora = jlora.init(variables, lcfg, key=k_lora, apply_fn=model.apply, example_args=(tokens,))
  dlora = jlora.init(variables, dcfg, key=k_lora, apply_fn=model.apply, example_args=(tokens,))
  xent = _gpt._xent  # noqa: SLF001
  apply_lora, apply_dora = jlora.wrap(model.apply, lcfg), jlora.wrap(model.apply, dcfg)
  apply_again = jlora.wrap(model.apply, dcfg, dora_recompute=True)

  def merged(lo, v, t):
    return xent(model.apply(jlora.merge(v, lo, dcfg), t), t)

  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731
  return {
    "lora": _gpt._variant(
      "lora", opt, lambda lo, v, t: xent(apply_lora(v, lo, t), t), lora, variables, tokens
    ),  # noqa: SLF001
    "dora": _gpt._variant(  # noqa: SLF001
      "dora", opt, lambda lo, v, t: xent(apply_dora(v, lo, t), t), copy(dlora), variables, tokens
    ),
    "dora_recompute": _gpt._variant(  # noqa: SLF001
      "dora_recompute", opt, lambda lo, v, t: xent(apply_again(v, lo, t), t), copy(dlora), variables, tokens
    ),
    "dora_peft": _gpt._variant(  # noqa: SLF001
      "dora_peft", opt, lambda lo, v, t: xent(apply_dora(v, lo, t), t), copy(dlora), variables, tokens
    ),
    "dora_merged": _gpt._variant("dora_merged", opt, merged, copy(dlora), variables, tokens),  # noqa: SLF001
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
  _gpt.add_size_args(p)
  p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (one step each)")
  p.add_argument("--out", type=Path, default=RESULTS / "dora_step.json")
  args = p.parse_args(argv)
  if args.quick:  # few tokens: the kernels, not the activations, set the temp bytes
    args.d_model, args.layers, args.seq, args.batch, args.rank, args.vocab = 256, 2, 8, 1, 4, 256
    args.rounds = 3
  cfg = _gpt.config_from(args)
  variants = _steps(cfg, jax.random.key(0))
  steps: dict[str, dict[str, Any]] = {}
  losses = {}
  for name in VARIANTS:
    v = variants[name]
    with _materialised_norm() if name == "dora_peft" else contextlib.nullcontext():
      v.step = v.step.lower(*v.state, *v.static).compile()
    steps[name] = {**lora_step._cost(v.step), "trainable_params": v.n_trainable}  # noqa: SLF001
  for name in VARIANTS[1:]:  # the same first step: the same loss
    v = variants[name]
    *state, loss = v.step(*jax.tree_util.tree_map(jnp.copy, v.state), *v.static)
    losses[name] = float(loss)
  times = lora_step._time_interleaved({k: variants[k].run for k in VARIANTS}, rounds=args.rounds)  # noqa: SLF001
  for name, ts in times.items():
    steps[name]["time_s"] = statistics.median(ts)
  pairs = (
    ("dora", "lora"),
    ("dora", "dora_peft"),
    ("dora", "dora_merged"),
    ("dora_recompute", "lora"),
    ("dora_recompute", "dora_peft"),
    ("dora_recompute", "dora_merged"),
    ("dora_peft", "lora"),
  )
  ratios = {f"{k}.{a}/{b}": steps[a][k] / steps[b][k] for k in ("flops", "temp_bytes") for a, b in pairs}
  ratios.update({f"time_s.{a}/{b}": lora_step._paired(times, a, b) for a, b in pairs})  # noqa: SLF001
  temp = lambda name: steps[name]["temp_bytes"]  # noqa: E731
  checks = {
    "time dora/lora <= 1.25": ratios["time_s.dora/lora"] <= 1.25,
    "temp dora < dora_peft": temp("dora") < temp("dora_peft"),
    "temp dora < dora_merged": temp("dora") < temp("dora_merged"),
    "time dora_recompute/lora <= 1.25": ratios["time_s.dora_recompute/lora"] <= 1.25,
    "temp dora_recompute < dora_peft": temp("dora_recompute") < temp("dora_peft"),
    "temp dora_recompute < dora_merged": temp("dora_recompute") < temp("dora_merged"),
    "same first-step loss (1e-4)": max(losses.values()) - min(losses.values()) < 1e-4,
  }
  result = {
    "config": dataclasses.asdict(cfg),
    "device": jax.devices()[0].device_kind,
    "platform": platform.platform(),
    "steps": steps,
    "first_step_loss": losses,
    "ratios": ratios,
    "checks": checks,
  }
  print(
    f"DoRA step, d_model={cfg.d_model} layers={cfg.n_layers} seq={cfg.seq_len} batch={cfg.batch} r={cfg.rank}"
  )
  print(f"{'variant':<15} {'GFLOPs':>9} {'temp MiB':>9} {'time ms':>9}")
  for name in VARIANTS:
    s = steps[name]
    print(f"{name:<15} {s['flops'] / 1e9:>9.3f} {s['temp_bytes'] / 2**20:>9.2f} {s['time_s'] * 1e3:>9.2f}")
  for k, v in ratios.items():
    print(f"{k:<32} {v:.3f}")
  return _gpt.finish(checks, args.out, result)


if __name__ == "__main__":
  main()
