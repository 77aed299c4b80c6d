"""One process of a ``jax.distributed`` job that trains a sharded decoder and uses every jlora storage API.

Usage: ``python tests/_pod_job.py COORDINATOR NUM_PROCESSES PROCESS_ID ROOT OUT MODE``; `tests/test_pods.py`
launches it (``tests/_launch.py``). ``ROOT`` is where the job saves (a local directory or ``gs://...``),
``OUT`` a local directory for what the test reads back: ``result-<id>.json`` (each phase's outcome, written
as it goes) and, from process 0, ``arrays-<processes>.npz`` (the trained adapter and the losses). ``MODE``:

* ``main``: train 3 AdamW steps on one ``("fsdp", "tp")`` 2x4 mesh over all processes, then save and restore
  through every API (also onto a 4x2 mesh), hold a writer open on ``ROOT/busy`` while ``OUT/holding`` exists
  (until ``OUT/release`` appears), and end with an error in one process and a process that never arrives;
* ``intruder``: a second job calling ``save_adapter`` on ``ROOT/busy``.

With ``NUM_PROCESSES`` 1 it runs the same computation on 8 local devices (the one-process reference).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TARGETS = ("q_proj", "v_proj", "down_proj")
LAYOUTS = {"q_proj|v_proj": (1, 1), "down_proj": (1, 1)}
STEPS = 3


class Job:
  """The job's state and the results this process reports."""

  def __init__(self, argv: list[str]) -> None:
    self.coordinator, n, i, self.root, self.out, self.mode = argv
    self.n, self.i = int(n), int(i)
    self.results: dict = {}

  def record(self, name: str, value) -> None:
    self.results[name] = value
    tmp = os.path.join(self.out, f".result-{self.i}.json")
    with open(tmp, "w") as f:
      json.dump(self.results, f)
    os.replace(tmp, os.path.join(self.out, f"result-{self.i}.json"))

  def error(self, name: str, fn) -> None:
    """Runs ``fn`` and records the error it raises (type and message), or that it raised none."""
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
      self.record(name, {"type": type(e).__name__, "message": str(e)})
      return
    self.record(name, None)

  def path(self, name: str) -> str:
    return f"{self.root.rstrip('/')}/{name}"


def gather(tree):
  import jax
  from jax.experimental import multihost_utils

  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(whole, tree)


def max_diff(a, b) -> float:
  import jax

  la, lb = jax.tree_util.tree_leaves(gather(a)), jax.tree_util.tree_leaves(gather(b))
  assert len(la) == len(lb), (len(la), len(lb))
  return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(la, lb))


def name_map(path, index):
  module = str(path[-2])
  group = "mlp" if module.endswith(("down_proj", "up_proj", "gate_proj")) else "self_attn"
  return f"model.layers.{index}.{group}.{module}"


def setup(job: Job) -> dict:
  import flax.linen as nn
  import jax
  import optax
  from jax.sharding import AxisType, NamedSharding

  import jlora
  from tests._sharding_models import FSDP_TP_RULES, Llama, LlamaConfig, next_token_loss

  def mesh_of(shape):
    return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))

  mesh, mesh2 = mesh_of((2, 4)), mesh_of((4, 2))
  model = Llama(LlamaConfig())
  batch_sh = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), FSDP_TP_RULES))
  tokens = jax.jit(lambda k: jax.random.randint(k, (8, 8), 0, 64), out_shardings=batch_sh)(jax.random.key(5))
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  specs = nn.get_partition_spec(boxed)
  param_sh = nn.logical_to_mesh_sharding(specs, mesh, FSDP_TP_RULES)
  params = jax.jit(lambda k, t: nn.unbox(model.init(k, t)), out_shardings=param_sh)(jax.random.key(0), tokens)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layout_pattern=LAYOUTS)
  abstract = jax.eval_shape(lambda: jlora.init(params, cfg, key=jax.random.key(1)))
  lora_sh = jlora.adapter_specs(params, abstract, cfg, specs=param_sh)
  lora_sh2 = jlora.adapter_specs(
    params, abstract, cfg, specs=nn.logical_to_mesh_sharding(specs, mesh2, FSDP_TP_RULES)
  )
  lora0 = jax.jit(lambda p, k: jlora.init(p, cfg, key=k), out_shardings=lora_sh)(params, jax.random.key(1))
  opt = optax.adamw(1e-2)
  apply = jlora.wrap(model.apply, cfg)

  @jax.jit
  def train_step(lora, state, params, tokens):
    loss, grads = jax.value_and_grad(lambda lo: next_token_loss(apply(params, lo, tokens), tokens))(lora)
    updates, state = opt.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, loss

  def step(lora, state):
    return train_step(lora, state, params, tokens)

  return dict(
    mesh=mesh, params=params, cfg=cfg, lora0=lora0, lora_sh=lora_sh, lora_sh2=lora_sh2, opt=opt, step=step
  )


