"""Shared test configuration: 8 simulated CPU devices for sharding tests, fast compiles, a compilation cache,
one ``pytest-xdist`` worker per core, and a local GCS for ``gs://`` tests.

The GCS emulator's variables (`tests/_gcs_emulator.env`) are set here, before jax, fsspec or gcsfs are
imported, so that every client in this session and in the processes it starts talks to 127.0.0.1 only;
the `gcs_bucket` fixture starts the emulator on first use and stops it, by pid, at the end of the session.
"""

import ctypes
import gc
import importlib.util
import os
import socket
import tempfile

import pytest

# Must be set before jax is imported anywhere in the test session. Besides the 8 devices: the suite compiles
# thousands of small programs and runs each a few times, so XLA's backend optimizations (LLVM's passes) cost
# more than they save; off, the fast tests take a third less time. (Processes that tests start set their own.)
os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  " --xla_llvm_disable_expensive_passes=true",
)
# Each xdist worker is a process of its own: on a GPU, none may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# transformers (imported by peft) would import TensorFlow and Keras, 600 MB no test uses.
os.environ.setdefault("USE_TF", "0")

from tests import _gcs_emulator  # noqa: E402 - after the variables above; imports nothing heavy


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_GCS_PORT = _free_port()
os.environ.update(_gcs_emulator.env(_GCS_PORT))


_WORKER_BYTES = 1.5 * 2**30  # what one worker needs at its peak (see `_RSS_LIMIT`)


def pytest_xdist_auto_num_workers(config):
  """``-n auto`` (pyproject.toml's default): one worker per core, as many as the available memory holds."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  try:
    with open("/proc/meminfo") as f:
      available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    return cores
  return max(1, min(cores, int(available // _WORKER_BYTES)))


def pytest_configure(config):
  """Compiled programs go to a persistent cache, read back by this and later runs.

  Most of the suite's time is XLA compiling small programs, many of them the same program compiled again
  (the same model under a fresh ``jax.jit`` in another test, eager ops after `_fresh_jax_caches`). The
  cache is set in this process only, not through the environment: the processes that tests start (pods,
  benchmarks) compile as they would anywhere. ``JAX_COMPILATION_CACHE_DIR`` picks another directory;
  set it to an empty string to run without a cache.
  """
  if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
    return  # the controller of ``pytest -n``: it runs no test, and needs no jax
  import jax  # noqa: PLC0415 - after XLA_FLAGS above

  default = os.path.join(tempfile.gettempdir(), "jlora-tests-xla-cache")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", default)
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# Each compiled program holds about 1.5 MB of host memory until JAX's caches drop it; a module compiles
# hundreds. Past this much resident memory (``JLORA_TEST_RSS_MB``), the caches are dropped after the test.
_RSS_LIMIT = int(os.environ.get("JLORA_TEST_RSS_MB", "1200")) * 2**20


def _resident_bytes() -> int:
  """This process's resident memory (0 where ``/proc`` does not tell it)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def _drop_jax_caches() -> None:
  """Drops JAX's in-memory caches (compiled programs, traces) and hands the freed memory back to the OS."""
  import jax  # noqa: PLC0415

  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed pages otherwise; a no-op elsewhere
  except (AttributeError, OSError):
    pass


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """JAX's caches dropped after each module, so compiled programs do not pile up over the session (the
  persistent cache above makes compiling them again cheap)."""
  yield
  _drop_jax_caches()


@pytest.fixture(autouse=True)
def _bounded_memory():
  """JAX's caches dropped after a test that leaves this process over `_RSS_LIMIT`: the peak stays near the
  limit plus one test's programs, whatever the module (and two ``pytest -n 2`` workers fit in 3 GB)."""
  yield
  if _resident_bytes() > _RSS_LIMIT:
    _drop_jax_caches()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """``gs://jlora-test`` on a local emulator (skipped where the `test` extra's emulator is not installed)."""
  if importlib.util.find_spec("gcp_storage_emulator") is None or importlib.util.find_spec("gcsfs") is None:
    pytest.skip("the GCS tests need `pip install -e '.[test]'` (gcp-storage-emulator, jlora[gcs])")
  proc = _gcs_emulator.start(_GCS_PORT, str(tmp_path_factory.mktemp("gcs")))
  try:
    yield f"gs://{_gcs_emulator.BUCKET}"
  finally:
    _gcs_emulator.stop(proc)
