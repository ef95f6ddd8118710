"""Exact cosine top-k search and the indexes built on it.

Modules:
  cosine_topk   the public function ``cosine_topk``, its torch.compile custom op, the reference path
  tiled_search  the compiled search: score tiles scanned into per-query reservoirs
  tile_gemm     the dtype of each tile GEMM, ``fp32_via_bf16``, exact CUDA GEMM settings
  error_bounds  the proven bounds that decide which half-GEMM candidates are rescored
  inputs        checks and conversions of queries, databases, k and exclusions
  flat_index    ``FlatIndex`` and its file format
  faiss_index   ``faiss_index`` / ``FaissIndex``: FAISS behind the same API

``simcore`` re-exports cosine_topk, FlatIndex, FaissIndex and faiss_index; ``fp32_via_bf16``
(a context manager: force or forbid the bfloat16 candidate GEMM for float32 databases) is
here.
"""
from simcore.search.tile_gemm import fp32_via_bf16

__all__ = ["fp32_via_bf16"]
