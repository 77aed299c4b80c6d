"""Subprocess for the crash-safety and concurrency tests: saves adapter checkpoints.

Usage: ``python tests/_crash_saver.py DIRECTORY MODE [STEPS [START [PAUSE_AT]]]``
with MODE ``manager`` (async `AdapterCheckpointManager`, keeps 2 steps;
``STEPS`` given: keeps 3; prints ``open`` once open) or ``save_adapter``. Saves
steps ``START, START + 1, ...`` (``STEPS`` of them, default: until killed);
every leaf of step ``s`` is filled with ``s``, and after each complete save it
prints ``done <s>``; after step ``PAUSE_AT`` it waits for a line on stdin. An
error (e.g. another writer holds the directory) goes to stderr, exit status 1.
"""

import sys

import jax.numpy as jnp

import jlora

SHAPES = {"lora_A": (256, 8), "lora_B": (8, 512)}


def adapter(step: int) -> dict:
  layer = {"q_proj": {"kernel": {k: jnp.full(s, float(step), jnp.float32) for k, s in SHAPES.items()}}}
  return {"layers": {i: layer for i in range(8)}}


def main() -> None:
  directory, mode = sys.argv[1], sys.argv[2]
  steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10**6
  start = int(sys.argv[4]) if len(sys.argv) > 4 else 0
  pause_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj",))
  if mode == "manager":
    keep = 2 if len(sys.argv) <= 3 else 3
    with jlora.AdapterCheckpointManager(directory, cfg, max_to_keep=keep) as mngr:
      print("open", flush=True)
      for step in range(start, start + steps):
        mngr.save(step, adapter(step))
        mngr.wait_until_finished()
        print(f"done {step}", flush=True)
        if step == pause_at:
          sys.stdin.readline()
  else:
    for step in range(start, start + steps):
      jlora.save_adapter(directory, adapter(step), cfg)
      print(f"done {step}", flush=True)


if __name__ == "__main__":
  main()
