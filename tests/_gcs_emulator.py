"""A local Google Cloud Storage for the tests: `gcp-storage-emulator`, two gaps closed for tensorstore.

Run as a script, it is the emulator's own command line (``-d DIR start --host
127.0.0.1 --port PORT --default-bucket NAME -q``) with two handlers wrapped
first, so that the emulator answers as GCS does:

1. media downloads carry ``x-goog-generation`` and ``x-goog-metageneration``
   (tensorstore's conditional writes of OCDBT manifests read them);
2. uploads and deletes honour ``ifGenerationMatch`` (``0``: only if absent),
   answering 412 otherwise; jlora's writer lease relies on it.

Imported, it gives `env` (the variables that keep every client on
127.0.0.1; set them before jax, fsspec or gcsfs are imported) and `start` /
`stop` for a fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus

BUCKET = "jlora-test"


def env(port: int) -> dict[str, str]:
  """The variables that send tensorstore, gcsfs and google-cloud-storage to the emulator, and nowhere else."""
  url = f"http://127.0.0.1:{port}"
  closed = "127.0.0.1:9"  # the discard port: any metadata-server lookup fails at once, on loopback
  return {
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
    "STORAGE_EMULATOR_HOST": url,
    "FSSPEC_GCS_TOKEN": "anon",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GOOGLE_CLOUD_PROJECT": "emulator-project",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": closed,
    "GCE_METADATA_ROOT": closed,
    "GCE_METADATA_IP": closed,
    # etils.epath reads gs:// through TensorFlow's own GCS client whenever TensorFlow is installed (the
    # notebooks extra brings it, for keras-hub); that client knows no emulator, so keep epath on fsspec.
    "EPATH_USE_TF": "false",
  }


def start(port: int, data_dir: str, timeout: float = 60.0) -> subprocess.Popen:
  """Starts the emulator on 127.0.0.1:``port`` and waits until its bucket answers."""
  proc = subprocess.Popen(
    [sys.executable, __file__, "-d", data_dir, "start", "--host", "127.0.0.1", "--port", str(port)]
    + ["--default-bucket", BUCKET, "-q"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + timeout
  url = f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}"
  while time.monotonic() < deadline:
    try:
      with urllib.request.urlopen(url, timeout=2) as r:
        if r.status == 200:
          return proc
    except OSError:
      if proc.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited with status {proc.returncode}") from None
      time.sleep(0.2)
  stop(proc)
  raise RuntimeError(f"the GCS emulator did not answer on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
  """Stops the emulator this module started, by its pid."""
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()


# -- the shim ---------------------------------------------------------------------------------


def _current_generation(storage, bucket: str, name: str) -> int | None:
  from gcp_storage_emulator.exceptions import NotFound

  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _precondition_holds(request, storage, name: str | None) -> bool:
  wanted = request.query.get("ifGenerationMatch")
  if not wanted or name is None:
    return True
  current = _current_generation(storage, request.params["bucket_name"], name)
  return (current is None) if int(wanted[0]) == 0 else current == int(wanted[0])


def _upload_name(request) -> str | None:
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):
    return (data.get("meta") or {}).get("name") or data.get("name")
  return None


def _patch_handlers() -> None:
  from gcp_storage_emulator.handlers import objects

  insert, download, delete = objects.insert, objects.download, objects.delete

  def guarded_insert(request, response, storage, *args, **kwargs):
    if not _precondition_holds(request, storage, _upload_name(request)):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    return insert(request, response, storage, *args, **kwargs)

  def guarded_delete(request, response, storage, *args, **kwargs):
    if not _precondition_holds(request, storage, request.params.get("object_id")):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    return delete(request, response, storage, *args, **kwargs)

  def download_with_generation(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound

    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except NotFound:
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.insert, objects.delete, objects.download = guarded_insert, guarded_delete, download_with_generation


if __name__ == "__main__":
  _patch_handlers()  # before the server module builds its routes from these functions
  from gcp_storage_emulator.__main__ import main

  sys.exit(main())
