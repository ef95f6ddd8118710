"""The compiled search behind cosine_topk: one (query rows x database rows) score tile at a
time, computed by torch's GEMM and scanned by the compiled kernels (csrc/cpu/cosine_topk.cpp,
csrc/cuda/cosine_topk.cu) into per-query reservoirs, so the Q x N score matrix never exists.

Per database block: ``cosine_topk_prepare_block`` computes the row scales 1/||d_j||, the
rescoring slack and, when the GEMM runs in bfloat16 on rows of another dtype, the bfloat16
copy; then, per block of query rows, ``torch.mm`` fills the tile and ``cosine_topk_update``
merges it into the reservoirs (rescoring half-GEMM candidates in float32).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from simcore import dispatch
from simcore.search.error_bounds import rescore_bounds
from simcore.search.inputs import as_block, check_finite_rows, exclusion_csr
from simcore.search.tile_gemm import exact_cuda_gemms, gemm_dtype

_INT64_MAX = torch.iinfo(torch.int64).max
# Tile shape (measured, docs/cosine_topk.md): on the 2-core CPU, few large GEMM
# calls beat cache-sized tiles (each torch.mm is an OpenMP fork/join, costly on a
# busy machine); 1024 x 8192 float32 scores = 32 MB, the only O(block^2) buffer.
DEFAULT_DB_BLOCK = {"cpu": 8192, "cuda": 16384}        # database rows per tile
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}  # scores per tile (query rows = this / rows)
# CUDA: scan tiles of at most COSINE_TOPK_SPLIT_MAX_ROWS query rows with (row, segment) thread blocks
# (False: one block per row, as larger tiles; the results are identical, tests and benchmarks compare)
SPLIT_SMALL_TILES = True


def tile_shape(device, n_queries, block_size=None):
    """(database rows, query rows) of one score tile; ``block_size`` overrides the database rows."""
    kind = "cuda" if dispatch.cuda_path(device) else "cpu"
    db_rows = int(block_size) if block_size else DEFAULT_DB_BLOCK[kind]
    return db_rows, max(1, min(n_queries, DEFAULT_TILE_ELEMENTS[kind] // db_rows))


def search(queries, source, k, normalized, exclude, block_size, progress):
    """(scores, indices) of the exact top-k of ``source`` (an inputs.DatabaseSource) for
    ``queries``, on the compiled kernels of the queries' device."""
    device, dim = queries.device, queries.shape[1]
    with exact_cuda_gemms(device):
        scan = TileScan(queries, k, normalized, source.n, exclude, block_size)
        rows = 0
        with _progress_bar(progress, source) as bar:
            for chunk in source.chunks():
                chunk = as_block(chunk, dim, device, rows)
                n = chunk.shape[0]
                if source.n is not None and rows + n > source.n:
                    raise ValueError(f"database yielded more rows than its shape says ({source.n})")
                for start in range(0, n, scan.block_rows):
                    scan.add_block(chunk[start:start + scan.block_rows], rows + start)
                rows += n
                if bar is not None:
                    bar.update(n)
                if scan.found_bad_row():
                    break
    return scan.result(rows, exclude)


@contextlib.contextmanager
def _progress_bar(progress, source):
    """A tqdm bar over the database rows (None = on for memmaps and iterables; shown after 2 s)."""
    bar = None
    if progress or (progress is None and source.streamed):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=source.n, unit="rows", desc="cosine_topk", delay=2.0, unit_scale=True)
        except ImportError:  # tqdm is a dependency; never fail a search over a progress bar
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


class _GemmBuffers:
    """Per tile-GEMM dtype: the queries in it, the reused score tile and (made when first
    needed) the reused buffer the prepare kernel converts database blocks into."""
    __slots__ = ("queries", "tile", "converted")

    def __init__(self, queries, tile):
        self.queries, self.tile, self.converted = queries, tile, None


