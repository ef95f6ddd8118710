"""Exact cosine (or inner-product) top-k search without the Q x N score matrix.

``cosine_topk(queries, database, k)`` returns what
``torch.topk(normalize(q) @ normalize(db).T, k)`` returns, ties broken by the
lower database index, while holding only one (query block x database block)
score tile at a time:

* the GEMM of each tile runs through torch (oneDNN/MKL on CPU, cuBLAS on CUDA);
* the compiled kernel (csrc/cpu/cosine_topk.cpp, csrc/cuda/cosine_topk.cu)
  scales the tile by 1/||d_j|| (no normalised copy of the database), scans it
  against each query's running k-th best score, and merges the survivors into
  per-query reservoirs (Q x cap entries, cap ~ 1.5k; simcore.search.tiled_search);
* float16/bfloat16 databases: the tile GEMM runs in a half dtype and its scores
  only nominate candidates; every candidate within a proven error bound of the
  threshold is rescored exactly in float32 from the half rows, so the result is
  the exact top-k of the half database (simcore.search.error_bounds,
  docs/cosine_topk.md).

The database may be a tensor, a numpy array or memmap, or any iterable of
(n_i, D) chunks (one streaming pass; indices continue across chunks). This
module holds the public function, its torch.compile custom op and the path
through the plain-PyTorch reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from simcore import dispatch
from simcore.reference.cosine_topk import cosine_topk as reference_cosine_topk
from simcore.search.inputs import (DatabaseSource, as_block, check_block_size, check_exclude_string, check_finite_rows,
                                   check_k, check_queries, exclusion_csr)
from simcore.search.tiled_search import search

__all__ = ["cosine_topk"]


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

    On CPUs with AVX-512 BF16, cosine searches of float32 databases with at least 8 queries
    nominate candidates with a bfloat16 GEMM and decide in float32 (the same exact result);
    ``with simcore.search.fp32_via_bf16(True / False):`` forces that choice.
    """
    check_queries(queries)
    k = check_k(k)
    check_block_size(block_size)
    if isinstance(exclude, str):
        check_exclude_string(exclude)
    source = DatabaseSource(database, queries.shape[1], queries.device)
    if source.n is not None and k > source.n:
        raise ValueError(f"k={k} exceeds the number of database rows N={source.n}")
    if not dispatch.use_compiled(queries.device):
        with torch.no_grad():
            return _reference_search(queries.detach(), source, k, normalized, exclude)
    if torch.compiler.is_compiling() and isinstance(database, torch.Tensor) and \
            (exclude is None or isinstance(exclude, (str, torch.Tensor))):
        # Under torch.compile the search is one opaque custom op (register_fake gives the shapes).
        return _cosine_topk_op(queries.detach(), database.detach(), k, bool(normalized),
                               exclude if isinstance(exclude, torch.Tensor) else None,
                               isinstance(exclude, str), int(block_size or 0))
    with torch.no_grad():
        return search(queries.detach(), source, k, bool(normalized), exclude, block_size, progress)


@torch.library.custom_op("simcore::cosine_topk", mutates_args=())
def _cosine_topk_op(queries: torch.Tensor, database: torch.Tensor, k: int, normalized: bool,
                    exclude: Optional[torch.Tensor], exclude_self: bool, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    source = DatabaseSource(database, queries.shape[1], queries.device)
    return search(queries, source, k, normalized, "self" if exclude_self else exclude, block_size or None, False)


@_cosine_topk_op.register_fake
def _(queries, database, k, normalized, exclude, exclude_self, block_size):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=torch.float32), queries.new_empty((Q, k), dtype=torch.int64))


def _reference_search(queries, source, k, normalized, exclude):
    """The same search through the plain-PyTorch reference (``set_backend("reference")``)."""
    dim = queries.shape[1]
    parts, rows = [], 0
    for chunk in source.chunks():
        chunk = as_block(chunk, dim, queries.device, rows)
        parts.append(chunk.to(torch.promote_types(chunk.dtype, torch.float32)))
        rows += chunk.shape[0]
    if rows == 0:
        raise ValueError("database is empty")
    if k > rows:
        raise ValueError(f"k={k} exceeds the number of database rows N={rows}")
    db = torch.cat(parts)
    check_finite_rows(queries, "queries")
    check_finite_rows(db, "database")
    pairs = None
    if exclude is not None:
        offsets, index = exclusion_csr(exclude, queries.shape[0], rows, torch.device("cpu"))
        query_rows = torch.repeat_interleave(torch.arange(queries.shape[0]), offsets[1:] - offsets[:-1])
        pairs = torch.stack([query_rows, index], 1).to(queries.device)
    return reference_cosine_topk(queries, db, k, normalized=normalized, exclude=pairs)
