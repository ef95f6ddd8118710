"""FlatIndex: an exact index of vectors in one growing tensor, searched with cosine_topk,
and its file format (save / load)."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch

from simcore.files import atomic_write
from simcore.search.cosine_topk import cosine_topk
from simcore.search.faiss_index import faiss_index
from simcore.search.inputs import check_finite_rows, check_float_dtype, check_metric

__all__ = ["FlatIndex"]

_MAGIC = b"SIMCFLAT"
_VERSION = 1
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_METRIC_CODES = {"cosine": 0, "ip": 1}
_HEADER = struct.Struct("<8sIIIIQQI")  # magic, version, dtype, metric, reserved, dim, n, payload crc32
_HEADER_SIZE = _HEADER.size + 4        # + crc32 of the header fields


class FlatIndex:
    """An exact index: vectors in one growing tensor, searched with :func:`cosine_topk`.

    ``FlatIndex(dim, dtype=torch.float32, metric="cosine")``; ``metric="ip"`` searches
    inner products (``normalized=True``). Vectors are stored as given (not normalised),
    so ``save``/``load`` round-trip them bit-exactly.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, *, metric: str = "cosine",
                 device="cpu"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        check_metric(metric)
        self.dim, self.dtype, self.metric = int(dim), dtype, metric
        self.device = torch.device(device)
        self._buf = torch.empty((0, self.dim), dtype=dtype, device=self.device)
        self._n = 0

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"FlatIndex(dim={self.dim}, dtype={self.dtype}, metric={self.metric!r}, n={self._n})"

    @property
    def vectors(self) -> torch.Tensor:
        """The stored (n, dim) vectors (a view; do not modify)."""
        return self._buf[: self._n]

    def add(self, x) -> None:
        """Append (n, dim) vectors (tensor or numpy array); they get indices len(self) onward."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"add() takes a tensor or numpy array, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"add() expects shape (n, {self.dim}), got {tuple(x.shape)}")
        check_float_dtype(x.dtype, "vectors")
        x = x.detach().to(self.device, self.dtype)
        check_finite_rows(x.float() if x.dtype != torch.float32 else x, "added vector", self._n)
        n = x.shape[0]
        if self._n + n > self._buf.shape[0]:
            grown = torch.empty((max(self._n + n, 2 * self._buf.shape[0], 1024), self.dim),
                                dtype=self.dtype, device=self.device)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: self._n + n] = x
        self._n += n

    def search(self, queries: torch.Tensor, k: int, *, exclude=None, block_size=None):
        """``cosine_topk(queries, vectors, k)`` (inner product for metric='ip')."""
        if self._n == 0:
            raise ValueError("search() on an empty FlatIndex; add() vectors first")
        if isinstance(queries, torch.Tensor) and queries.device != self.device:
            queries = queries.to(self.device)
        return cosine_topk(queries, self.vectors, k, normalized=self.metric == "ip", exclude=exclude,
                           block_size=block_size)

    def to_faiss(self, kind: str = "HNSW32", **kwargs):
        """The same vectors in a FAISS index (see :func:`faiss_index`)."""
        return faiss_index(self.vectors, kind, metric=self.metric, **kwargs)

    # File format (little-endian): magic "SIMCFLAT", u32 version, u32 dtype code
    # (0 float32, 1 float16, 2 bfloat16), u32 metric code (0 cosine, 1 ip), u32 0,
    # u64 dim, u64 n, u32 crc32 of the payload, u32 crc32 of the preceding 44
    # bytes; then the n*dim vectors, row-major, in their dtype's bytes.
    def save(self, path) -> None:
        """Write the index to ``path`` through ``atomic_write`` (whole or not at all; ``WriteError`` when
        the write fails, the old file untouched)."""
        payload = self.vectors.detach().cpu().contiguous().view(torch.uint8).numpy()
        body = _HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self.dtype], _METRIC_CODES[self.metric], 0,
                            self.dim, self._n, zlib.crc32(payload))
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            f.write(body + struct.pack("<I", zlib.crc32(body)))
            f.write(payload.data)

    @classmethod
    def load(cls, path, device="cpu") -> "FlatIndex":
        """Read an index written by :meth:`save`; corrupt or truncated files raise ValueError."""
        with open(path, "rb") as f:
            head = f.read(_HEADER_SIZE)
            if len(head) < _HEADER_SIZE:
                raise ValueError(f"{path}: not a simcore FlatIndex file (truncated header)")
            magic, version, dcode, mcode, _, dim, n, crc = _HEADER.unpack(head[: _HEADER.size])
            if magic != _MAGIC:
                raise ValueError(f"{path}: not a simcore FlatIndex file (bad magic {magic!r})")
            if version != _VERSION:
                raise ValueError(f"{path}: unsupported FlatIndex format version {version}")
            if struct.unpack("<I", head[_HEADER.size:])[0] != zlib.crc32(head[: _HEADER.size]):
                raise ValueError(f"{path}: corrupt FlatIndex header (checksum mismatch)")
            dtypes = {v: k for k, v in _DTYPE_CODES.items()}
            metrics = {v: k for k, v in _METRIC_CODES.items()}
            if dcode not in dtypes or mcode not in metrics or dim < 1:
                raise ValueError(f"{path}: corrupt FlatIndex header")
            dtype = dtypes[dcode]
            nbytes = n * dim * torch.empty((), dtype=dtype).element_size()
            size = os.fstat(f.fileno()).st_size
            if size != _HEADER_SIZE + nbytes:
                raise ValueError(f"{path}: truncated or padded FlatIndex file ({size} bytes, expected "
                                 f"{_HEADER_SIZE + nbytes} for {n} x {dim} {dtype})")
            payload = bytearray(nbytes)
            if f.readinto(payload) != nbytes:
                raise ValueError(f"{path}: truncated FlatIndex payload")
        if zlib.crc32(payload) != crc:
            raise ValueError(f"{path}: corrupt FlatIndex payload (checksum mismatch)")
        index = cls(dim, dtype, metric=metrics[mcode], device=device)
        if n:
            data = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(n, dim)
            index._buf = data.to(device) if torch.device(device).type != "cpu" else data
            index._n = n
        return index