class TileScan:
    """One search's state across database blocks: float32 queries (unit rows for cosine),
    per-query reservoirs of (score, index) with counts and thresholds, the exclusion CSR,
    the first non-finite database row, and reused buffers. ``add_block`` scans a block,
    ``result`` checks the stream's end and returns the sorted top-k."""

    def __init__(self, queries, k, normalized, n_rows, exclude, block_size):
        self.ext = ext = dispatch.extension()
        self.device = device = queries.device
        self.k, self.cosine, self.n_rows = k, not normalized, n_rows
        self.queries = _float32_queries(queries, self.cosine)
        self.query_norms = self.queries.norm(dim=1).contiguous()
        Q = self.queries.shape[0]
        # Reservoir: compacted to k when full, so a larger one means rarer compactions
        # but a threshold that tightens later (more candidates). CUDA needs a thread
        # block of room; on the CPU 1.5k (at least k + 16) measured best.
        cap = k + max(k // 2, ext.COSINE_TOPK_MIN_SLACK if dispatch.cuda_path(device) else 16)
        if n_rows is not None:
            cap = min(cap, n_rows + 1)
        self.reservoir = torch.empty((Q, cap, 2), dtype=torch.int64, device=device)
        self.count = torch.zeros(Q, dtype=torch.int64, device=device)
        self.threshold = torch.full((Q,), float("-inf"), dtype=torch.float32, device=device)
        self.status = torch.full((1,), _INT64_MAX, dtype=torch.int64, device=device)  # first bad row
        self.ex_off, self.ex_idx = exclusion_csr(exclude, Q, n_rows, device)
        self.block_rows, self.query_rows = tile_shape(device, Q, block_size)
        self.nthreads = dispatch.num_threads()
        self.stream = dispatch.cuda_stream(device) if dispatch.cuda_path(device) else 0
        # CUDA tiles of few query rows (at most COSINE_TOPK_SPLIT_MAX_ROWS) are scanned by one thread
        # block per (row, 256-column segment) instead of one per row, through this scratch:
        # the segments' scores and survivor counts (csrc/cuda/cosine_topk.cu)
        self.workspace_arg = None
        if dispatch.cuda_path(device) and SPLIT_SMALL_TILES and self.query_rows <= ext.COSINE_TOPK_SPLIT_MAX_ROWS:
            self.workspace = torch.empty(ext.cosine_topk_split_workspace(self.query_rows, self.block_rows),
                                         dtype=torch.float32, device=device)
            self.workspace_arg = dispatch.tensor_arg(self.workspace)
        A = dispatch.tensor_arg  # packed once: these tensors live (and stay put) for the whole search
        self._state_args = (A(self.ex_off), A(self.ex_idx), A(self.reservoir), A(self.count), A(self.threshold))
        self._gemm_dtypes = {}  # database dtype -> tile GEMM dtype
        self._buffers = {}      # tile GEMM dtype -> _GemmBuffers
        self._bounds = {}       # (GEMM dtype, database dtype) -> rescore_bounds(...)

    def add_block(self, block, row0):
        """Scan database rows row0 .. row0 + len(block) into the reservoirs."""
        buffers, gemm_block, scale, slack, query_slack, slack_rel = self._prepare(block, row0)
        A, ext, qg, tile = dispatch.tensor_arg, self.ext, buffers.queries, buffers.tile
        rescore = gemm_block.dtype != torch.float32
        n_rows = -1 if self.n_rows is None else self.n_rows
        Q, nb, qb = self.queries.shape[0], block.shape[0], self.query_rows
        scale_arg, slack_arg, block_arg = A(scale), A(slack), A(block)
        for q0 in range(0, Q, qb):
            q1 = min(Q, q0 + qb)
            out = tile[: (q1 - q0) * nb].view(q1 - q0, nb)
            torch.mm(qg[q0:q1], gemm_block.T, out=out)
            ext.cosine_topk_update(A(out), scale_arg, slack_arg, A(self.queries[q0:q1]), A(query_slack[q0:q1]),
                                   block_arg, *self._state_args, q0, row0, self.k, n_rows, rescore,
                                   self.nthreads, self.stream, slack_rel, self.workspace_arg)

    def _prepare(self, block, row0):
        """Run the prepare kernel on a block (scales, slack, NaN/Inf check into ``status``,
        the bfloat16 copy where the GEMM needs one): (buffers of the GEMM dtype, the rows
        the GEMM reads, scale, slack, per-query slack, relative slack)."""
        gdt = self._gemm_dtypes.get(block.dtype)
        if gdt is None:
            gdt = self._gemm_dtypes[block.dtype] = gemm_dtype(block.dtype, self.device, self.cosine,
                                                              self.queries.shape[0])
        buffers = self._buffers_for(gdt)
        nb, dim = block.shape
        gemm_block = block
        if block.dtype != gdt:  # the prepare kernel writes the bfloat16 copy into one reused buffer
            if buffers.converted is None:
                buffers.converted = torch.empty((self.block_rows, dim), dtype=gdt, device=self.device)
            gemm_block = buffers.converted[:nb]
        factor, query_slack, slack_rel = 0.0, self.query_norms, 0.0
        if gdt != torch.float32:
            key = (gdt, block.dtype)
            if key not in self._bounds:
                self._bounds[key] = rescore_bounds(self.queries, buffers.queries, gdt, block.dtype, dim, self.device)
            factor, query_slack, slack_rel = self._bounds[key]
        scale = torch.empty(nb, dtype=torch.float32, device=self.device)
        slack = torch.empty(nb, dtype=torch.float32, device=self.device)
        A = dispatch.tensor_arg
        self.ext.cosine_topk_prepare_block(A(block), A(scale), A(slack), A(self.status), row0, self.cosine, factor,
                                           self.nthreads, self.stream,
                                           None if gemm_block is block else A(gemm_block))
        return buffers, gemm_block, scale, slack, query_slack, slack_rel

    def _buffers_for(self, gdt):
        buffers = self._buffers.get(gdt)
        if buffers is None:
            qg = self.queries if gdt == torch.float32 else self.queries.to(gdt)
            tile = torch.empty(self.query_rows * self.block_rows, dtype=gdt, device=self.device)
            buffers = self._buffers[gdt] = _GemmBuffers(qg, tile)
        return buffers

    def found_bad_row(self):
        """Whether the prepare kernel has found a non-finite row (asked on CPU only: on CUDA
        the question would wait for the GPU; the stream is then checked at its end)."""
        return not dispatch.cuda_path(self.device) and int(self.status[0]) != _INT64_MAX

    def result(self, rows, exclude):
        """The sorted top-k after ``rows`` database rows, once the stream's end is checked."""
        bad = int(self.status[0])
        if bad != _INT64_MAX:
            raise ValueError(f"database row {bad} contains NaN or Inf, or has a norm above 1e38 that float32 "
                             "arithmetic cannot score (cosine_topk rejects such rows)")
        if rows == 0:
            raise ValueError("database is empty")
        if self.n_rows is not None and rows != self.n_rows:
            raise ValueError(f"database yielded {rows} rows but its shape says {self.n_rows}")
        if self.k > rows:
            raise ValueError(f"k={self.k} exceeds the number of database rows N={rows}")
        if self.ex_idx.numel() and exclude is not None and not isinstance(exclude, str) \
                and int(self.ex_idx.max()) >= rows:
            raise ValueError(f"exclude database indices must be in [0, {rows}), got {int(self.ex_idx.max())}")
        return finalize(self.reservoir, self.count, self.k)


def _float32_queries(queries, cosine):
    """The queries as contiguous float32 rows, normalised for cosine search; NaN/Inf rows raise."""
    qf = queries.detach().to(torch.float32)
    check_finite_rows(qf, "queries")
    if cosine:  # in double: a float32 norm overflows for |x| above ~1.8e19
        qf = F.normalize(queries.detach().double(), dim=1).float()
    return qf.contiguous()


def finalize(reservoir, count, k):
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
