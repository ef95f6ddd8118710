"""The GEMMs of the fused margin-softmax engine: which operand dtype, which CPU library.

* :func:`use_bf16_gemms` — the bfloat16-operand policy (``EngineOptions.bf16_gemms``):
  bfloat16 operands, float32 accumulation and output.
* :func:`mm_f32` — a·b with float32 accumulation and output for either operand dtype.
* :func:`onednn_linear` — torch's oneDNN matmul for the CPU's cosines and ∂L/∂x̂
  (``EngineOptions.cpu_gemm``), or None for ``torch.mm``.
"""
from __future__ import annotations

import functools
import platform

import torch

__all__ = ["BF16_POLICIES", "CPU_GEMMS", "use_bf16_gemms", "mm_f32", "onednn_linear"]

# "cuda": bfloat16 operands on CUDA devices only; "always": on every device (CPU forms the products
# in float32, exact for bfloat16 values, so it reproduces the CUDA numerics); "never": float32 operands.
BF16_POLICIES = ("cuda", "always", "never")
# "auto": oneDNN on x86-64 where it passes a probe; "torch": torch.mm (MKL) always.
CPU_GEMMS = ("auto", "torch")
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (recent torch)


def use_bf16_gemms(embeddings, weight, policy):
    """Whether the engine runs its three GEMMs on bfloat16 operands under ``policy``: when
    the embeddings or the weight are bfloat16 or autocast to bfloat16 is on. float16 inputs
    keep float32 operands: s·(softmax − one-hot) blocks underflow and overflow float16's
    range without loss scaling."""
    dev = embeddings.device
    if policy == "never" or (policy == "cuda" and dev.type != "cuda") or not _MM_OUT_DTYPE:
        return False
    if torch.bfloat16 in (embeddings.dtype, weight.dtype):
        return True
    return torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) == torch.bfloat16


def mm_f32(a, b, out=None):
    """a·b with float32 accumulation and output. bfloat16 operands go to cuBLAS as such;
    on CPU their products are formed in float32 (exact for bfloat16 values)."""
    if a.dtype == torch.bfloat16:
        if a.is_cuda:
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        a, b = a.float(), b.float()
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


@functools.lru_cache(maxsize=None)
def _probed_onednn_op():
    """torch's private oneDNN matmul when it exists here and computes both forms the
    engine uses exactly (a·wᵀ, and g·w through the transposed view wᵀ), else None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        a = torch.arange(6.0).view(2, 3)
        w = torch.arange(12.0).view(4, 3)
        g = torch.arange(8.0).view(2, 4)  # small integers: the products are exact
        if torch.equal(op(a, w, None, "none", [], ""), a @ w.t()) and \
                torch.equal(op(g, w.t(), None, "none", [], ""), g @ w):
            return op
    except Exception:  # private op: absent, renamed or with another signature in this torch
        pass
    return None


def onednn_linear(device, cpu_gemm):
    """oneDNN's a·bᵀ for dense float32 CPU tensors (returns a new tensor), or None for torch.mm.

    On the CI machine's AMD EPYC, MKL_VERBOSE reports no AVX-512 path and oneDNN ran the
    cosines X̂·Ŵᵀ and ∂L/∂x̂ = G·Ŵ ~1.4x faster (docs/margin_softmax.md). ∂L/∂ŵ = Gᵀ·X̂
    stays torch.mm: oneDNN would first copy Gᵀ to contiguous memory, while torch.mm
    writes straight into the weight gradient."""
    if device.type != "cpu" or cpu_gemm != "auto" or not torch.backends.mkldnn.enabled:
        return None
    return _probed_onednn_op()
