"""The one way simcore writes a file: whole or not at all (``atomic_write``).

Every file that simcore or its commands write (FlatIndex files, checkpoints, descriptor files,
prediction CSVs, plots, the demo's files) goes through ``atomic_write``: the content goes to a
temporary file beside the target, is flushed to the disk and renamed over the target. A reader,
also one after a crash, finds the old file or the new one, never a part of either. A failed write
(a full disk, a file-size limit, a read-only folder, a library that fails half-way) raises
``WriteError`` naming the file and the reason; the old file is left bit-identical and the
temporary file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import uuid

__all__ = ["WriteError", "atomic_write"]


class WriteError(OSError):
    """A file could not be written. The old file, if any, is unchanged and no temporary file is left.
    ``str(e)`` is one line: the file and the reason."""

    def __init__(self, path, reason, err=None):
        super().__init__(err if err is not None else errno.EIO, reason, path)
        self.path, self.reason = path, reason

    def __str__(self):
        return f"{self.path}: cannot write ({self.reason})"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _fsync(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, *, io_errors=(), sync=True):
    """Yields a temporary path beside ``path`` (its folder made when missing) for the caller to write (a
    path, so that any library can write it: ``open``, ``torch.save``, ``h5py.File``, ``savefig``). When the block ends, the file
    is flushed to the disk and renamed over ``path``. When the block raises, the temporary file is
    removed and ``path`` is untouched.

    An ``OSError`` inside the block, or in the flush or rename, becomes a ``WriteError``; so do the
    exception types in ``io_errors``, which name how a library reports a failed write (``torch.save``
    raises ``RuntimeError``). Other exceptions pass unchanged. The file gets the permissions of a
    plain ``open(path, "w")`` (the umask applies).

    ``sync=False`` skips the flushes to the disk (7 ms a file here): the file is still whole or absent
    for every reader while the machine runs, but not after a power loss. For many small scratch files
    (the demo's benchmark images), never for results."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WriteError(path, "it is a folder", errno.EISDIR)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise WriteError(path, _reason(e), e.errno) from e
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, WriteError) or not isinstance(e, (OSError,) + tuple(io_errors)):
            raise
        raise WriteError(path, _reason(e), getattr(e, "errno", None)) from e
    if sync:
        with contextlib.suppress(OSError):   # the rename itself reaches the disk with the folder's entry
            _fsync(folder)
