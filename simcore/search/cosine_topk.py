"""Exact cosine (or inner-product) top-k search without the Q x N score matrix.

``cosine_topk(queries, database, k)`` returns what
``torch.topk(normalize(q) @ normalize(db).T, k)`` returns, ties broken by the
lower database index, while holding only one (query block x database block)
score tile at a time:

* the GEMM of each tile runs through torch (oneDNN/MKL on CPU, cuBLAS on CUDA);
* the compiled kernel (csrc/cpu/cosine_topk.cpp, csrc/cuda/cosine_topk.cu)
  scales the tile by 1/||d_j|| (no normalised copy of the database), scans it
  against each query's running k-th best score, and merges the survivors into
  per-query reservoirs (Q x cap entries, cap ~ 1.5k, allocated here);
* float16/bfloat16 databases: the tile GEMM runs in a half dtype and its scores
  only nominate candidates; every candidate within a proven error bound of the
  threshold is rescored exactly in float32 from the half rows, so the result is
  the exact top-k of the half database (see docs/cosine_topk.md).

The database may be a tensor, a numpy array or memmap, or any iterable of
(n_i, D) chunks (one streaming pass; indices continue across chunks).
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
import zlib
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from simcore import dispatch
from simcore.reference.cosine_topk import cosine_topk as _reference

__all__ = ["cosine_topk", "FlatIndex", "FaissIndex", "faiss_index"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NP_FLOATS = (np.float16, np.float32, np.float64)
_INT64_MAX = torch.iinfo(torch.int64).max
# Tile shape (measured, docs/cosine_topk.md): on the 2-core CPU, few large GEMM
# calls beat cache-sized tiles (each torch.mm is an OpenMP fork/join, costly on a
# busy machine); 1024 x 8192 float32 scores = 32 MB, the only O(block^2) buffer.
DEFAULT_DB_BLOCK = {"cpu": 8192, "cuda": 16384}        # database rows per tile
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}  # scores per tile (query rows = this / rows)


# ----------------------------------------------------------------------------- checks
def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _check_float_dtype(dtype, what):
    if dtype not in _FLOATS:
        raise TypeError(f"{what} must be float32, float16, bfloat16 (or float64), got {dtype}")


def _check_queries(queries):
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be 2-D (Q, D), got shape {tuple(queries.shape)}")
    _check_float_dtype(queries.dtype, "queries")
    if queries.shape[0] == 0 or queries.shape[1] == 0:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")


def _check_finite_rows(x, what, offset=0):
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0]) + offset
        raise ValueError(f"{what} row {row} contains NaN or Inf (cosine_topk rejects non-finite rows)")


def _as_block(chunk, dim, device, offset):
    """One database chunk as a 2-D tensor on ``device`` with unit stride along D."""
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
    _check_float_dtype(chunk.dtype, "database")
    if chunk.dtype == torch.float64:
        chunk = chunk.float()
    if chunk.shape[0] > 0 and chunk.stride(1) != 1:
        chunk = chunk.contiguous()
    return chunk


class _Source:
    """A database as (known size or None, iterator of chunks)."""

    def __init__(self, database, dim, device):
        self.stream = False
        if isinstance(database, torch.Tensor):
            if database.dim() != 2:
                raise ValueError(f"database must be 2-D (N, D), got shape {tuple(database.shape)}")
            _check_float_dtype(database.dtype, "database")
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
            self.stream = isinstance(database, np.memmap)
            step = 1 << 16
            self.chunks = lambda: (database[s:s + step] for s in range(0, database.shape[0], step))
        elif isinstance(database, (str, bytes)) or not isinstance(database, Iterable):
            raise TypeError("database must be a tensor, a numpy array/memmap or an iterable of (n_i, D) chunks, "
                            f"got {type(database).__name__}")
        else:
            self.n = None
            self.stream = True
            self.chunks = lambda: iter(database)
        if self.n is not None:
            if self.n == 0:
                raise ValueError("database is empty")
            d = database.shape[1]
            if d != dim:
                raise ValueError(f"queries have D={dim} but database rows have D={d}")


def _exclusion(exclude, Q, n, device):
    """(offsets (Q+1,), sorted indices (E,)) CSR of the excluded pairs."""
    if exclude is None:
        return torch.zeros(Q + 1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    if isinstance(exclude, str):
        if exclude not in ("self", "diagonal"):
            raise ValueError(f"exclude must be None, 'self' or an (E, 2) tensor of (query, index) pairs, got {exclude!r}")
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


# ----------------------------------------------------------------------------- the search
# float32 databases on CPUs with AVX-512 BF16: a bfloat16 GEMM (about 2x the
# float32 rate, measured in docs/cosine_topk.md) nominates candidates and float32
# rescoring decides, so the result stays the exact float32 top-k. None = when the
# CPU has AVX-512 BF16 (cosine only: unit queries keep the bfloat16 GEMM from
# overflowing and its underflow inside topk_slack_floor); True/False force it
# (tests, benchmarks). Measured (N=200,000, D=256, k=10, busy 2-core machine):
# Q=1 ran 5x slower through oneDNN's bfloat16 GEMV, Q=4..256 1.2-2.2x faster.
FP32_VIA_BF16 = None
FP32_VIA_BF16_MIN_QUERIES = 8


def _fp32_via_bf16(device, cosine, n_queries):
    if device.type != "cpu" or not cosine:
        return False
    if FP32_VIA_BF16 is not None:
        return bool(FP32_VIA_BF16)
    return n_queries >= FP32_VIA_BF16_MIN_QUERIES and dispatch.extension().cpu_has_fast_bf16()


def _gemm_dtype(db_dtype, device, cosine, n_queries=0):
    if db_dtype == torch.float32:
        return torch.bfloat16 if _fp32_via_bf16(device, cosine, n_queries) else torch.float32
    # CPU: no fast float16 GEMM, bfloat16 runs on AVX-512 BF16 via oneDNN.
    # CUDA: read float16 as such for cosine (unit-norm queries cannot overflow it).
    if device.type == "cuda" and db_dtype == torch.float16 and cosine:
        return torch.float16
    return torch.bfloat16


def _gamma(dim):
    """gamma_D = D u / (1 - D u), u = 2^-24: float32 dot products of D terms in any order."""
    return dim * 2.0 ** -24 / max(1.0 - dim * 2.0 ** -24, 2.0 ** -24)


def _rescore_bounds(qf, qg, gemm_dtype, db_dtype, dim, device):
    """(slack_factor, query_slack, slack_rel) for a half tile GEMM: row j is rescored
    unless v + m_q * slack_j + rel * |v| <= threshold, with v the GEMM score times
    scale_j and slack_j = (slack_factor ||d_j|| + ||bf16(d_j) - d_j|| + floor) scale_j
    (prepare kernel). See docs/cosine_topk.md for the proof.

    CPU bfloat16 GEMMs (oneDNN: float32 accumulation, one nearest-even rounding of the
    output) use the per-query bound below. With q' = bf16(q), e = q' - q, d' = bf16(d),
    f = d' - d, A the GEMM's float32 sum, v its bfloat16 output and R the float32
    rescoring dot, g = gamma_D:
      |S' - S| = |sum q'_i f_i + e_i d_i| <= ||q'|| ||f|| + ||e|| ||d||   (S = q.d, S' = q'.d')
      |A - S'| <= g ||q'|| ||d'||,  |S - R| <= g ||q|| ||d||,  |v - A| <= u |v|  (u = 2^-8).
    With M = max(||q||, ||q'||) and eps = max over queries of ||e|| / M, the sum is
    <= M ((eps + 2g) ||d|| + (1 + g) ||f||) + u |v|; the factor 1.25 on m_q and rel
    covers (1 + g) and the float32 roundings of the scan itself.
    Elsewhere (CUDA, where torch may reduce bfloat16/float16 GEMMs in reduced precision),
    the worst-case relative bound of ``_slack_factor`` with m_q = ||q|| and rel = 0."""
    qn = qf.norm(dim=1)
    if device.type != "cpu" or gemm_dtype != torch.bfloat16:
        return _slack_factor(gemm_dtype, db_dtype, dim), qn.contiguous(), 0.0
    q64, g64 = qf.double(), qg.double()
    m = torch.maximum(q64.norm(dim=1), g64.norm(dim=1))
    err = (g64 - q64).norm(dim=1)
    eps = float((err / m.clamp_min(1e-300)).max())
    g = _gamma(dim)
    return eps + 2 * g, (1.25 * m).float().contiguous(), 1.25 * 2.0 ** -8


def _slack_factor(gemm_dtype, db_dtype, dim):
    """Worst-case bound on |approx - rescored| / (||q|| ||d||) for a half tile GEMM:

    With P = sum |q_i d_i| <= ||q|| ||d|| (Cauchy-Schwarz), u the GEMM dtype's unit
    roundoff and g = gamma_D = D 2^-24 / (1 - D 2^-24) (float32 summation of D terms,
    any order): rounding the query and, when the database dtype differs (float32 or
    float16 -> bfloat16), the row moves each product by a factor within (1 +- u)^a,
    a = 1 or 2; half products are exact in float32, their sum is within g (1+u)^a P;
    rounding the output adds u (1+u)^a (1+g) P; the float32 rescoring dot is within
    g P of the exact sum. Total: ((1+u)^a (1+g)(1+u) - 1 + g) P, times 1.25 for the
    float32 roundings of the scan (scale, slack, sum), plus the float16 subnormal
    floor of a unit query (sqrt(D) 2^-25). Near-underflow errors are covered by the
    absolute floor the prepare kernel adds (topk_slack_floor in cosine_topk.h)."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[gemm_dtype]
    rounded_inputs = 1 if db_dtype == gemm_dtype else 2
    g = _gamma(dim)
    bound = (1 + u) ** rounded_inputs * (1 + g) * (1 + u) - 1 + g
    subnormal = math.sqrt(dim) * 2.0 ** -25 if gemm_dtype == torch.float16 else 0.0
    return 1.25 * bound + subnormal


@contextlib.contextmanager
def _exact_cuda_gemms(device):
    """float32 tile GEMMs without TF32, and half tiles summed in float32, whatever the caller
    set in torch.backends.cuda.matmul: exactness and the rescoring bound rely on both."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def _search(queries, source, k, normalized, exclude, block_size, progress):
    with _exact_cuda_gemms(queries.device):
        return _search_blocks(queries, source, k, normalized, exclude, block_size, progress)


def _search_blocks(queries, source, k, normalized, exclude, block_size, progress):
    ext = dispatch.extension()
    device = queries.device
    Q, D = queries.shape
    nthreads = dispatch.num_threads()
    stream = dispatch.cuda_stream(device) if device.type == "cuda" else 0
    cosine = not normalized

    qf = queries.detach().to(torch.float32)
    _check_finite_rows(qf, "queries")
    if cosine:  # in double: a float32 norm overflows for |x| above ~1.8e19
        qf = F.normalize(queries.detach().double(), dim=1).float()
    qf = qf.contiguous()
    qnorm = qf.norm(dim=1).contiguous()

    n_known = source.n
    # Reservoir: compacted to k when full, so a larger one means rarer compactions
    # but a threshold that tightens later (more candidates). CUDA needs a thread
    # block of room; on the CPU 1.5k (at least k + 16) measured best.
    cap = k + max(k // 2, ext.COSINE_TOPK_MIN_SLACK if device.type == "cuda" else 16)
    if n_known is not None:
        cap = min(cap, n_known + 1)
    reservoir = torch.empty((Q, cap, 2), dtype=torch.int64, device=device)
    count = torch.zeros(Q, dtype=torch.int64, device=device)
    threshold = torch.full((Q,), float("-inf"), dtype=torch.float32, device=device)
    status = torch.full((1,), _INT64_MAX, dtype=torch.int64, device=device)
    ex_off, ex_idx = _exclusion(exclude, Q, n_known, device)

    kind = "cuda" if device.type == "cuda" else "cpu"
    nb_max = int(block_size) if block_size else DEFAULT_DB_BLOCK[kind]
    if nb_max < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qb_max = max(1, min(Q, DEFAULT_TILE_ELEMENTS[kind] // nb_max))
    tiles, q_gemm, converted, bounds = {}, {}, {}, {}

    bar = None
    if progress or (progress is None and source.stream):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_known, unit="rows", desc="cosine_topk", delay=2.0, unit_scale=True)
        except ImportError:  # tqdm is a dependency; never fail a search over a progress bar
            bar = None

    base = 0
    try:
        for chunk in source.chunks():
            chunk = _as_block(chunk, D, device, base)
            n_i = chunk.shape[0]
            if n_known is not None and base + n_i > n_known:
                raise ValueError(f"database yielded more rows than its shape says ({n_known})")
            for s in range(0, n_i, nb_max):
                blk = chunk[s:s + nb_max]
                nb = blk.shape[0]
                gdt = _gemm_dtype(blk.dtype, device, cosine, Q)
                rescore = gdt != torch.float32
                scale = torch.empty(nb, dtype=torch.float32, device=device)
                slack = torch.empty(nb, dtype=torch.float32, device=device)
                gblk = blk
                if blk.dtype != gdt:  # prepare writes the bfloat16 copy into one reused buffer
                    if gdt not in converted:
                        converted[gdt] = torch.empty((nb_max, D), dtype=gdt, device=device)
                    gblk = converted[gdt][:nb]
                if gdt not in q_gemm:
                    q_gemm[gdt] = qf if gdt == torch.float32 else qf.to(gdt)
                    tiles[gdt] = torch.empty(qb_max * nb_max, dtype=gdt, device=device)
                qg, tile = q_gemm[gdt], tiles[gdt]
                slack_factor, qslack, slack_rel = 0.0, qnorm, 0.0
                if rescore:
                    if (gdt, blk.dtype) not in bounds:
                        bounds[gdt, blk.dtype] = _rescore_bounds(qf, qg, gdt, blk.dtype, D, device)
                    slack_factor, qslack, slack_rel = bounds[gdt, blk.dtype]
                ext.cosine_topk_prepare_block(dispatch.tensor_arg(blk), dispatch.tensor_arg(scale),
                                              dispatch.tensor_arg(slack), dispatch.tensor_arg(status),
                                              base + s, cosine, slack_factor, nthreads, stream,
                                              None if gblk is blk else dispatch.tensor_arg(gblk))
                for q0 in range(0, Q, qb_max):
                    q1 = min(Q, q0 + qb_max)
                    out = tile[: (q1 - q0) * nb].view(q1 - q0, nb)
                    torch.mm(qg[q0:q1], gblk.T, out=out)
                    ext.cosine_topk_update(
                        dispatch.tensor_arg(out), dispatch.tensor_arg(scale), dispatch.tensor_arg(slack),
                        dispatch.tensor_arg(qf[q0:q1]), dispatch.tensor_arg(qslack[q0:q1]),
                        dispatch.tensor_arg(blk), dispatch.tensor_arg(ex_off), dispatch.tensor_arg(ex_idx),
                        dispatch.tensor_arg(reservoir), dispatch.tensor_arg(count),
                        dispatch.tensor_arg(threshold), q0, base + s, k,
                        -1 if n_known is None else n_known, rescore, nthreads, stream, slack_rel)
            base += n_i
            if bar is not None:
                bar.update(n_i)
            if device.type == "cpu" and int(status[0]) != _INT64_MAX:
                break
    finally:
        if bar is not None:
            bar.close()

    bad = int(status[0])
    if bad != _INT64_MAX:
        raise ValueError(f"database row {bad} contains NaN or Inf, or has a norm above 1e38 that float32 "
                         "arithmetic cannot score (cosine_topk rejects such rows)")
    if base == 0:
        raise ValueError("database is empty")
    if n_known is not None and base != n_known:
        raise ValueError(f"database yielded {base} rows but its shape says {n_known}")
    if k > base:
        raise ValueError(f"k={k} exceeds the number of database rows N={base}")
    if ex_idx.numel() and exclude is not None and not isinstance(exclude, str) and int(ex_idx.max()) >= base:
        raise ValueError(f"exclude database indices must be in [0, {base}), got {int(ex_idx.max())}")
    return _finalize(reservoir, count, k)


def _finalize(reservoir, count, k):
    """Sort each reservoir by (score desc, index asc) and keep k; empty slots -> (-inf, -1)."""
    Q, cap, _ = reservoir.shape
    scores = reservoir.view(torch.float32).view(Q, cap, 4)[:, :, 0]
    index = reservoir[:, :, 1]
    used = torch.arange(cap, device=reservoir.device)[None, :] < count[:, None]
    scores = torch.where(used, scores, torch.tensor(float("-inf"), device=reservoir.device))
    index = torch.where(used, index, torch.tensor(_INT64_MAX, device=reservoir.device))
    index, perm = torch.sort(index, dim=1)
    scores = scores.gather(1, perm)
    scores, perm = torch.sort(scores, dim=1, descending=True, stable=True)
    index = index.gather(1, perm)
    scores, index = scores[:, :k].contiguous(), index[:, :k].contiguous()
    return scores, index.masked_fill_(scores == float("-inf"), -1)


def _reference_search(queries, source, k, normalized, exclude):
    dim = queries.shape[1]
    parts, base = [], 0
    for chunk in source.chunks():
        chunk = _as_block(chunk, dim, queries.device, base)
        parts.append(chunk.to(torch.promote_types(chunk.dtype, torch.float32)))
        base += chunk.shape[0]
    if base == 0:
        raise ValueError("database is empty")
    if k > base:
        raise ValueError(f"k={k} exceeds the number of database rows N={base}")
    db = torch.cat(parts)
    _check_finite_rows(queries, "queries")
    _check_finite_rows(db, "database")
    pairs = None
    if exclude is not None:
        off, idx = _exclusion(exclude, queries.shape[0], base, torch.device("cpu"))
        rows = torch.repeat_interleave(torch.arange(queries.shape[0]), off[1:] - off[:-1])
        pairs = torch.stack([rows, idx], 1).to(queries.device)
    return _reference(queries, db, k, normalized=normalized, exclude=pairs)


# ----------------------------------------------------------------------------- torch.compile
@torch.library.custom_op("simcore::cosine_topk", mutates_args=())
def _cosine_topk_op(queries: torch.Tensor, database: torch.Tensor, k: int, normalized: bool,
                    exclude: Optional[torch.Tensor], exclude_self: bool, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    ex = "self" if exclude_self else exclude
    src = _Source(database, queries.shape[1], queries.device)
    return _search(queries, src, k, normalized, ex, block_size or None, False)


@_cosine_topk_op.register_fake
def _(queries, database, k, normalized, exclude, exclude_self, block_size):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=torch.float32), queries.new_empty((Q, k), dtype=torch.int64))


# ----------------------------------------------------------------------------- public API
def cosine_topk(queries: torch.Tensor, database, k: int, *, normalized: bool = False, exclude=None,
                block_size: Optional[int] = None, progress: Optional[bool] = None):
    """Exact top-k cosine similarity search.

    Args:
      queries: (Q, D) float32 / float16 / bfloat16 tensor (float64 is searched in float32).
      database: (N, D) tensor on the queries' device, a numpy array or memmap, or an
        iterable of (n_i, D) chunks (tensors or arrays), searched in one streaming pass;
        indices count rows across chunks.
      k: 1 <= k <= N.
      normalized: True = inner-product search on the inputs as given (no normalisation).
      exclude: None; ``"self"`` (exclude pair (i, i): querying a set against itself);
        or an (E, 2) integer tensor of (query row, database index) pairs.
      block_size: database rows per tile (default 8192 on CPU, 16384 on CUDA).
      progress: tqdm bar (None = on for memmaps and iterables; shown after 2 s).

    Returns:
      (scores, indices): float32 (Q, k) sorted descending and int64 (Q, k); ties go to the
      lower database index; slots with no candidate left (exclusions) are (-inf, -1).
    Raises:
      TypeError for non-float inputs or a wrong exclude type; ValueError for bad shapes,
      empty inputs, k outside [1, N], mixed devices, out-of-range exclusions and rows
      holding NaN or Inf (the message names the row).
    """
    _check_queries(queries)
    k = _check_k(k)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    source = _Source(database, queries.shape[1], queries.device)
    if source.n is not None and k > source.n:
        raise ValueError(f"k={k} exceeds the number of database rows N={source.n}")
    if not dispatch.use_compiled(queries.device):
        with torch.no_grad():
            return _reference_search(queries.detach(), source, k, normalized, exclude)
    if isinstance(exclude, str) and exclude not in ("self", "diagonal"):
        raise ValueError(f"exclude must be None, 'self' or an (E, 2) tensor of (query, index) pairs, got {exclude!r}")
    if torch.compiler.is_compiling() and isinstance(database, torch.Tensor) and \
            (exclude is None or isinstance(exclude, (str, torch.Tensor))):
        # Under torch.compile the search is one opaque custom op (register_fake gives the shapes).
        return _cosine_topk_op(queries.detach(), database.detach(), k, bool(normalized),
                               exclude if isinstance(exclude, torch.Tensor) else None,
                               isinstance(exclude, str), int(block_size or 0))
    with torch.no_grad():
        return _search(queries.detach(), source, k, bool(normalized), exclude, block_size, progress)


# ----------------------------------------------------------------------------- FlatIndex
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
        if metric not in _METRIC_CODES:
            raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
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
        _check_float_dtype(x.dtype, "vectors")
        x = x.detach().to(self.device, self.dtype)
        _check_finite_rows(x.float() if x.dtype != torch.float32 else x, "added vector", self._n)
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
        """Write the index to ``path`` (atomically: a temporary file, then a rename)."""
        payload = self.vectors.detach().cpu().contiguous().view(torch.uint8).numpy()
        body = _HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self.dtype], _METRIC_CODES[self.metric], 0,
                            self.dim, self._n, zlib.crc32(payload))
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(body + struct.pack("<I", zlib.crc32(body)))
            f.write(payload.data)
        os.replace(tmp, path)

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


# ----------------------------------------------------------------------------- FAISS
def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        raise ImportError("simcore.faiss_index needs FAISS: `pip install faiss-cpu` "
                          "(or faiss-gpu on a CUDA machine), or `pip install simcore[faiss]`") from exc
    return faiss


class FaissIndex:
    """A FAISS index behind simcore's search API: ``add``, ``search`` -> (float32 scores,
    int64 indices) tensors with missing results as (-inf, -1), ``len``."""

    def __init__(self, index, metric, device):
        self.index, self.metric, self.device = index, metric, device

    def __len__(self):
        return int(self.index.ntotal)

    def _prep(self, x):
        faiss = _import_faiss()
        if isinstance(x, torch.Tensor):
            if not x.dtype.is_floating_point:
                raise TypeError(f"vectors must be floating point, got {x.dtype}")
            x = x.detach().float().cpu().numpy()
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise ValueError(f"expected shape (n, {self.index.d}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or Inf")
        if self.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def add(self, x) -> None:
        x = self._prep(x)
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    def search(self, queries, k: int):
        k = _check_k(k)
        if k > len(self):
            raise ValueError(f"k={k} exceeds the number of indexed vectors N={len(self)}")
        scores, index = self.index.search(self._prep(queries), k)
        scores, index = torch.from_numpy(scores), torch.from_numpy(index)
        scores = scores.masked_fill(index < 0, float("-inf"))
        return scores.to(self.device), index.to(self.device)


def faiss_index(data, kind: str = "HNSW32", *, metric: str = "cosine", device=None, nprobe: Optional[int] = None,
                train_size: Optional[int] = None) -> FaissIndex:
    """Hand ``data`` ((N, D) tensor / array, or an iterable of chunks) to a FAISS index built by
    ``faiss.index_factory(D, kind, inner product)``: e.g. "Flat", "IVF4096,Flat", "IVF1024,PQ32",
    "HNSW32", "PQ32". ``metric="cosine"`` normalises vectors (and queries at search time);
    ``"ip"`` keeps them. IVF/PQ kinds are trained on the first ``train_size`` rows (default:
    the first chunk / all of an in-memory array). ``device="cuda"`` moves the index to the GPU
    where faiss-gpu is installed. FAISS is optional: ImportError says what to install.
    """
    faiss = _import_faiss()
    if metric not in _METRIC_CODES:
        raise ValueError(f"metric must be 'cosine' or 'ip', got {metric!r}")
    chunks = [data] if isinstance(data, (torch.Tensor, np.ndarray)) else list(data)
    if not chunks:
        raise ValueError("faiss_index: no data")
    first = chunks[0]
    if first.ndim != 2 or first.shape[0] == 0:
        raise ValueError(f"faiss_index: data must be (N, D) with N > 0, got shape {tuple(first.shape)}")
    dim = int(first.shape[1])
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    out_device = torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            raise ImportError("faiss_index(device='cuda') needs faiss-gpu; this faiss has no GPU support")
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, torch.device(device).index or 0, index)
        index._simcore_resources = res  # keep the resources alive with the index
        out_device = torch.device(device)
    wrapper = FaissIndex(index, metric, out_device)
    if not index.is_trained:
        sample = wrapper._prep(first)
        if train_size is not None:
            sample = sample[:train_size]
        index.train(sample)
    if nprobe is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    for c in chunks:
        wrapper.add(c)
    return wrapper
