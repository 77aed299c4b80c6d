"""Subprocess for the crash-safety test: saves adapter checkpoints until killed.

Usage: ``python tests/_crash_saver.py DIRECTORY MODE`` with MODE ``manager``
(async `AdapterCheckpointManager`, keeps 2 steps) or ``save_adapter``. Every
leaf of step ``s`` is filled with ``s``; after each complete save it prints
``done <s>``.
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
  cfg = jlora.LoraConfig(r=8, target_modules=("q_proj",))
  if mode == "manager":
    with jlora.AdapterCheckpointManager(directory, cfg, max_to_keep=2) as mngr:
      for step in range(10**6):
        mngr.save(step, adapter(step))
        mngr.wait_until_finished()
        print(f"done {step}", flush=True)
  else:
    for step in range(10**6):
      jlora.save_adapter(directory, adapter(step), cfg)
      print(f"done {step}", flush=True)


if __name__ == "__main__":
  main()
