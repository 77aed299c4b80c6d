"""Tests for `write_atomic`, the temporary-file-then-rename writer."""

import os

import pytest

from jlora._src.atomic import write_atomic


def _writer(text):
  def write(path):
    with open(path, "w") as f:
      f.write(text)

  return write


def test_writes_refuses_existing_and_overwrites(tmp_path):
  out = tmp_path / "f.json"
  assert write_atomic(out, _writer("one")) == str(out)
  assert out.read_text() == "one"
  with pytest.raises(FileExistsError, match=r"f.json' already exists; pass `overwrite=True`"):
    write_atomic(out, _writer("two"))
  assert out.read_text() == "one"
  write_atomic(out, _writer("two"), overwrite=True)
  assert out.read_text() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_failed_write_leaves_nothing(tmp_path):
  def fail(path):
    _writer("partial")(path)
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    write_atomic(tmp_path / "f", fail)
  assert os.listdir(tmp_path) == []
  (tmp_path / "g").write_text("old")
  with pytest.raises(RuntimeError, match="disk full"):
    write_atomic(tmp_path / "g", fail, overwrite=True)
  assert (tmp_path / "g").read_text() == "old" and os.listdir(tmp_path) == ["g"]


def test_file_that_appears_while_writing_is_not_replaced(tmp_path):
  out = tmp_path / "f"

  def racing(path):
    _writer("mine")(path)
    out.write_text("theirs")  # another writer got there first

  with pytest.raises(FileExistsError, match="already exists"):
    write_atomic(out, racing)
  assert out.read_text() == "theirs" and os.listdir(tmp_path) == ["f"]
