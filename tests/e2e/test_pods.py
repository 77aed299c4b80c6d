"""jlora's storage in a real ``jax.distributed`` job: 2 processes x 4 CPU devices on 127.0.0.1.

One job (``tests/_pod_job.py``) trains a sharded decoder on one 2x4 mesh over both processes and goes
through every storage API; a second job tries to write where the first one is writing; the same training
runs in one process on 8 devices as the reference. Local disk and ``gs://`` (the GCS emulator). Every
launch is bounded by a timeout, and only the processes started here are killed, by pid.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests import TESTS, _launch

JOB = os.path.join(TESTS, "_pod_job.py")


def _results(out: str, processes: int) -> list[dict]:
  got = []
  for i in range(processes):
    with open(os.path.join(out, f"result-{i}.json")) as f:
      got.append(json.load(f))
  return got


def _run_main(root: str, out: str, logs: str) -> tuple[list[dict], list[dict]]:
  """The 2-process job, with the intruder job launched while it holds ``root/busy``."""
  main = _launch.start(JOB, 2, [root, out, "main"], logs)
  intruder_out = os.path.join(out, "intruder")
  os.makedirs(intruder_out)
  try:
    deadline = time.monotonic() + 420
    while not os.path.exists(os.path.join(out, "holding")):
      assert time.monotonic() < deadline and all(p.poll() is None for p in main.procs), main.output()
      time.sleep(0.2)
    intruder = _launch.start(JOB, 2, [root, intruder_out, "intruder"], logs)
    codes = intruder.wait(timeout=180)
    assert codes == [0, 0], intruder.output()
  finally:
    open(os.path.join(out, "release"), "w").close()
    codes = main.wait(timeout=240)
  assert codes == [0, 0], main.output()
  return _results(out, 2), _results(intruder_out, 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same training in one process with 8 devices."""
  out = str(tmp_path_factory.mktemp("reference"))
  job = _launch.start(JOB, 1, [os.path.join(out, "root"), out, "main"], out, devices=8)
  assert job.wait(timeout=300) == [0], job.output()
  return dict(np.load(os.path.join(out, "arrays-1.npz")))


@pytest.fixture(scope="module", params=["local", "gcs"])
def pod(request, tmp_path_factory):
  out = str(tmp_path_factory.mktemp(f"pod-{request.param}"))
  if request.param == "local":
    root = os.path.join(out, "root")
  else:
    root = f"{request.getfixturevalue('gcs_bucket')}/pod-{time.monotonic_ns()}"
  results, intruder = _run_main(root, out, out)
  return dict(kind=request.param, root=root, out=out, results=results, intruder=intruder)


def test_both_processes_see_one_mesh_and_finish(pod):
  for r in pod["results"]:
    assert r["devices"] == [2, 8, 4] and r.get("crash") is None and r["done"]


def test_training_equals_the_one_process_run(pod, reference):
  arrays = dict(np.load(os.path.join(pod["out"], "arrays-2.npz")))
  assert set(arrays) == set(reference)
  np.testing.assert_allclose(arrays.pop("losses"), reference["losses"], rtol=1e-6)
  for name, value in arrays.items():
    np.testing.assert_allclose(value, reference[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_manager_keeps_two_steps_and_restores_them_exactly(pod):
  for r in pod["results"]:
    assert r["manager_steps"] == [2, 3]
    assert r["manager_restore"] == [3, 0.0, 0.0]  # step, adapter and optimizer state bit-equal
    assert r["manager_read_only"] == [[2, 3], 0.0]  # step 2, read onto the 4x2 mesh


def test_adapter_and_bank_round_trip_onto_both_meshes(pod):
  for r in pod["results"]:
    cfg_equal, same_mesh, other_mesh, spec = r["adapter"]
    assert cfg_equal and same_mesh == 0.0 and other_mesh == 0.0
    assert spec == "P(None, 'tp', None)"  # restored onto the 4x2 mesh's shardings
    assert r["bank"] == [["trained", "init"], 0.0, 0.0]


def test_peft_and_merged_files_from_the_sharded_adapter(pod):
  for r in pod["results"]:
    assert r["peft"] == [["down_proj", "q_proj", "v_proj"], 4, 0.0]
    assert r["merged_safetensors"] == [True, 0.0]
    assert r["merged_orbax"] == 0.0


def test_a_corrupted_checksum_of_a_sharded_array_is_found_on_any_mesh(pod):
  for r in pod["results"]:
    for name in ("crc_same_mesh", "crc_other_mesh"):
      assert r[name]["type"] == "CorruptCheckpointError"
      assert "'params/layers/down_proj/kernel/lora_A' fails its checksum" in r[name]["message"]


def test_a_second_job_is_refused_in_all_its_processes(pod):
  first, second = pod["intruder"]
  for r in (first, second):
    assert r["intruder"]["type"] == "CheckpointBusyError"
    assert "primary of a 2-process job" in r["intruder"]["message"]
  assert second["intruder"]["message"].startswith("process 0 of the job failed: ")
  if pod["kind"] == "gcs":
    assert "jlora.break_writer_lock(" in first["intruder"]["message"]


def test_an_error_in_one_process_raises_in_all(pod):
  first, second = pod["results"]
  assert first["one_process_error"]["type"] == second["one_process_error"]["type"] == "ValueError"
  assert (
    first["one_process_error"]["message"]
    == "process 1 of the job failed: " + second["one_process_error"]["message"]
  )


def test_a_process_that_never_arrives_is_named_and_nothing_hangs(pod):
  first = pod["results"][0]
  assert first["missing_process"]["type"] == "SyncTimeoutError"
  assert (
    "process(es) [1] of this 2-process job did not arrive within 5 s" in first["missing_process"]["message"]
  )
  assert first["missing_process_seconds"] < 30


def test_the_pod_example_trains_resumes_and_exports(tmp_path):
  """`examples/pod_finetune.py --local 2`, the README's pod script, twice: the second run resumes."""
  import subprocess
  import sys

  script = os.path.join(_launch.ROOT, "examples", "pod_finetune.py")
  run = lambda: subprocess.run(  # noqa: E731
    [sys.executable, script, "--dir", str(tmp_path / "run"), "--local", "2"],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  first = run()
  assert first.returncode == 0, first.stderr[-4000:]
  assert [ln.split(":")[0] for ln in first.stdout.splitlines() if ln.startswith("step")] == [
    f"step {i}" for i in range(6)
  ]
  assert "from 2 processes" in first.stdout
  assert sorted(os.listdir(tmp_path / "run" / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
  second = run()
  assert second.returncode == 0, second.stderr[-4000:]
  assert not [ln for ln in second.stdout.splitlines() if ln.startswith("step")]  # resumed after step 5
