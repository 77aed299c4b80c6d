"""Launching the processes of a ``jax.distributed`` job on 127.0.0.1 for the tests: bounded, killed by pid."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
  """Runs ``python *args`` (this interpreter) in the checkout with ``env``, its output captured as text.

  Raises:
    subprocess.TimeoutExpired: if it runs longer than ``timeout`` seconds (it is killed first).
  """
  return subprocess.run(
    [sys.executable, *args], check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Job:
  """The processes of one job, started by `start`."""

  procs: list[subprocess.Popen]
  logs: list[str]

  def wait(self, timeout: float) -> list[int | None]:
    """Waits for every process (``timeout`` in all); kills, by pid, those still running then. Returns the exit
    codes, ``None`` for a process that had to be killed."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        codes.append(None)
    self.kill()
    return codes

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

  def output(self) -> str:
    text = []
    for i, log in enumerate(self.logs):
      with open(log) as f:
        text.append(f"--- process {i} ---\n{f.read()[-6000:]}")
    return "\n".join(text)


def start(script: str, processes: int, args: list[str], log_dir: str, devices: int = 4) -> Job:
  """Starts ``processes`` copies of ``script COORDINATOR PROCESSES ID *args``, with ``devices`` CPU devices
  each."""
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs, logs = [], []
  for i in range(processes):
    log = os.path.join(log_dir, f"log-{os.path.basename(script)}-{processes}-{i}-{time.monotonic_ns()}.txt")
    with open(log, "w") as f:
      cmd = [sys.executable, script, coordinator, str(processes), str(i), *args]
      procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
    logs.append(log)
  return Job(procs, logs)