def train_and_manage(job: Job, s: dict) -> dict:
  """Trains, saving every step with its optimizer state into a manager that keeps 2; restores."""
  import jax

  import jlora

  lora, state = s["lora0"], jax.jit(s["opt"].init)(s["lora0"])
  losses, history = [], []
  with jlora.AdapterCheckpointManager(job.path("run"), s["cfg"], base=s["params"], max_to_keep=2) as mngr:
    for i in range(1, STEPS + 1):
      lora, state, loss = s["step"](lora, state)
      losses.append(float(gather(loss)))
      history.append(lora)
      mngr.save(i, lora, opt_state=state)
    mngr.wait_until_finished()
    job.record("manager_steps", mngr.all_steps())
    template = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = mngr.restore(opt_state=template, shardings=s["lora_sh"])
    job.record(
      "manager_restore", [restored.step, max_diff(restored.lora, lora), max_diff(restored.opt_state, state)]
    )
  with jlora.AdapterCheckpointManager(job.path("run"), read_only=True) as reader:
    old = reader.restore(2, shardings=s["lora_sh2"])
    job.record("manager_read_only", [reader.all_steps(), max_diff(old.lora, history[1])])
  job.record("losses", losses)
  whole = gather(lora)  # a collective: every process
  if job.i == 0:
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(whole)}
    np.savez(os.path.join(job.out, f"arrays-{job.n}.npz"), losses=np.asarray(losses), **flat)
  return dict(lora=lora, state=state)


def adapters_and_banks(job: Job, s: dict, lora) -> None:
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jlora

  cfg, params = s["cfg"], s["params"]
  jlora.save_adapter(job.path("adapter"), lora, cfg, base=params)
  jlora.save_adapter(job.path("adapter"), lora, cfg, base=params)  # replaces it
  same, cfg2 = jlora.load_adapter(job.path("adapter"), base=params, shardings=s["lora_sh"])
  other, _ = jlora.load_adapter(job.path("adapter"), base=params, shardings=s["lora_sh2"])
  spec = jax.tree_util.tree_leaves(other)[0].sharding.spec
  job.record("adapter", [cfg2 == cfg, max_diff(same, lora), max_diff(other, lora), str(spec)])
  bank = jlora.stack([(lora, cfg), (s["lora0"], cfg)], names=["trained", "init"])
  jlora.save_bank(job.path("bank"), bank, base=params)
  back = jlora.load_bank(job.path("bank"), base=params, shardings=NamedSharding(s["mesh"], P()))
  job.record(
    "bank", [list(back.names), max_diff(back.adapter(0)[0], lora), max_diff(back.adapter(1)[0], s["lora0"])]
  )


def files(job: Job, s: dict, lora) -> None:
  import jax
  import safetensors.numpy
  from etils import epath

  import jlora

  cfg, params = s["cfg"], s["params"]
  peft_cfg = jlora.export_peft(job.path("peft"), lora, cfg, base=params, name_map=name_map)
  host_params = gather(params)
  back, cfg2 = jlora.import_peft(job.path("peft"), host_params, name_map=name_map, layout_pattern=LAYOUTS)
  job.record("peft", [sorted(peft_cfg["target_modules"]), cfg2.r, max_diff(back, lora)])
  merged = gather(jlora.merge(params, lora, cfg))
  out = jlora.save_merged(job.path("merged_st"), params, lora, cfg, format="safetensors")
  tensors = safetensors.numpy.load(epath.Path(out).read_bytes())
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in kp): v
    for kp, v in jax.tree_util.tree_leaves_with_path(merged)
  }
  job.record(
    "merged_safetensors",
    [sorted(tensors) == sorted(flat), max(float(np.max(np.abs(tensors[k] - flat[k]))) for k in flat)],
  )
  jlora.save_merged(job.path("merged_orbax"), params, lora, cfg, format="orbax")
  import orbax.checkpoint as ocp

  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
  )
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(epath.Path(job.path("merged_orbax")), abstract)
  job.record("merged_orbax", max_diff(restored, merged))


