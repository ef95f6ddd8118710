"""Output files written whole or not at all: checkpoints, their copies, descriptor files."""
import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside ``path`` for the caller to write. When the block ends, the file
    is flushed to the disk and renamed over ``path``: a reader, also one after a crash, finds the old
    file or the new one, never a part. When the block raises, the temporary file is removed.
    The file gets the permissions of a plain ``open(path, "w")`` (the umask applies)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):   # the rename itself reaches the disk with the folder's entry
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
