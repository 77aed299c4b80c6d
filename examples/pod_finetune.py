"""Fine-tuning with jlora on a TPU pod or a multi-GPU job: the one script every process runs.

Every process (one per host on a TPU pod, one per GPU on a multi-GPU host) runs this same script. They
join one ``jax.distributed`` job, build one mesh over all devices, create the base and the adapter already
sharded over it, train, checkpoint every few steps (resuming from the newest step if the directory has one),
and at the end save the adapter and export it as a PEFT adapter. Every jlora storage call is made by every
process, as orbax expects: arrays are written by the processes that hold them, jlora's own files by the
primary process, and an error in any process is raised in all of them.

Usage::

  python examples/pod_finetune.py --dir gs://my-bucket/run      # on every host (jax finds the others)
  python examples/pod_finetune.py --dir /tmp/run --local 2      # here: 2 processes x 4 CPU devices

``--dir`` may be a local directory (shared by all hosts) or any path orbax takes (``gs://``: install
``jlora[gcs]``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

STEPS, SAVE_EVERY = 6, 2
RULES = (("batch", "fsdp"), ("embed", "fsdp"), ("hidden", "tp"), ("vocab", "tp"))


def _args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", required=True, help="where to checkpoint: a shared directory or gs://bucket/path")
  p.add_argument("--local", type=int, default=0, help="start this many processes here, on 127.0.0.1")
  p.add_argument("--process", nargs=3, metavar=("COORDINATOR", "COUNT", "ID"), help=argparse.SUPPRESS)
  return p.parse_args()


def launch_here(args: argparse.Namespace) -> int:
  """Starts ``--local`` processes of this script on this machine, 4 CPU devices each; waits for them."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, "--dir", args.dir, "--process", coordinator, str(args.local), str(i)],
      env=env,
    )
    for i in range(args.local)
  ]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return max(codes)


def main(args: argparse.Namespace) -> None:
  import flax.linen as nn
  import jax
  import optax

  import jlora

  if args.process:  # started by --local; on a pod, `initialize()` finds the coordinator by itself
    coordinator, count, pid = args.process
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(count), process_id=int(pid))
  else:
    jax.distributed.initialize()

  class Block(nn.Module):  # the model: Dense layers with logical axis names, as MaxText-style code has
    @nn.compact
    def __call__(self, tokens):
      dense = lambda n, axes, name: nn.Dense(  # noqa: E731
        n,
        use_bias=False,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      )
      x = nn.Embed(
        64, 32, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
      )(tokens)
      q, v = dense(32, ("embed", "hidden"), "q_proj")(x), dense(32, ("embed", "hidden"), "v_proj")(x)
      x = x + dense(32, ("hidden", "embed"), "o_proj")(jax.nn.softmax(q) * v)
      return dense(64, ("embed", "vocab"), "lm_head")(x)

  # One mesh over every device of every process.
  auto = jax.sharding.AxisType.Auto  # GSPMD places what the model leaves unnamed
  mesh = jax.make_mesh((2, jax.device_count() // 2), ("fsdp", "tp"), axis_types=(auto, auto))
  model = Block()
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  tokens = jax.jit(lambda k: jax.random.randint(k, (8, 16), 0, 64), out_shardings=batch)(jax.random.key(0))
  abstract = jax.eval_shape(model.init, jax.random.key(1), tokens)
  param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
  params = jax.jit(lambda k, t: nn.unbox(model.init(k, t)), out_shardings=param_sh)(jax.random.key(1), tokens)

  # The adapter, created sharded where its base kernels are.
  cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
  lora_abs = jax.eval_shape(lambda p: jlora.init(p, cfg, key=jax.random.key(2)), params)
  lora_sh = jlora.adapter_specs(params, lora_abs, cfg, specs=param_sh)
  lora = jax.jit(lambda p, k: jlora.init(p, cfg, key=k), out_shardings=lora_sh)(params, jax.random.key(2))
  opt = optax.adamw(1e-2)
  state = jax.jit(opt.init)(lora)
  apply = jlora.wrap(model.apply, cfg)

  @jax.jit
  def step(lora, state, params, tokens, key):
    def loss_fn(lo):
      logits = apply(params, lo, tokens[:, :-1], lora_dropout_key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(lora)
    updates, state = opt.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, loss

  # Checkpoints: every process opens the manager and calls every method.
  with jlora.AdapterCheckpointManager(f"{args.dir}/steps", cfg, base=params, max_to_keep=2) as mngr:
    start = 0
    if mngr.latest_step() is not None:  # resume: the adapter and the optimizer state, sharded as before
      template = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
      )
      restored = mngr.restore(shardings=lora_sh, opt_state=template)
      lora, state, start = restored.lora, restored.opt_state, restored.step + 1
    for i in range(start, STEPS):
      lora, state, loss = step(lora, state, params, tokens, jax.random.fold_in(jax.random.key(3), i))
      if (i + 1) % SAVE_EVERY == 0:
        mngr.save(i, lora, opt_state=state)
      if jax.process_index() == 0:
        print(f"step {i}: loss {float(loss):.4f}", flush=True)  # a replicated scalar: every process has it

  # The result: a jlora adapter, and a PEFT adapter for serving stacks (the name map gives PyTorch names).
  jlora.save_adapter(f"{args.dir}/adapter", lora, cfg, base=params)
  jlora.export_peft(
    f"{args.dir}/peft",
    lora,
    cfg,
    base=params,
    name_map=lambda path, index: f"model.{path[-2]}",
    overwrite=True,
  )
  restored, _ = jlora.load_adapter(f"{args.dir}/adapter", base=params, shardings=lora_sh)
  if jax.process_index() == 0:
    print(f"saved {args.dir}/adapter and {args.dir}/peft from {jax.process_count()} processes", flush=True)


if __name__ == "__main__":
  arguments = _args()
  if arguments.local and not arguments.process:
    sys.exit(launch_here(arguments))
  main(arguments)
