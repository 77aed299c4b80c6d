"""Every file operation jlora makes on a path a user gave: local disks, ``gs://``, other `etils.epath` stores.

jlora takes the paths orbax takes. A local path (``str``, ``os.PathLike``)
becomes an absolute `epath.Path`; a URL (``gs://bucket/dir``) stays one, read
and written through `etils.epath`, the client orbax uses too (for ``gs://``:
TensorFlow's when TensorFlow is installed, as on Colab, fsspec's ``gcsfs``
otherwise; the writer lock's lease uses ``google-cloud-storage``: install
``jlora[gcs]``). Nothing else in jlora calls ``os``, ``open`` or ``shutil``
on such a path: it calls the functions here, which know how the two kinds of
storage differ.

* Local disks: a file is written under a temporary name and renamed into
  place, so a reader sees the old file, the new one, or none. Housekeeping
  never follows a link: a lock file, a trash folder or a file to replace that
  is a symbolic link is refused (`LinkError`), so jlora cannot be made to
  write, truncate or delete anything outside the directory it was given.
* Object stores: an object is replaced whole by one upload (a reader sees the
  old or the new one); "create only if absent" is a write with a generation
  precondition (`create_exclusive`, ``gs://`` only); there are no links and no
  renames, and a "directory" exists only while it holds objects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike

# `scheme://...`: a URL. `scheme:/...` (one slash) is almost always a mistyped URL, never a local path a
# user meant: such a string would otherwise become a local folder named `gs:`.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BROKEN_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/*(?!/)")


class LinkError(OSError):
  """A file jlora manages inside a directory is a symbolic link, which jlora never follows."""


def resolve(path: Any, what: str = "directory") -> epath.Path:
  """``path`` as an `epath.Path`: absolute on a local disk, or a URL of a store `etils.epath` reads.

  Args:
    path: a ``str``, an ``os.PathLike`` or an `epath.Path` (``gs://bucket/x``).
    what: the argument's role, for error messages.

  Returns:
    The path.

  Raises:
    TypeError: if ``path`` is not a path.
    ValueError: for a URL whose store `etils.epath` cannot open (naming the
      package to install), or a mistyped URL such as ``gs:/bucket``.

  Example:
    >>> resolve("gs:/bucket/x")
    Traceback (most recent call last):
    ValueError: `directory` 'gs:/bucket/x' looks like a URL with a missing slash; write 'gs://bucket/x'.
  """
  if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
    raise TypeError(
      f"`{what}` must be a path (str, os.PathLike or etils.epath.Path); got {type(path).__name__}."
    )
  text = os.fspath(path)
  if not isinstance(text, str) or not text:
    raise ValueError(f"`{what}` must be a non-empty path; got {path!r}.")
  url = _URL.match(text)
  if url is None:
    broken = _BROKEN_URL.match(text)
    if broken is not None and len(broken[1]) > 1:  # `C:/x` on Windows has a one-letter drive
      fixed = f"{broken[1]}://{text[broken.end() :]}"
      raise ValueError(f"`{what}` {text!r} looks like a URL with a missing slash; write {fixed!r}.")
    return epath.Path(os.path.abspath(text))
  scheme = url[1].lower()
  if scheme == "file":
    return epath.Path(os.path.abspath(text[len("file://") :]))
  _check_backend(scheme, text, what)
  out = epath.Path(text)
  if not is_remote(out):
    raise ValueError(f"`{what}` {text!r}: etils.epath opened it as a local path; jlora will not write there.")
  return out


def _check_backend(scheme: str, text: str, what: str) -> None:
  import fsspec  # noqa: PLC0415 - etils.epath's backend for URLs

  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as e:
    hint = "its fsspec backend"
    if scheme == "gs":
      hint = "`pip install 'jlora[gcs]'` (gcsfs, google-cloud-storage)"
    raise ValueError(f"`{what}` {text!r}: cannot open {scheme}:// paths ({e}); install {hint}.") from None


def is_remote(path: epath.Path) -> bool:
  """Whether ``path`` is in an object store (a URL), not on a local disk."""
  return _URL.match(os.fspath(path)) is not None


def is_gcs(path: epath.Path) -> bool:
  return os.fspath(path).startswith("gs://")


def show(path: epath.Path) -> str:
  """The path as users write it, for messages."""
  return os.fspath(path)


# -- reading ---------------------------------------------------------------------------------


def exists(path: epath.Path) -> bool:
  """Whether a file or directory is there (a link counts, whatever it points to)."""
  if is_remote(path):
    return path.exists()
  return os.path.lexists(path)


def is_dir(path: epath.Path) -> bool:
  """Whether ``path`` is a directory (on an object store: a prefix holding objects)."""
  return path.is_dir()


def is_file(path: epath.Path) -> bool:
  return path.is_file()


def is_link(path: epath.Path) -> bool:
  return not is_remote(path) and os.path.islink(path)


def refuse_link(path: epath.Path, what: str) -> None:
  """Raises `LinkError` if ``path`` is a symbolic link (jlora's housekeeping never follows one)."""
  if is_link(path):
    raise LinkError(
      errno.ELOOP,
      f"{show(path)!r} ({what}) is a symbolic link; jlora never follows links among the files it manages, "
      "so that it cannot write or delete outside the directory it was given. Remove the link.",
    )


def listdir(path: epath.Path) -> list[str]:
  """The names in a directory (empty if it does not exist)."""
  if not is_dir(path):
    return []
  return sorted(p.name for p in path.iterdir())


def read_bytes(path: epath.Path) -> bytes:
  return path.read_bytes()


@contextlib.contextmanager
def local_copy(path: epath.Path) -> Iterator[str]:
  """A local file with ``path``'s contents, for readers that need one (safetensors' ``safe_open``): the
  file itself on a local disk, a temporary download (deleted on exit) from an object store."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="jlora-") as tmp:
    local = os.path.join(tmp, path.name)
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local


def identity(path: epath.Path) -> Any:
  """What changes when ``path`` is removed and written again: a local inode, an object's generation; ``None``
  when it is absent."""
  try:
    if is_remote(path):
      info = _fs(path).info(os.fspath(path))
      return (info.get("generation"), info.get("updated") or info.get("mtime"))
    st = os.lstat(path)
    return (st.st_ino, st.st_mtime_ns)
  except (OSError, FileNotFoundError):
    return None


def _fs(path: epath.Path) -> Any:
  """The fsspec file system `etils.epath` reads ``path`` through (fsspec caches instances by arguments:
  these are epath's)."""
  import fsspec  # noqa: PLC0415

  scheme = os.fspath(path).split("://", 1)[0]
  return (
    fsspec.filesystem(scheme, finalize_on_close=True)
    if scheme in ("gs", "gcs")
    else fsspec.filesystem(scheme)
  )


def refresh(path: epath.Path) -> None:
  """Forgets cached listings under ``path`` (object stores): another process may have written there since.

  fsspec's GCS client caches directory listings; a process that listed a step
  before the primary wrote its commit markers would otherwise not see them.
  """
  if is_remote(path):
    _fs(path).invalidate_cache(os.fspath(path))


# -- writing ---------------------------------------------------------------------------------


def mkdir(path: epath.Path) -> None:
  """Creates a directory and its parents (nothing on an object store, whose prefixes need no creating)."""
  if not is_remote(path):
    path.mkdir(parents=True, exist_ok=True)


def _exists_error(path: epath.Path | str) -> FileExistsError:
  return FileExistsError(f"{os.fspath(path)!r} already exists; pass `overwrite=True` or choose another path.")


def write_file(path: epath.Path, data: bytes | Callable[[str], None], *, overwrite: bool = False) -> None:
  """Writes one file whole or not at all.

  Args:
    path: the file; its directory must exist (locally).
    data: its bytes, or ``write(local_path)``, a function that creates the file
      at a local path (a temporary one; e.g. safetensors' ``save_file``).
    overwrite: replace an existing file. Otherwise an existing ``path`` is an
      error, also one that appears while writing (locally; on ``gs://`` the
      upload is conditional on the object being absent).

  Raises:
    FileExistsError: if ``path`` exists and not ``overwrite``.
    LinkError: if ``path`` is a symbolic link.

  Example:
    >>> d = resolve(tempfile.mkdtemp())
    >>> write_file(d / "a.txt", b"hello"); read_bytes(d / "a.txt")
    b'hello'
    >>> write_file(d / "a.txt", b"again")
    Traceback (most recent call last):
    FileExistsError: ...already exists; pass `overwrite=True` or choose another path.
  """
  refuse_link(path, "a file to write")
  if not overwrite and exists(path):
    raise _exists_error(path)
  if is_remote(path):
    if callable(data):
      data = _bytes_of(data, path.name)
    if is_gcs(path) and not overwrite:
      if create_exclusive(path, data) is None:
        raise _exists_error(path)
      return
    path.write_bytes(data)
    return
  _write_local(path, data, overwrite)


def _bytes_of(write: Callable[[str], None], name: str) -> bytes:
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, name)
    write(local)
    with open(local, "rb") as f:
      return f.read()


def _write_local(path: epath.Path, data: bytes | Callable[[str], None], overwrite: bool) -> None:
  directory, name = os.path.split(os.fspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
  try:
    if callable(data):
      os.close(fd)
      fd = None
      data(tmp)
      fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
    else:
      os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    fd = None
    _publish(tmp, os.fspath(path), overwrite)
  except BaseException:
    if fd is not None:
      os.close(fd)
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
  if overwrite:
    os.replace(tmp, path)  # replaces a link itself, never its target
    return
  try:
    os.link(tmp, path)  # atomic and never replaces: fails if `path` appeared meanwhile
  except FileExistsError:
    raise _exists_error(path) from None
  except OSError:  # pragma: no cover - file systems without hard links
    if os.path.lexists(path):
      raise _exists_error(path) from None
    os.replace(tmp, path)
    return
  os.unlink(tmp)


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


def remove_tree(path: epath.Path) -> None:
  """Deletes a directory and everything under it; never follows a link (a link itself is refused)."""
  refuse_link(path, "a directory to delete")
  if is_remote(path):
    if path.exists():
      path.rmtree()
    return
  if os.path.isdir(path):
    shutil.rmtree(path)  # removes links found inside, never their targets


def remove_file(path: epath.Path) -> None:
  """Deletes one file (a link is removed itself, never its target); nothing if it is absent."""
  try:
    if is_remote(path):
      path.unlink()
    else:
      os.unlink(path)
  except FileNotFoundError:
    pass


# -- exclusive creation (leases and locks) ---------------------------------------------------


def open_no_follow(path: epath.Path, what: str, *, create: bool) -> int | None:
  """A read-write (``create``) or read-only file descriptor of a local file, never through a link; ``None``
  when it is absent and not ``create``.

  Raises:
    LinkError: if ``path`` is a symbolic link.
  """
  refuse_link(path, what)
  flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW
  try:
    return os.open(path, flags, 0o644)
  except FileNotFoundError:
    if create:
      raise
    return None
  except OSError:
    refuse_link(path, what)  # a link that appeared meanwhile (ELOOP)
    raise


def create_exclusive(path: epath.Path, data: bytes) -> Any:
  """Creates the file only if nothing is there; returns a token for `delete_exclusive`, ``None`` if it exists.

  Locally an ``O_CREAT | O_EXCL | O_NOFOLLOW`` open; on ``gs://`` an upload
  with the precondition ``ifGenerationMatch=0``, which GCS refuses when the
  object exists (the token is the object's generation).

  Raises:
    ValueError: on an object store other than ``gs://`` (no precondition to use).
  """
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
      return None
    try:
      os.write(fd, data)
      st = os.fstat(fd)
    finally:
      os.close(fd)
    return (st.st_ino, st.st_mtime_ns)
  blob = _gcs_blob(path)
  from google.api_core import exceptions  # noqa: PLC0415 - jlora[gcs]

  try:
    blob.upload_from_string(data, if_generation_match=0)
  except exceptions.PreconditionFailed:
    return None
  return blob.generation


def delete_exclusive(path: epath.Path, token: Any) -> bool:
  """Deletes a file made by `create_exclusive` if it is still that file; returns whether it was."""
  if not is_remote(path):
    try:
      st = os.lstat(path)
    except FileNotFoundError:
      return False
    if (st.st_ino, st.st_mtime_ns) != token or not stat.S_ISREG(st.st_mode):
      return False
    os.unlink(path)
    return True
  from google.api_core import exceptions  # noqa: PLC0415

  try:
    _gcs_blob(path).delete(if_generation_match=token)
  except (exceptions.PreconditionFailed, exceptions.NotFound):
    return False
  return True


def _gcs_blob(path: epath.Path) -> Any:
  if not is_gcs(path):
    raise ValueError(
      f"{show(path)!r}: jlora's one-writer lease needs a generation precondition, which it implements for "
      "gs:// and local paths only; save to one of those."
    )
  try:
    from google.cloud import storage as gcs  # noqa: PLC0415
  except ImportError:
    raise ValueError(
      f"{show(path)!r}: writing to gs:// needs google-cloud-storage: `pip install 'jlora[gcs]'`."
    ) from None
  bucket, _, name = os.fspath(path)[len("gs://") :].partition("/")
  return gcs.Client().bucket(bucket).blob(name)
