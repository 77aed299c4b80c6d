"""Writing a file all-or-nothing: `write_atomic`.

The file is written under a temporary name in the same directory, flushed to
disk, and renamed onto its final name, so a reader (or a process that comes
after a crash) sees the old file, the new file, or no file, never a partial one.
A crash can leave a ``.<name>.tmp-*`` file behind; it is never read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # pragma: no cover - platforms without directory fds
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover - file systems that do not sync directories
    pass
  finally:
    os.close(fd)


def _exists(path: str) -> str:
  return f"{path!r} already exists; pass `overwrite=True` or choose another path."


def _publish(tmp: str, path: str, overwrite: bool) -> None:
  if overwrite:
    os.replace(tmp, path)
    return
  try:
    os.link(tmp, path)  # atomic and never replaces: fails if `path` appeared meanwhile
  except FileExistsError:
    raise FileExistsError(_exists(path)) from None
  except OSError:  # pragma: no cover - file systems without hard links
    if os.path.exists(path):
      raise FileExistsError(_exists(path)) from None
    os.replace(tmp, path)
    return
  os.unlink(tmp)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False) -> str:
  """Writes a file with ``write(tmp_path)`` and renames it onto ``path`` only once it is complete.

  Args:
    path: the file to write; its directory must exist.
    write: called once with a temporary path in the same directory; it must
      create the file there (e.g. ``lambda p: safetensors.numpy.save_file(t, p)``).
    overwrite: replace an existing ``path`` (atomically). If false, an
      existing ``path`` is an error, also when it appears while writing.

  Returns:
    ``path``, absolute.

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is false (nothing is
      written).

  Example:
    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> def write(p):
    ...   with open(p, "w") as f:
    ...     f.write("hello")
    >>> write_atomic(out, write) == out, open(out).read()
    (True, 'hello')
    >>> write_atomic(out, write)
    Traceback (most recent call last):
    FileExistsError: ...already exists; pass `overwrite=True` or choose another path.
  """
  path = os.path.abspath(os.fspath(path))
  if not overwrite and os.path.exists(path):
    raise FileExistsError(_exists(path))
  directory, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    _publish(tmp, path, overwrite)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)
  return path
