"""Shared test configuration: 8 simulated CPU devices for sharding tests, and a local GCS for ``gs://`` tests.

The GCS emulator's variables (`tests/_gcs_emulator.env`) are set here, before jax, fsspec or gcsfs are
imported, so that every client in this session and in the processes it starts talks to 127.0.0.1 only;
the `gcs_bucket` fixture starts the emulator on first use and stops it, by pid, at the end of the session.
"""

import importlib.util
import os
import socket

import pytest

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from tests import _gcs_emulator  # noqa: E402 - after the variables above; imports nothing heavy


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_GCS_PORT = _free_port()
os.environ.update(_gcs_emulator.env(_GCS_PORT))


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
