"""How the search's tile GEMMs run: the dtype of each GEMM, the ``fp32_via_bf16`` choice
for float32 databases, and the CUDA matmul settings that keep the GEMMs exact."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from simcore import dispatch

# float32 databases on CPUs with AVX-512 BF16: a bfloat16 GEMM (about 2x the float32
# rate, measured in docs/cosine_topk.md) nominates candidates and float32 rescoring
# decides, so the result stays the exact float32 top-k. Cosine only: unit queries keep
# the bfloat16 GEMM from overflowing and its underflow inside topk_slack_floor.
# Measured (N=200,000, D=256, k=10, busy 2-core machine): Q=1 ran 5x slower through
# oneDNN's bfloat16 GEMV, Q=4..256 1.2-2.2x faster; hence the automatic choice needs
# at least this many queries.
FP32_VIA_BF16_MIN_QUERIES = 8

_fp32_via_bf16_choice: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar(
    "simcore_fp32_via_bf16", default=None)


@contextlib.contextmanager
def fp32_via_bf16(enabled: Optional[bool]):
    """Inside the block, CPU cosine searches of float32 databases nominate candidates with a
    bfloat16 GEMM (``True``) or run float32 tile GEMMs (``False``), whatever the CPU and the
    query count; ``None`` is the automatic choice. The result is the exact float32 top-k
    either way. A context variable: it holds for the current thread (or asyncio task) only."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"fp32_via_bf16 takes True, False or None, got {enabled!r}")
    token = _fp32_via_bf16_choice.set(enabled)
    try:
        yield
    finally:
        _fp32_via_bf16_choice.reset(token)


def gemm_dtype(db_dtype, device, cosine, n_queries):
    """The dtype the tile GEMMs of a ``db_dtype`` database run in; anything but float32
    means they only nominate and float32 rescoring decides."""
    if db_dtype == torch.float32:
        if dispatch.cuda_path(device) or not cosine:
            return torch.float32
        forced = _fp32_via_bf16_choice.get()
        if forced is not None:
            return torch.bfloat16 if forced else torch.float32
        fast = n_queries >= FP32_VIA_BF16_MIN_QUERIES and dispatch.extension().cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    # CPU: no fast float16 GEMM, bfloat16 runs on AVX-512 BF16 via oneDNN.
    # CUDA: read float16 as such for cosine (unit-norm queries cannot overflow it).
    if dispatch.cuda_path(device) and db_dtype == torch.float16 and cosine:
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def exact_cuda_gemms(device):
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
