"""Tests for `storage`, jlora's one module of file operations, and for what jlora writes or deletes in a
directory it manages: never outside it, never through a link."""

import os

import jax
import jax.numpy as jnp
import pytest
from etils import epath

import jlora
from jlora._src.io import storage
from jlora._src.io.checkpoint.lock import LOCK_NAME
from jlora._src.io.checkpoint.manager import DELETED_DIR


def _writer(text):
  def write(path):
    with open(path, "w") as f:
      f.write(text)

  return write


# -- paths -------------------------------------------------------------------------------------


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(storage.resolve("rel/dir")) == os.path.join(str(tmp_path), "rel", "dir")
  assert os.fspath(storage.resolve(epath.Path("a"))) == str(tmp_path / "a")
  assert os.fspath(storage.resolve("file:///x/y")) == "/x/y"


def test_resolve_keeps_gcs_urls():
  pytest.importorskip("gcsfs", reason="gs:// paths need jlora[gcs]")
  gcs = storage.resolve("gs://bucket/dir")
  assert storage.is_remote(gcs) and os.fspath(gcs) == "gs://bucket/dir"
  assert os.fspath(gcs / "a") == "gs://bucket/dir/a"


@pytest.mark.parametrize(
  ("path", "match"),
  [
    ("gs:/bucket/x", r"looks like a URL with a missing slash; write 'gs://bucket/x'"),
    ("gs:bucket", r"looks like a URL with a missing slash; write 'gs://bucket'"),
    ("nosuchscheme://b/x", r"cannot open nosuchscheme:// paths .*install its fsspec backend"),
    ("", "non-empty path"),
  ],
)
def test_resolve_refuses_what_would_become_a_local_folder(path, match, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=match):
    storage.resolve(path)
  assert os.listdir(tmp_path) == []


def test_resolve_refuses_non_paths():
  with pytest.raises(TypeError, match=r"`directory` must be a path .*got int"):
    storage.resolve(3)


@pytest.mark.parametrize(
  "call",
  [
    lambda d, lora, cfg, p: jlora.save_adapter(d, lora, cfg),
    lambda d, lora, cfg, p: jlora.export_peft(d, lora, cfg),
    lambda d, lora, cfg, p: jlora.save_merged(d, p, lora, cfg, format="safetensors"),
    lambda d, lora, cfg, p: jlora.load_adapter(d),
    lambda d, lora, cfg, p: jlora.import_peft(d, p),
  ],
  ids=["save_adapter", "export_peft", "save_merged", "load_adapter", "import_peft"],
)
def test_no_api_writes_a_local_folder_named_gs(call, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params = {"q_proj": {"kernel": jnp.ones((4, 3))}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
  lora = jlora.init(params, cfg, key=jax.random.key(0))
  with pytest.raises(ValueError, match="missing slash"):
    call("gs:/bucket/adapter", lora, cfg, params)
  assert os.listdir(tmp_path) == []


# -- writing whole files -------------------------------------------------------------------------


def test_write_file_refuses_existing_and_overwrites(tmp_path):
  out = storage.resolve(tmp_path / "f.json")
  storage.write_file(out, _writer("one"))
  assert (tmp_path / "f.json").read_text() == "one"
  with pytest.raises(FileExistsError, match=r"f.json' already exists; pass `overwrite=True`"):
    storage.write_file(out, b"two")
  storage.write_file(out, b"two", overwrite=True)
  assert (tmp_path / "f.json").read_text() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_failed_write_leaves_nothing(tmp_path):
  def fail(path):
    _writer("partial")(path)
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    storage.write_file(storage.resolve(tmp_path / "f"), fail)
  assert os.listdir(tmp_path) == []
  (tmp_path / "g").write_text("old")
  with pytest.raises(RuntimeError, match="disk full"):
    storage.write_file(storage.resolve(tmp_path / "g"), fail, overwrite=True)
  assert (tmp_path / "g").read_text() == "old" and os.listdir(tmp_path) == ["g"]


def test_file_that_appears_while_writing_is_not_replaced(tmp_path):
  out = tmp_path / "f"

  def racing(path):
    _writer("mine")(path)
    out.write_text("theirs")  # another writer got there first

  with pytest.raises(FileExistsError, match="already exists"):
    storage.write_file(storage.resolve(out), racing)
  assert out.read_text() == "theirs" and os.listdir(tmp_path) == ["f"]


def test_write_file_never_writes_through_a_link(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  (tmp_path / "out").mkdir()
  os.symlink(victim, tmp_path / "out" / "f")
  with pytest.raises(storage.LinkError, match=r"out/f' \(a file to write\) is a symbolic link"):
    storage.write_file(storage.resolve(tmp_path / "out" / "f"), b"x", overwrite=True)
  assert victim.read_text() == "precious"


def test_create_exclusive_and_delete_only_that_file(tmp_path):
  path = storage.resolve(tmp_path / "lease")
  token = storage.create_exclusive(path, b"me")
  assert token is not None and storage.create_exclusive(path, b"you") is None
  assert storage.read_bytes(path) == b"me"
  os.unlink(path)
  storage.create_exclusive(path, b"someone else")
  assert not storage.delete_exclusive(path, token)  # not the file it created: kept
  assert storage.read_bytes(path) == b"someone else"


# -- every file jlora creates or removes in a checkpoint directory ---------------------------------


@pytest.fixture(scope="module")
def small():
  params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((4, 3))}}}}}}
  cfg = jlora.LoraConfig(r=2, target_modules=("q_proj",))
  return params, cfg, jlora.init(params, cfg, key=jax.random.key(0))


