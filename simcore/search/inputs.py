"""Checks and conversions of the search inputs: k, queries, database rows and chunks,
the exclusion list, the metric. Every check raises the error docs/cosine_topk.md lists."""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NP_FLOATS = (np.float16, np.float32, np.float64)
_METRICS = ("cosine", "ip")
_EXCLUDE_KINDS = "None, 'self' or an (E, 2) tensor of (query, index) pairs"


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def check_block_size(block_size) -> None:
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def check_metric(metric) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")


def check_exclude_string(exclude: str) -> None:
    if exclude != "self":
        raise ValueError(f"exclude must be {_EXCLUDE_KINDS}, got {exclude!r}")


def check_float_dtype(dtype, what) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 (or float64), got {dtype}")


def check_queries(queries) -> None:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be 2-D (Q, D), got shape {tuple(queries.shape)}")
    check_float_dtype(queries.dtype, "queries")
    if queries.shape[0] == 0 or queries.shape[1] == 0:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")


def check_finite_rows(x, what, offset=0) -> None:
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0]) + offset
        raise ValueError(f"{what} row {row} contains NaN or Inf (cosine_topk rejects non-finite rows)")


def as_block(chunk, dim, device, offset) -> torch.Tensor:
    """One database chunk as a 2-D float32/float16/bfloat16 tensor on ``device`` with unit stride along D."""
    if isinstance(chunk, np.ndarray):
        if chunk.dtype.type not in _NP_FLOATS:
            raise TypeError(f"database chunk at row {offset} must be float16/32/64, got numpy {chunk.dtype}")
        with warnings.catch_warnings():  # read-only memmaps: never written here
            warnings.simplefilter("ignore", UserWarning)
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        if device.type != "cpu":
            chunk = chunk.to(device, non_blocking=False)
    elif not isinstance(chunk, torch.Tensor):
        raise TypeError(f"database chunks must be tensors or numpy arrays, got {type(chunk).__name__}")
    elif chunk.device != device:
        raise ValueError(f"database chunk at row {offset} is on {chunk.device} but queries are on {device}")
    if chunk.dim() != 2 or chunk.shape[1] != dim:
        raise ValueError(f"database chunk at row {offset} must have shape (n, {dim}), got {tuple(chunk.shape)}")
    check_float_dtype(chunk.dtype, "database")
    if chunk.dtype == torch.float64:
        chunk = chunk.float()
    if chunk.shape[0] > 0 and chunk.stride(1) != 1:
        chunk = chunk.contiguous()
    return chunk


class DatabaseSource:
    """A database as ``n`` (its row count, None for an iterable) and ``chunks()`` (a fresh
    iterator of chunks); ``streamed`` says whether it is read from disk or a generator."""

    def __init__(self, database, dim, device):
        self.streamed = False
        if isinstance(database, torch.Tensor):
            if database.dim() != 2:
                raise ValueError(f"database must be 2-D (N, D), got shape {tuple(database.shape)}")
            check_float_dtype(database.dtype, "database")
            if database.device != device:
                raise ValueError(f"database is on {database.device} but queries are on {device}")
            self.n = database.shape[0]
            self.chunks = lambda: iter([database])
        elif isinstance(database, np.ndarray):
            if database.ndim != 2:
                raise ValueError(f"database must be 2-D (N, D), got shape {database.shape}"
                                 + (" (is the memmap's shape right?)" if isinstance(database, np.memmap) else ""))
            if database.dtype.type not in _NP_FLOATS:
                raise TypeError(f"database must be float16/32/64, got numpy {database.dtype}")
            self.n = database.shape[0]
            self.streamed = isinstance(database, np.memmap)
            step = 1 << 16
            self.chunks = lambda: (database[s:s + step] for s in range(0, database.shape[0], step))
        elif isinstance(database, (str, bytes)) or not isinstance(database, Iterable):
            raise TypeError("database must be a tensor, a numpy array/memmap or an iterable of (n_i, D) chunks, "
                            f"got {type(database).__name__}")
        else:
            self.n = None
            self.streamed = True
            self.chunks = lambda: iter(database)
        if self.n is not None:
            if self.n == 0:
                raise ValueError("database is empty")
            d = database.shape[1]
            if d != dim:
                raise ValueError(f"queries have D={dim} but database rows have D={d}")


def exclusion_csr(exclude, Q, n, device):
    """``exclude`` (None, "self" or (E, 2) pairs) as a CSR: offsets (Q + 1,) and, per query,
    its sorted excluded database indices (E,). ``n`` is the row count, None while unknown."""
    if exclude is None:
        return torch.zeros(Q + 1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    if isinstance(exclude, str):
        check_exclude_string(exclude)
        m = Q if n is None else min(Q, n)
        offsets = torch.cat([torch.arange(m + 1, dtype=torch.int64), torch.full((Q - m,), m, dtype=torch.int64)])
        return offsets.to(device), torch.arange(m, dtype=torch.int64, device=device)
    if isinstance(exclude, np.ndarray):
        exclude = torch.from_numpy(exclude)
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be None, 'self' or an (E, 2) int64 tensor, got {type(exclude).__name__}")
    if exclude.dtype.is_floating_point or exclude.dtype == torch.bool or exclude.is_complex():
        raise TypeError(f"exclude must be an integer tensor, got {exclude.dtype}")
    if exclude.dim() != 2 or exclude.shape[1] != 2:
        raise ValueError(f"exclude must have shape (E, 2) of (query row, database index), got {tuple(exclude.shape)}")
    ex = exclude.to("cpu", torch.int64)
    if ex.numel():
        if int(ex[:, 0].min()) < 0 or int(ex[:, 0].max()) >= Q:
            raise ValueError(f"exclude query rows must be in [0, {Q}), got range "
                             f"[{int(ex[:, 0].min())}, {int(ex[:, 0].max())}]")
        if int(ex[:, 1].min()) < 0 or (n is not None and int(ex[:, 1].max()) >= n):
            raise ValueError(f"exclude database indices must be in [0, {n if n is not None else 'N'}), got range "
                             f"[{int(ex[:, 1].min())}, {int(ex[:, 1].max())}]")
    order = torch.argsort(ex[:, 1], stable=True)
    order = order[torch.argsort(ex[order, 0], stable=True)]
    ex = ex[order]
    offsets = torch.zeros(Q + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(ex[:, 0], minlength=Q), 0)
    return offsets.to(device), ex[:, 1].contiguous().to(device)
