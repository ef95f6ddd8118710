"""The application's files, written through simcore's one atomic writer (``simcore.atomic_write``):
whole or not at all. A failed write raises ``simcore.WriteError`` (one line: the file and the reason),
leaves the old file bit-identical and no temporary file behind.

- ``write_text(path, text)``: CSVs, JSON, lists.
- ``write_hdf5(path, datasets)``: descriptor files. The HDF5 file is built in memory and written by
  Python: h5py, when a write fails under it, fails again when the file object is freed (a crash).
- ``save_figure(fig, path)``, ``save_image(image, path)``: plots and Pillow images, in the format the
  file name's extension names.
"""
from __future__ import annotations

import io
import os

from simcore import WriteError, atomic_write

__all__ = ["WriteError", "atomic_write", "write_text", "write_bytes", "write_hdf5", "save_figure", "save_image"]


def write_bytes(path, data, *, sync=True) -> None:
    with atomic_write(path, sync=sync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text: str, *, sync=True) -> None:
    write_bytes(path, text.encode("utf-8"), sync=sync)


def write_hdf5(path, datasets: dict) -> None:
    """An HDF5 file of ``{name: array, or (array, dtype)}``, written atomically."""
    import h5py
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for name, value in datasets.items():
            data, dtype = value if isinstance(value, tuple) else (value, None)
            f.create_dataset(name, data=data, dtype=dtype)
    write_bytes(path, buf.getbuffer())


def _format(path):
    """The image format a file name's extension names (the temporary file beside it has none)."""
    return os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or None


def save_figure(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig`` to ``path`` atomically, in the format of the extension."""
    with atomic_write(path, io_errors=(ValueError, RuntimeError)) as tmp:
        fig.savefig(tmp, format=_format(path), **savefig_kwargs)


def save_image(image, path, *, sync=True, **save_kwargs) -> None:
    """A Pillow image to ``path`` atomically, in the format of the extension."""
    fmt = {"jpg": "JPEG", "tif": "TIFF"}.get(_format(path), (_format(path) or "").upper())
    with atomic_write(path, io_errors=(ValueError,), sync=sync) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
