"""Saving and restoring a sharded adapter from every process of a job: jlora against plain orbax.

Starts a ``jax.distributed`` job of ``--processes`` processes on 127.0.0.1 (``--devices`` CPU devices each),
all on one ``("fsdp", "tp")`` mesh. Each process builds the same sharded adapter tree: ``--layers`` scanned
layers of q/v/down projections of width ``--d-model`` at rank ``--rank``, A and B sharded as
`jlora.adapter_specs` places them. Then, in alternating rounds, the job

* ``jlora``: `jlora.save_adapter` into a fresh directory, then `jlora.load_adapter` onto the same shardings
  (the lock, the agreement between processes, the metadata and the CRC32 of every array, gathered across
  processes, included);
* ``orbax``: orbax's `CheckpointManager` saving the same tree (``StandardSave``, synchronous) into a fresh
  directory, then restoring it onto the same shardings.

Prints the median seconds of each and their ratio (the target is jlora <= 1.5 x orbax), and writes
``--out`` (JSON). Usage::

  python benchmarks/pod_storage.py            # 2 processes x 4 devices, d=1024, 8 layers, r=16
  python benchmarks/pod_storage.py --quick    # tiny sizes (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices", type=int, default=4, help="CPU devices per process")
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pod_storage.json")
  p.add_argument("--worker", nargs=3, metavar=("COORDINATOR", "ID", "DIR"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.d_model, args.layers, args.rank, args.rounds = 128, 2, 4, 2
  return args


def _tree(args: argparse.Namespace):
  """The base, the config and the sharded adapter (each process builds the same one)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jlora

  n = jax.device_count()
  mesh = jax.make_mesh((2, n // 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
  d, L = args.d_model, args.layers
  shapes = {"q_proj": (L, d, d), "v_proj": (L, d, d), "down_proj": (L, 4 * d, d)}
  abstract = {"layers": {k: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)} for k, s in shapes.items()}}
  specs = {"layers": {k: {"kernel": NamedSharding(mesh, P(None, "fsdp", "tp"))} for k in shapes}}
  cfg = jlora.LoraConfig(
    r=args.rank, target_modules=tuple(shapes), layout_pattern={"q_proj|v_proj|down_proj": "sio"}
  )
  lora_abs = jax.eval_shape(lambda: jlora.init(abstract, cfg, key=jax.random.key(0)))
  lora_sh = jlora.adapter_specs(abstract, lora_abs, cfg, specs=specs)
  normal = lambda x, k: jax.random.normal(k, x.shape, x.dtype)  # noqa: E731
  make = jax.jit(
    lambda k: jax.tree_util.tree_map(normal, lora_abs, _keys(k, lora_abs)), out_shardings=lora_sh
  )
  return cfg, make(jax.random.key(1)), lora_sh


def _keys(key, tree):
  import jax

  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))


def _worker(args: argparse.Namespace) -> None:
  coordinator, pid, workdir = args.worker
  import jax

  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=args.processes, process_id=int(pid)
  )
  import orbax.checkpoint as ocp

  import jlora
  from jlora._src.io import processes

  cfg, lora, lora_sh = _tree(args)
  abstract = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), lora, lora_sh
  )
  options = ocp.CheckpointManagerOptions(
    enable_async_checkpointing=False, multiprocessing_options=processes.orbax_options(), create=False
  )

  def run_jlora(d: str) -> None:
    jlora.save_adapter(d, lora, cfg)
    jlora.load_adapter(d, shardings=lora_sh)

  def run_orbax(d: str) -> None:
    if jax.process_index() == 0:
      os.makedirs(d)
    processes.agree("mkdir")
    with ocp.CheckpointManager(d, options=options) as mngr:
      mngr.save(0, args=ocp.args.StandardSave(lora))
      mngr.wait_until_finished()
      mngr.restore(0, args=ocp.args.StandardRestore(abstract))

  times: dict[str, list[float]] = {"jlora": [], "orbax": []}
  for i in range(args.rounds + 1):  # round 0 compiles and warms up both
    for name, fn in (("jlora", run_jlora), ("orbax", run_orbax)):
      processes.agree("round start")
      start = time.perf_counter()
      fn(os.path.join(workdir, f"{name}-{i}"))
      processes.agree("round end")
      if i:
        times[name].append(time.perf_counter() - start)
  if jax.process_index() == 0:
    size = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(lora))
    print(json.dumps({"times": times, "adapter_bytes": size}), flush=True)


def main() -> None:
  args = _args()
  if args.worker:
    _worker(args)
    return
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  workdir = tempfile.mkdtemp(prefix="jlora-pod-bench-")
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}", JAX_PLATFORMS="cpu"
  )
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  passthrough = [
    "--processes",
    str(args.processes),
    "--d-model",
    str(args.d_model),
    "--layers",
    str(args.layers),
  ]
  passthrough += ["--rank", str(args.rank), "--rounds", str(args.rounds)]
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, *passthrough, "--worker", coordinator, str(i), workdir],
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      env=env,
      text=True,
    )
    for i in range(args.processes)
  ]
  try:
    outs = [p.communicate(timeout=900)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    shutil.rmtree(workdir, ignore_errors=True)
  if any(p.returncode for p in procs):
    sys.exit(f"a benchmark process failed: exit codes {[p.returncode for p in procs]}")
  result = json.loads(outs[0].strip().splitlines()[-1])
  med = {k: statistics.median(v) for k, v in result["times"].items()}
  ratio = med["jlora"] / med["orbax"]
  cpu = platform.processor() or platform.machine()
  print(f"device: {cpu} CPU, {args.processes} processes x {args.devices} devices")
  mib = result["adapter_bytes"] / 2**20
  print(f"adapter: {mib:.1f} MiB (d={args.d_model}, {args.layers} layers, r={args.rank})")
  print(
    f"save + restore, median of {args.rounds} rounds: jlora {med['jlora']:.3f} s, orbax {med['orbax']:.3f} s"
  )
  print(f"jlora / orbax: {ratio:.2f} x  (target <= 1.5 x: {'PASS' if ratio <= 1.5 else 'FAIL'})")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(
    json.dumps(
      {"args": {k: str(v) for k, v in vars(args).items()}, **result, "median": med, "ratio": ratio}, indent=2
    )
  )


if __name__ == "__main__":
  main()
