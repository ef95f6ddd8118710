"""The GEMMs of the fused margin-softmax engine: which operand dtype, which CPU library.

* :func:`gemm_operand_dtype` — the low-precision operand policy (``EngineOptions.lowp_gemms``):
  bfloat16 or float16 operands, float32 accumulation and output.
* :func:`cpu_fast_bf16` — whether this CPU has fast bfloat16 GEMMs (AVX512-BF16; AMX CPUs have it too).
* :func:`mm_f32` — a·b with float32 accumulation and output for any of the three operand dtypes.
* :func:`fp16_block_scale` — the power-of-two scale that puts a gradient block into float16's range.
* :func:`onednn_linear` — torch's oneDNN matmul for the CPU's cosines and ∂L/∂x̂
  (``EngineOptions.cpu_gemm``), or None for ``torch.mm``.
"""
from __future__ import annotations

import contextlib
import functools
import platform

import torch

from simcore import dispatch

__all__ = ["LOWP_POLICIES", "CPU_GEMMS", "FP16_TOP_EXPONENT", "cpu_fast_bf16", "gemm_operand_dtype", "mm_f32",
           "fp16_block_scale", "onednn_linear"]

# "auto": half operands on CUDA, and bfloat16 ones on a CPU with fast bfloat16 GEMMs (cpu_fast_bf16);
# "cuda": half operands on CUDA devices only; "always": on every device (CPU forms the products
# in float32, exact for bfloat16 and float16 values, so it reproduces the CUDA numerics); "never":
# float32 operands.
LOWP_POLICIES = ("auto", "cuda", "always", "never")
# "auto": oneDNN on x86-64 where it passes a probe; "torch": torch.mm (MKL) always.
CPU_GEMMS = ("auto", "torch")
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (recent torch)
_HALF = (torch.bfloat16, torch.float16)
# A float16 gradient block is scaled by 2^k so that its largest |value| lies in [2^14, 2^15):
# float16's largest finite value is 65504 < 2^16, and values from 65520 up round to inf.
FP16_TOP_EXPONENT = 15
_MAX_SHIFT = 126  # |k| <= 126: 2^k and 2^-k are normal float32 numbers, so both rescalings are exact


_cpu_fast_bf16 = []  # the detection's result, once known


@torch.compiler.assume_constant_result  # torch.compile cannot trace the extension call: a graph constant
def cpu_fast_bf16() -> bool:
    """Whether this CPU runs bfloat16 GEMMs fast (detected once): AVX512-BF16 by cpuid in the
    extension (every AMX CPU has it too), and oneDNN in torch to run them. False where the
    extension is missing."""
    if not _cpu_fast_bf16:
        try:
            fast = bool(dispatch.extension().cpu_has_fast_bf16()) and torch.backends.mkldnn.is_available()
        except ImportError:
            fast = False
        _cpu_fast_bf16.append(fast)
    return _cpu_fast_bf16[0]


def gemm_operand_dtype(embeddings, weight, policy, cpu_bf16=None):
    """The engine's GEMM operand dtype under ``policy`` (float32 accumulation and output always):
    bfloat16 when the embeddings or the weight are bfloat16 or autocast to bfloat16 is on;
    else float16 when they are float16 or autocast to float16 is on; else float32. Mixed
    bfloat16/float16 inputs take bfloat16 (the wider range). On CPU: with ``"always"``, and with
    ``"auto"`` bfloat16 only, where the CPU has fast bfloat16 GEMMs (``cpu_bf16``, None:
    :func:`cpu_fast_bf16`); float16 has no fast CPU GEMM."""
    dev = embeddings.device
    if policy == "never" or not _MM_OUT_DTYPE:
        return torch.float32
    dtypes = (embeddings.dtype, weight.dtype)
    if torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) in _HALF:
        dtypes += (torch.get_autocast_dtype(dev.type),)
    half = next((h for h in _HALF if h in dtypes), torch.float32)
    if dispatch.cuda_path(dev) or policy == "always":
        return half
    fast_cpu = cpu_fast_bf16() if cpu_bf16 is None else cpu_bf16
    if policy == "auto" and dev.type == "cpu" and half == torch.bfloat16 and fast_cpu:
        return half
    return torch.float32


def mm_f32(a, b, out=None):
    """a·b with float32 accumulation and output. bfloat16 and float16 operands go to cuBLAS as
    such; on CPU their products are formed in float32 (exact: 8- and 11-bit significands
    multiply into at most 22 bits, within float32's 24). torch has no CPU GEMM of bfloat16
    operands with a float32 result, so on a CPU with fast bfloat16 GEMMs the float32 copies of
    bfloat16 operands go to oneDNN with its bfloat16 math mode on (it rounds them to bfloat16,
    exactly, as they are bfloat16 values); elsewhere torch ignores that mode."""
    if a.dtype in _HALF:
        if a.is_cuda:
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        bf16_math = a.dtype == torch.bfloat16 and cpu_fast_bf16()
        a, b = a.float(), b.float()
        if bf16_math:
            with _onednn_bf16_math():
                return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


@contextlib.contextmanager
def _onednn_bf16_math():
    """torch's float32 CPU matmuls through oneDNN in bfloat16 math (float32 accumulation and result)
    for the ``with`` block. A process-wide setting: a float32 matmul that another thread runs at the
    same moment takes it too."""
    prec = torch.backends.mkldnn.matmul
    old = prec.fp32_precision
    prec.fp32_precision = "bf16"
    try:
        yield
    finally:
        prec.fp32_precision = old


def fp16_block_scale(block):
    """(scale, inverse) as 0-dim float32 tensors on the block's device, both powers of two:
    ``scale·max|block|`` lies in [2^14, 2^15), inside float16's range (no host sync).

    A float16 gradient GEMM then runs on ``(scale·G)`` and its float32 result times
    ``inverse`` is exact (powers of two, |k| <= 126). Scaled, G keeps float16's 11-bit
    significand down to 2^-29 of its largest entry (the normal range) and loses entries below
    ~2^-40 of it; unscaled, a 1/B row weight times a softmax value underflows float16 and
    dψ/dcos θ·s can overflow it. A zero block gets 2^15; an inf or NaN entry stays inf or NaN."""
    amax = torch.linalg.vector_norm(block, ord=float("inf"))
    _, exponent = torch.frexp(amax)  # amax = m·2^e, m in [0.5, 1): scaled max = m·2^15
    shift = (FP16_TOP_EXPONENT - exponent).clamp_(-_MAX_SHIFT, _MAX_SHIFT).to(torch.int32)
    # exact powers of two from their float32 bit patterns (exp2/pow need not be exact on every device)
    scale = ((shift + 127) << 23).view(torch.float32)
    inverse = ((127 - shift) << 23).view(torch.float32)
    return scale, inverse


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