def test_a_linked_trash_folder_is_refused_and_its_target_untouched(tmp_path, small):
  params, cfg, lora = small
  d = tmp_path / "ckpt"
  jlora.save_adapter(d, lora, cfg)
  outside = tmp_path / "outside"
  (outside / "keep").mkdir(parents=True)
  (outside / "keep" / "data").write_text("precious")
  os.symlink(outside, d / DELETED_DIR)
  with pytest.raises(storage.LinkError, match=rf"{DELETED_DIR}' \(where removed steps wait to be deleted\)"):
    jlora.save_adapter(d, lora, cfg)
  assert (outside / "keep" / "data").read_text() == "precious"
  assert jlora.load_adapter(d)[1] == cfg  # the adapter saved before is intact


def test_a_link_inside_the_trash_is_removed_not_followed(tmp_path, small):
  params, cfg, lora = small
  d = tmp_path / "ckpt"
  jlora.save_adapter(d, lora, cfg)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "data").write_text("precious")
  (d / DELETED_DIR).mkdir(exist_ok=True)
  os.symlink(outside, d / DELETED_DIR / "7")
  jlora.save_adapter(d, lora, cfg)
  assert (outside / "data").read_text() == "precious"
  assert not os.path.lexists(d / DELETED_DIR / "7")


def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path, small):
  params, cfg, lora = small
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  d = tmp_path / "ckpt"
  d.mkdir()
  os.symlink(victim, d / LOCK_NAME)
  with pytest.raises(storage.LinkError, match=rf"{LOCK_NAME}' \(the writer lock file\) is a symbolic link"):
    jlora.save_adapter(d, lora, cfg)
  with pytest.raises(storage.LinkError, match="symbolic link"):
    jlora.AdapterCheckpointManager(d, cfg)
  assert victim.read_text() == "precious"


def test_peft_and_merged_files_are_not_written_through_links(tmp_path, small):
  params, cfg, lora = small
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  for name, call in [
    ("adapter_model.safetensors", lambda d: jlora.export_peft(d, lora, cfg, overwrite=True)),
    ("adapter_config.json", lambda d: jlora.export_peft(d, lora, cfg, overwrite=True)),
    ("model.safetensors", lambda d: jlora.save_merged(d, params, lora, cfg, format="safetensors")),
  ]:
    d = tmp_path / name.replace(".", "_")
    d.mkdir()
    os.symlink(victim, d / name)
    with pytest.raises((storage.LinkError, FileExistsError)):
      call(d)
    assert victim.read_text() == "precious"