def corrupted_crc(job: Job, s: dict, lora) -> None:
  """An edited CRC of an array that spans both processes is found on restore onto either mesh."""
  from etils import epath

  import jlora
  from jlora._src.io import processes
  from jlora._src.io.checkpoint.metadata import META_CRC, metadata_checksum

  jlora.save_adapter(job.path("crc"), lora, s["cfg"])
  meta_file = epath.Path(job.path("crc")) / "0" / "jlora_meta" / "metadata"
  if job.i == 0:
    meta = json.loads(meta_file.read_text())
    meta["leaves"][0]["crc32"] ^= 1
    meta[META_CRC] = metadata_checksum(meta)
    meta_file.write_text(json.dumps(meta))
  processes.agree("editing the CRC")
  for name, sh in (("crc_same_mesh", s["lora_sh"]), ("crc_other_mesh", s["lora_sh2"])):
    job.error(name, lambda sh=sh: jlora.load_adapter(job.path("crc"), shardings=sh))


def busy(job: Job, s: dict) -> None:
  """Holds a writer open on ROOT/busy until the test has run a second job against it."""
  import jlora
  from jlora._src.io import processes

  with jlora.AdapterCheckpointManager(job.path("busy"), s["cfg"]):
    processes.agree("opened the busy directory")
    if job.i == 0:
      open(os.path.join(job.out, "holding"), "w").close()
      deadline = time.monotonic() + 180
      while not os.path.exists(os.path.join(job.out, "release")) and time.monotonic() < deadline:
        time.sleep(0.2)
    processes.agree("released the busy directory")
  job.record("busy_held", True)


def faults(job: Job, s: dict, lora) -> None:
  """An error in one process raises in all; a process that never arrives is named, nothing hangs."""
  import jax
  import jax.numpy as jnp

  import jlora

  base = s["params"]
  whole = gather(base)  # a collective: every process
  if job.i == 1:  # this process alone passes a base that does not fit
    base = jax.tree_util.tree_map(lambda x: jnp.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype), whole)
  job.error("one_process_error", lambda: jlora.save_adapter(job.path("fault"), lora, s["cfg"], base=base))
  os.environ["JLORA_SYNC_TIMEOUT_S"] = "5"
  if job.i == 0:  # process 1 never calls it
    start = time.monotonic()
    job.error("missing_process", lambda: jlora.save_adapter(job.path("late"), lora, s["cfg"]))
    job.record("missing_process_seconds", time.monotonic() - start)


def intruder(job: Job) -> None:
  import jax.numpy as jnp

  import jlora

  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
  tiny = {"q_proj": {"kernel": {"lora_A": jnp.zeros((4, 2)), "lora_B": jnp.zeros((2, 3))}}}
  job.error("intruder", lambda: jlora.save_adapter(job.path("busy"), tiny, cfg))


def main() -> None:
  job = Job(sys.argv[1:7])
  os.environ.setdefault("JLORA_SYNC_TIMEOUT_S", "60")  # a stuck phase fails the test in a minute
  import jax

  if job.n > 1:
    jax.distributed.initialize(coordinator_address=job.coordinator, num_processes=job.n, process_id=job.i)
  job.record("devices", [jax.process_count(), jax.device_count(), jax.local_device_count()])
  try:
    if job.mode == "intruder":
      intruder(job)
      return
    s = setup(job)
    trained = train_and_manage(job, s)
    if job.n == 1:
      return  # the reference needs the training only
    adapters_and_banks(job, s, trained["lora"])
    files(job, s, trained["lora"])
    corrupted_crc(job, s, trained["lora"])
    busy(job, s)
    faults(job, s, trained["lora"])
    job.record("done", True)
  except Exception:
    job.record("crash", traceback.format_exc())
    raise


if __name__ == "__main__":
  main()
