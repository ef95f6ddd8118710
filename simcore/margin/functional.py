"""Margin-softmax losses over sampled class subsets (ArcFace, CosFace, combined).

Public API: :func:`margin_softmax_partial` (the one kernel), :func:`arcface_partial`
(additive angular margin m2), :func:`cosface_partial` (additive cosine margin m3),
:class:`PartialMarginHead` (class centres + a truly sparse optimizer) and
:func:`sample_classes` (the Partial FC sampler). Semantics and design: docs/margin_softmax.md.

How the compiled path works (CPU and CUDA run this same Python code; only the
epilogue kernels in ``simcore._C`` differ by device):

* ``ms_normalize_rows`` gathers the sampled centres of one class block (by index),
  L2-normalises them and writes them as the GEMM operand dtype (float32, or
  bfloat16 under ``BF16_GEMMS``); the embeddings likewise, once.
* torch's GEMM (oneDNN/MKL on CPU, cuBLAS on CUDA) forms the block of cosines.
* ``ms_lse_block`` puts the margin on the target column and merges the block into
  an online log-sum-exp; ``ms_grad_block`` turns the block, in place, into
  row_weight·s·(softmax − one-hot) with dψ/dcos θ on the target.
* two GEMMs give ∂L/∂x̂ and ∂L/∂ŵ; ``ms_project_rows`` applies the
  normalisation Jacobian (u − (u·v̂)v̂)/‖v‖ and scatters the rows straight into
  the gradient of ``weight``.

When the whole (B × S) cosine matrix fits the workspace budget it is computed
once and reused (3 GEMMs); otherwise classes are processed in blocks twice
(pass 1: log-sum-exp, pass 2: gradients; 4 GEMMs) and extra memory stays
O(B·block + block·D), never O(B·S).
"""
from __future__ import annotations

import math
import platform
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.reference.margin_softmax import SIN_EPS, margin_param_grads, margin_softmax_loss

__all__ = ["margin_softmax_partial", "arcface_partial", "cosface_partial", "PartialMarginHead", "sample_classes"]

# Bytes of the (B × block) cosine workspace. When B·S·4 fits, one block holds
# every sampled class and pass 1's cosines are reused (3 GEMMs instead of 4).
WORKSPACE_BYTES = 32 << 20
# Cap on one streamed block (B·S·4 over the workspace). Below glibc's largest mmap
# threshold (32 MiB): a block allocated anew per class block (oneDNN has no out=) is then
# reused from the heap instead of page-faulted in every time (3x the faults measured).
STREAM_BLOCK_BYTES = 24 << 20
# CUDA's cap on one streamed block: larger than the CPU's (fewer launches and Python
# round trips per step), small beside the reference's (B × S) logits.
CUDA_STREAM_BLOCK_BYTES = 64 << 20
NORM_EPS = 1e-12  # as F.normalize: rows are divided by max(‖row‖, NORM_EPS)
# bfloat16 operands for the three GEMMs (float32 accumulation and output):
#   "cuda"   (default) on CUDA devices, when the embeddings or the weight are bfloat16
#            or autocast to bfloat16 is on;
#   "always" the same rule on every device; on CPU the products are formed in float32,
#            exact for bfloat16 values, so the CPU reproduces the CUDA numerics (tests);
#   "never"  float32 operands everywhere.
# float16 inputs keep float32 operands: s·(softmax − one-hot) blocks underflow and
# overflow float16's range without loss scaling.
BF16_GEMMS = "cuda"
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (recent torch)
_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- sampling
def sample_classes(labels: torch.Tensor, num_classes: int, num_samples: int,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sorted int64 class ids: every class in ``labels``, plus negatives drawn
    uniformly without replacement up to ``num_samples`` ids in total (exactly the
    positives when they alone reach ``num_samples``). Deterministic for a given
    ``generator`` state (random numbers are drawn on the generator's device, CPU
    by default) and backend.

    Compiled backend: Floyd's algorithm on the host over the negatives' ranks with
    a C/8-byte bitmap, O(k + C/64) for k negatives (C in the millions is fine);
    the ids are then moved to ``labels.device``. Reference backend: rejection
    sampling in torch, O(k log k).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class ids, got {labels.dtype}")
    for name, v in (("num_classes", num_classes), ("num_samples", num_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    positives = torch.unique(labels)  # sorted
    p = positives.numel()
    if p and not torch.compiler.is_compiling():  # the C++ sampler checks again; the torch one would not
        lo, hi = positives[0].item(), positives[-1].item()
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    k = int(num_samples) - p
    if k <= 0:
        return positives
    n = num_classes - p  # number of negative classes
    if k >= n:
        return torch.arange(num_classes, device=labels.device)
    gdev = generator.device if generator is not None else torch.device("cpu")
    if dispatch.use_compiled(torch.device("cpu")):
        randoms = torch.empty(k, dtype=torch.int64, device=gdev).random_(generator=generator).cpu()
        pos = positives.cpu()
        bitmap = torch.empty((n + 63) // 64, dtype=torch.int64)
        out = torch.empty(p + k, dtype=torch.int64)
        dispatch.extension().ms_sample_classes(tensor_arg(pos), tensor_arg(randoms), num_classes,
                                                tensor_arg(bitmap), tensor_arg(out))
        return out.to(labels.device)
    ranks = _distinct_uniform(k, n, generator, gdev).to(labels.device)
    # The r-th negative class is r + #{j : positives[j] − j <= r}.
    shift = positives - torch.arange(p, device=labels.device)
    negatives = ranks + torch.searchsorted(shift, ranks, right=True)
    return torch.sort(torch.cat([positives, negatives])).values


def _distinct_uniform(k, n, generator, device):
    """k distinct values of [0, n), a uniformly random k-subset: the first k distinct
    values of an i.i.d. uniform sequence (sequential sampling without replacement)."""
    m = int(math.ceil(-n * math.log1p(-k / n) * 1.05)) + 64  # expected draws for k distinct, plus slack
    vals = torch.randint(n, (m,), generator=generator, device=device)
    while True:
        uniq, inverse = torch.unique(vals, return_inverse=True)
        if uniq.numel() >= k:
            break
        vals = torch.cat([vals, torch.randint(n, (max(64, m // 8),), generator=generator, device=device)])
    first = torch.full((uniq.numel(),), vals.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(vals.numel(), device=device), reduce="amin")
    return uniq[torch.argsort(first)[:k]]


# --------------------------------------------------------------------------- checks
def check_sampled(sampled, labels, num_classes):
    """Raise unless ``sampled`` is a 1-D int64 tensor of strictly increasing class ids
    in [0, num_classes) on ``labels.device`` that contains every label."""
    if not isinstance(sampled, torch.Tensor) or sampled.dtype != torch.int64 or sampled.dim() != 1:
        raise TypeError("sampled must be a 1-D int64 tensor of class ids")
    if sampled.device != labels.device:
        raise ValueError(f"sampled is on {sampled.device} but labels on {labels.device}")
    if sampled.numel() == 0:
        raise ValueError("sampled is empty")
    if sampled.numel() > 1 and not bool((sampled[1:] > sampled[:-1]).all()):
        raise ValueError("sampled must be strictly increasing (sorted, no duplicates)")
    if int(sampled[0]) < 0 or int(sampled[-1]) >= num_classes:
        raise ValueError(f"sampled holds ids outside [0, {num_classes}): [{int(sampled[0])}, {int(sampled[-1])}]")
    if labels.numel():
        col = torch.searchsorted(sampled, labels).clamp_(max=sampled.numel() - 1)
        missing = sampled[col] != labels
        if bool(missing.any()):
            raise ValueError(f"sampled must contain every label; missing e.g. class {int(labels[missing][0])}")


def _check_margins(m1, m2, m3, scale):
    """Scalar margins; a (B,) tensor m1/m2/m3 (per-row margins) is checked by _row_margins."""
    for name, v in (("m1", m1), ("m2", m2), ("m3", m3), ("scale", scale)):
        if isinstance(v, torch.Tensor) and name != "scale":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not isinstance(m1, torch.Tensor) and m1 <= 0:
        raise ValueError(f"m1 must be positive, got {m1}")
    if not isinstance(m2, torch.Tensor) and not 0 <= m2 < math.pi:
        raise ValueError(f"m2 (the angular margin) must lie in [0, pi), got {m2}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")


def _check_inputs(embeddings, labels, weight, sample_rate, num_samples, reduction, subcenters=1):
    for name, t in (("embeddings", embeddings), ("labels", labels), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"embeddings must be float32, float16, bfloat16 or float64, got {embeddings.dtype}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class ids, got {labels.dtype} (convert with labels.long(); "
                        "other integer types are rejected rather than reinterpreted)")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, dim), got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    b, d = embeddings.shape
    if b == 0:
        raise ValueError("empty batch: embeddings has 0 rows")
    if labels.shape[0] != b:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {b} rows")
    if weight.shape[1] != d:
        raise ValueError(f"weight has dim {weight.shape[1]} but embeddings has dim {d}")
    if weight.shape[0] == 0 or d == 0:
        raise ValueError(f"weight must have at least one class and one dimension, got {tuple(weight.shape)}")
    if not (embeddings.device == labels.device == weight.device):
        raise ValueError(f"embeddings, labels and weight must be on one device, got {embeddings.device}, "
                         f"{labels.device} and {weight.device}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError("weight must have unit stride along its last dimension (rows may be strided); "
                         "pass weight.contiguous()")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_samples is None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _check_family(subcenters, None, weight)
    if not torch.compiler.is_compiling():  # one host sync; the C++ kernel checks again either way
        lo, hi = torch.aminmax(labels)
        c = weight.shape[0] // subcenters
        if lo.item() < 0 or hi.item() >= c:
            raise ValueError(f"labels must lie in [0, {c}), got values in [{lo.item()}, {hi.item()}]")


# --------------------------------------------------------------------------- the fused routine
class MarginSpec(NamedTuple):
    """What the fused kernel computes, besides per-row margins (docs/margin_softmax.md).

    m1, m2, m3, scale: the combined margin (scalars; per-row margins are a separate
    (B, 3) tensor). cam_power > 0: Cam-Softmax's ψ instead. filter_threshold:
    non-target cosines above it count as 0 (inf: off). curricular_t: CurricularFace's
    t (None: off). subcenters: K centres per class (weight rows c·K .. c·K + K − 1).
    """
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    scale: float = 64.0
    cam_power: float = 0.0
    filter_threshold: float = math.inf
    curricular_t: Optional[float] = None
    subcenters: int = 1

    def kernel_params(self):
        """The 9-tuple the ms_lse_block / ms_grad_block bindings take."""
        return (float(self.m1), float(self.m2), float(self.m3), float(self.scale), SIN_EPS, float(self.cam_power),
                float(self.filter_threshold), 0.0 if self.curricular_t is None else 1.0,
                0.0 if self.curricular_t is None else float(self.curricular_t))

    def as_list(self):
        """Floats for the custom ops' schema (subcenters travels separately)."""
        return [float(self.m1), float(self.m2), float(self.m3), float(self.scale), float(self.cam_power),
                float(self.filter_threshold), math.nan if self.curricular_t is None else float(self.curricular_t)]

    @staticmethod
    def from_list(v, subcenters):
        return MarginSpec(*v[:6], None if math.isnan(v[6]) else v[6], int(subcenters))


def _exec(device: torch.device) -> int:
    return dispatch.num_threads() if device.type == "cpu" else dispatch.cuda_stream(device)


# CPU GEMM engine for the cosines X̂·Ŵᵀ and for ∂L/∂x̂ = G·Ŵ: "auto" runs them through
# torch's oneDNN matmul (mkldnn._linear_pointwise) on x86-64 when it is there and passes
# a probe, "torch" always uses torch.mm (MKL). On the CI machine's AMD EPYC, MKL_VERBOSE
# reports no AVX-512 path and oneDNN ran these GEMMs ~1.4x faster (docs/margin_softmax.md).
# ∂L/∂ŵ = Gᵀ·X̂ stays torch.mm: oneDNN would first copy Gᵀ to contiguous memory, while
# torch.mm writes straight into the weight gradient.
CPU_GEMM = "auto"
_ONEDNN_OP = []  # [op or None], probed on first use


def _probe_onednn():
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        a = torch.arange(6.0).view(2, 3)
        w = torch.arange(12.0).view(4, 3)
        g = torch.arange(8.0).view(2, 4)
        # both forms used: a·wᵀ, and g·w through the transposed view wᵀ (small integers: exact)
        if torch.equal(op(a, w, None, "none", [], ""), a @ w.t()) and \
                torch.equal(op(g, w.t(), None, "none", [], ""), g @ w):
            return op
    except Exception:  # private op: absent, renamed or with another signature in this torch
        pass
    return None


def _onednn_linear(device):
    """oneDNN's a·bᵀ for dense float32 CPU tensors (returns a new tensor), or None for torch.mm."""
    if device.type != "cpu" or CPU_GEMM != "auto" or not torch.backends.mkldnn.enabled:
        return None
    if not _ONEDNN_OP:
        _ONEDNN_OP.append(_probe_onednn())
    return _ONEDNN_OP[0]


def _bf16_gemms(embeddings, weight):
    """Whether the fused routine runs its GEMMs on bfloat16 operands (see BF16_GEMMS)."""
    dev = embeddings.device
    if BF16_GEMMS == "never" or (BF16_GEMMS == "cuda" and dev.type != "cuda") or not _MM_OUT_DTYPE:
        return False
    if torch.bfloat16 in (embeddings.dtype, weight.dtype):
        return True
    return torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) == torch.bfloat16


def _mm_f32(a, b, out=None):
    """a·b with float32 accumulation and output. bfloat16 operands go to cuBLAS as such;
    on CPU their products are formed in float32 (exact for bfloat16 values)."""
    if a.dtype == torch.bfloat16:
        if a.is_cuda:
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        a, b = a.float(), b.float()
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def _centre_ids(classes, k):
    """Rows of ``weight`` holding the K sub-centres of each class, class-major."""
    if k == 1:
        return classes
    return (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)


@torch.no_grad()
def target_cosines(embeddings, labels, weight, subcenters=1):
    """cos θ of each embedding with its class centre (the max over the class's K
    sub-centres), float32 (B,), no gradient. CurricularFace's statistic and threshold."""
    x = F.normalize(embeddings.float(), dim=1)
    w = F.normalize(weight[_centre_ids(labels, subcenters)].float(), dim=1)
    return torch.bmm(w.view(len(labels), subcenters, -1), x.unsqueeze(2)).squeeze(2).amax(1)


def _fused(x, labels, weight, sampled, spec, *, row_margins=None, target_cos=None, row_weight=None, grad_x=None,
           grad_w=None, grad_w_compact=False, workspace_bytes=None, target_col=None, combine=None, bf16=False):
    """Per-row losses (float32, shape (B,)) of the margin softmax over ``sampled``,
    and the target cosines (B,).

    ``spec`` is a :class:`MarginSpec`; ``row_margins`` (B, 3) float32 per-row
    (m1, m2, m3). With ``row_weight`` (B,) float32 the gradients of
    Σ_i row_weight_i·loss_i are written into ``grad_x`` (B, D) and/or ``grad_w``:
    (C·K, D) rows of the sampled classes' centres (the rest untouched) or, with
    ``grad_w_compact``, (S·K, D) in sampled order. Any of the outputs may be None.
    Device-agnostic: CPU and CUDA differ only in the kernels behind ``ext``.

    Class-sharded use (simcore.margin.sharded): ``target_col`` (B,) int64 gives each
    row's column in ``sampled`` directly, −1 where the target class lives on
    another shard (``labels`` is then ignored); ``combine(run_max, run_sum,
    target_logit)`` turns this shard's pass-1 pieces into the global
    ``(lse, target_logit)`` (all-reduces) before the losses and pass 2;
    ``target_cos`` gives every row's target cosine (CurricularFace needs it first).

    ``bf16``: the normalised rows and the gradient blocks are rounded to bfloat16 for
    the GEMMs (float32 accumulation; the epilogues stay float32). See BF16_GEMMS.
    """
    ext = dispatch.extension()
    dev = x.device
    ex = _exec(dev)
    b, d = x.shape
    s = sampled.numel()
    k = spec.subcenters
    f32 = torch.float32
    budget = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    stream_cap = CUDA_STREAM_BLOCK_BYTES if dev.type == "cuda" else STREAM_BLOCK_BYTES
    block = s if b * s * k * 4 <= budget else max(256, min(budget, stream_cap) // (4 * b * k))
    block = min(block, s)
    nblocks = -(-s // block)
    params = spec.kernel_params()
    gd = torch.bfloat16 if bf16 else f32  # GEMM operand dtype
    linear = None if bf16 else _onednn_linear(dev)
    rm = tensor_arg(row_margins) if row_margins is not None else None
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        if target_col is None:
            tcol = torch.empty(b, dtype=torch.int64, device=dev)
            ext.ms_targets(tensor_arg(labels), tensor_arg(sampled), weight.shape[0] // k, tensor_arg(tcol), ex)
        else:
            tcol = target_col
        xh = torch.empty(b, d, dtype=gd, device=dev)
        xn = torch.empty(b, dtype=f32, device=dev)
        ext.ms_normalize_rows(tensor_arg(x), None, tensor_arg(xh), tensor_arg(xn), NORM_EPS, ex)
        run_max = torch.full((b,), -math.inf, dtype=f32, device=dev)
        run_sum = torch.zeros(b, dtype=f32, device=dev)
        if spec.curricular_t is not None:  # the kernels read every row's target cosine from the start
            if target_cos is None:  # from the normalised rows already here: one gather kernel, one product
                rows = _centre_ids(labels, k)  # named: a packed tensor_arg does not keep its tensor alive
                tw = torch.empty(b * k, d, dtype=gd, device=dev)  # rounded as the GEMMs' operands
                tn = torch.empty(b * k, dtype=f32, device=dev)
                ext.ms_normalize_rows(tensor_arg(weight), tensor_arg(rows), tensor_arg(tw), tensor_arg(tn), NORM_EPS,
                                      ex)
                target_cos = torch.bmm(tw.view(b, k, d).float(), xh.float().unsqueeze(2)).view(b, k).amax(1)
            tcos = target_cos.to(f32).contiguous()
        else:
            tcos = torch.full((b,), math.nan, dtype=f32, device=dev)
        tlogit = torch.full((b,), math.nan, dtype=f32, device=dev)  # stays NaN if a label is never found
        wbuf = torch.empty(block * k * d, dtype=gd, device=dev)
        wnorm = torch.empty(block * k, dtype=f32, device=dev)
        cbuf = torch.empty(b * block, dtype=f32, device=dev) if linear is None or k > 1 else None
        # sub-centres: the (B × n·K) centre cosines, reduced to (B × n) class cosines (no (B × S·K) matrix
        # beyond one block); the same buffer carries the expanded gradient in pass 2
        kbuf = torch.empty(b * block * k, dtype=f32, device=dev) if k > 1 and linear is None else None
        win = torch.empty(b * block, dtype=torch.uint8, device=dev) if k > 1 else None

        block_k = [None]  # the current block's (B × n·K) centre cosines (sub-centres)

        def gemm_into(a, bt, buf):
            """a·btᵀ: a new oneDNN tensor, or torch.mm into ``buf``."""
            if linear is not None:
                return linear(a, bt, None, "none", [], "")
            return _mm_f32(a, bt.t(), out=buf)

        def load_block(c0):
            n = min(block, s - c0)
            idx = _centre_ids(sampled[c0:c0 + n], k)
            wh, wn = wbuf[:n * k * d].view(n * k, d), wnorm[:n * k]
            ext.ms_normalize_rows(tensor_arg(weight), tensor_arg(idx), tensor_arg(wh), tensor_arg(wn), NORM_EPS, ex)
            if k == 1:  # oneDNN allocates the block (no out=); one block is alive at a time
                cos = gemm_into(xh, wh, None if cbuf is None else cbuf[:b * n].view(b, n))
            else:  # cos_k's memory carries the expanded gradient in pass 2
                cos_k = gemm_into(xh, wh, None if kbuf is None else kbuf[:b * n * k].view(b, n * k))
                cos = cbuf[:b * n].view(b, n)
                ext.ms_subcenter_max(tensor_arg(cos_k), k, tensor_arg(cos), tensor_arg(win[:b * n].view(b, n)), ex)
                block_k[0] = cos_k
            return idx, wh, wn, cos

        for c0 in range(0, s, block):  # pass 1: online log-sum-exp
            idx, wh, wn, cos = load_block(c0)
            ext.ms_lse_block(tensor_arg(cos), tensor_arg(tcol), c0, params, rm, tensor_arg(run_max),
                             tensor_arg(run_sum), tensor_arg(tcos), tensor_arg(tlogit), ex)
            if nblocks > 1:
                del idx, wh, wn, cos
                block_k[0] = None
        if combine is None:
            lse = run_max + torch.log(run_sum)
        else:
            lse, tlogit = combine(run_max, run_sum, tlogit)
        loss = lse - tlogit
        if row_weight is None or (grad_x is None and grad_w is None):
            return loss, tcos

        gxh = torch.empty(b, d, dtype=f32, device=dev) if grad_x is not None and linear is None else None
        # ∂L/∂ŵ goes straight into grad_w (then projected in place) when its rows are the
        # block's rows in order: compact output, or every class sampled (sampled == arange(C)).
        in_place = (grad_w is not None and grad_w.dtype == f32 and grad_w.is_contiguous()
                    and (grad_w_compact or s * k == weight.shape[0]))
        ubuf = torch.empty(block * k * d, dtype=f32, device=dev) if grad_w is not None and not in_place else None
        gbuf = torch.empty(b * block * k, dtype=gd, device=dev) if bf16 else None  # the block's G as an operand
        for c0 in range(0, s, block):  # pass 2: gradients (reuses pass 1's block when there is one)
            if nblocks > 1:
                idx, wh, wn, cos = load_block(c0)
            n = cos.shape[1]
            ext.ms_grad_block(tensor_arg(cos), tensor_arg(tcol), c0, params, rm, tensor_arg(lse),
                              tensor_arg(row_weight), tensor_arg(tcos), ex)
            g = cos
            if k > 1:  # each class's gradient goes to its winning centre
                g = block_k[0]
                ext.ms_subcenter_expand(tensor_arg(cos), tensor_arg(win[:b * n].view(b, n)), k, tensor_arg(g), ex)
            if bf16:
                g = gbuf[:g.numel()].view(g.shape).copy_(g)
            if grad_x is not None:  # ∂L/∂x̂ += G·Ŵ
                if linear is not None:
                    part = linear(g, wh.t(), None, "none", [], "")
                    gxh = part if c0 == 0 else gxh.add_(part)
                elif c0 == 0:
                    _mm_f32(g, wh, out=gxh)
                elif bf16:
                    gxh.add_(_mm_f32(g, wh))
                else:
                    gxh.addmm_(g, wh)
            if grad_w is not None:
                r0, nr = c0 * k, n * k
                u = grad_w[r0:r0 + nr] if in_place else ubuf[:nr * d].view(nr, d)
                _mm_f32(g.t(), xh, out=u)  # ∂L/∂ŵ = Gᵀ·X̂
                if grad_w_compact or in_place:
                    ext.ms_project_rows(tensor_arg(u), tensor_arg(wh), tensor_arg(wn),
                                        tensor_arg(grad_w[r0:r0 + nr]), None, NORM_EPS, ex)
                else:
                    ext.ms_project_rows(tensor_arg(u), tensor_arg(wh), tensor_arg(wn), tensor_arg(grad_w),
                                        tensor_arg(idx), NORM_EPS, ex)
            if nblocks > 1:
                del idx, wh, wn, cos
                block_k[0] = None
        if grad_x is not None:
            ext.ms_project_rows(tensor_arg(gxh), tensor_arg(xh), tensor_arg(xn), tensor_arg(grad_x), None,
                                NORM_EPS, ex)
        return loss, tcos


def margin_grad(loss_rows, target_cos, row_margins, scale, row_weight):
    """∂(Σ_i row_weight_i·loss_i)/∂(m1, m2, m3) per row, (B, 3) float32: the margins
    enter only the target logit s·ψ, whose softmax weight is exp(−loss_i)."""
    coef = row_weight.double() * scale * (torch.exp(-loss_rows.double()) - 1.0)
    m = row_margins.double()
    return (coef[:, None] * margin_param_grads(target_cos, m[:, 0], m[:, 1], m[:, 2])).float()


# --------------------------------------------------------------------------- custom ops (torch.compile, autograd)
def _row_weight(b, reduction, device):
    return torch.full((b,), 1.0 / b if reduction == 0 else 1.0, dtype=torch.float32, device=device)


def _weight_grad_buffer(weight, rows):
    """Dense (C, D) gradient of ``weight``: the kernels write ``rows`` rows, the rest are zero."""
    if rows == weight.shape[0]:  # every row is written (sampled ids are unique)
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.zeros_like(weight, memory_format=torch.contiguous_format)


def _scaled(grad, scale):
    """grad·scale; skips the full pass when the upstream gradient is exactly 1 (the usual
    ``loss.backward()``), checked eagerly only (traced graphs always multiply)."""
    if not torch.compiler.is_compiling() and scale.device.type == "cpu" and scale.numel() == 1 \
            and scale.item() == 1.0:
        return grad
    return grad * scale.to(grad.dtype)


def _reduce(loss_rows, reduction):
    if reduction == 0:
        return loss_rows.mean()
    if reduction == 1:
        return loss_rows.sum()
    return loss_rows


def _empty_margin_grad(x, row_margins):
    return x.new_empty(0, dtype=torch.float32) if row_margins is None else torch.empty_like(row_margins)


@torch.library.custom_op("simcore::margin_softmax_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, sampled: torch.Tensor,
            row_margins: Optional[torch.Tensor], spec: list[float], subcenters: int, reduction: int, need_gx: bool,
            need_gw: bool, need_gm: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, for reduction mean/sum, the gradients in the same pass (scaled in backward)."""
    grads = reduction != 2 and (need_gx or need_gw or need_gm)
    sp = MarginSpec.from_list(spec, subcenters)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if grads and need_gx else x.new_empty(0)
    gw = _weight_grad_buffer(weight, sampled.numel() * subcenters) if grads and need_gw else weight.new_empty(0)
    rw = _row_weight(x.shape[0], reduction, x.device) if grads else None
    loss_rows, tcos = _fused(x, labels, weight, sampled, sp, row_margins=row_margins, row_weight=rw,
                             grad_x=gx if grads and need_gx else None, grad_w=gw if grads and need_gw else None,
                             bf16=bf16)
    gm = margin_grad(loss_rows, tcos, row_margins, sp.scale, rw) if grads and need_gm else x.new_empty(0)
    return _reduce(loss_rows, reduction), gx, gw, gm


@_fwd_op.register_fake
def _(x, labels, weight, sampled, row_margins, spec, subcenters, reduction, need_gx, need_gw, need_gm, bf16):
    grads = reduction != 2 and (need_gx or need_gw or need_gm)
    loss = x.new_empty((x.shape[0],) if reduction == 2 else (), dtype=torch.float32)
    gx = x.new_empty(x.shape) if grads and need_gx else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if grads and need_gw else weight.new_empty(0)
    gm = torch.empty_like(row_margins) if grads and need_gm else x.new_empty(0)
    return loss, gx, gw, gm


@torch.library.custom_op("simcore::margin_softmax_bwd", mutates_args=())
def _bwd_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, sampled: torch.Tensor,
            row_margins: Optional[torch.Tensor], grad_rows: torch.Tensor, spec: list[float], subcenters: int,
            need_gx: bool, need_gw: bool, need_gm: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ_i grad_rows_i·loss_i (reduction='none'): the forward is recomputed."""
    sp = MarginSpec.from_list(spec, subcenters)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else x.new_empty(0)
    gw = _weight_grad_buffer(weight, sampled.numel() * subcenters) if need_gw else weight.new_empty(0)
    rw = grad_rows.float().contiguous()
    loss_rows, tcos = _fused(x, labels, weight, sampled, sp, row_margins=row_margins, row_weight=rw,
                             grad_x=gx if need_gx else None, grad_w=gw if need_gw else None, bf16=bf16)
    gm = margin_grad(loss_rows, tcos, row_margins, sp.scale, rw) if need_gm else x.new_empty(0)
    return gx, gw, gm


@_bwd_op.register_fake
def _(x, labels, weight, sampled, row_margins, grad_rows, spec, subcenters, need_gx, need_gw, need_gm, bf16):
    return (x.new_empty(x.shape) if need_gx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_gw else weight.new_empty(0),
            torch.empty_like(row_margins) if need_gm else x.new_empty(0))


_NO_GRADS = (None,) * 12


def _setup_context(ctx, inputs, output):
    x, labels, weight, sampled, row_margins, spec, subcenters, reduction, need_gx, need_gw, need_gm, bf16 = inputs
    _, gx, gw, gm = output
    ctx.set_materialize_grads(False)  # the gradient outputs get no upstream grads: no (C, D) zeros
    ctx.consumed = False
    ctx.spec, ctx.subcenters = spec, subcenters
    ctx.reduction, ctx.needs, ctx.bf16 = reduction, (need_gx, need_gw, need_gm), bf16
    if reduction == 2:
        ctx.save_for_backward(x, labels, weight, sampled, row_margins)
    else:
        ctx.save_for_backward(gx, gw, gm)


def _backward(ctx, grad_loss, _gx, _gw, _gm):
    need_gx, need_gw, need_gm = ctx.needs
    if grad_loss is None:
        return _NO_GRADS
    if ctx.reduction == 2:
        x, labels, weight, sampled, row_margins = ctx.saved_tensors
        gx, gw, gm = _bwd_op(x, labels, weight, sampled, row_margins, grad_loss, ctx.spec, ctx.subcenters,
                             need_gx, need_gw, need_gm, ctx.bf16)
    else:
        gx, gw, gm = ctx.saved_tensors
        if ctx.consumed and not torch.compiler.is_compiling():
            # The first backward may hand out the saved gradients themselves (upstream grad 1),
            # and autograd may then accumulate into them: they are not reusable.
            raise RuntimeError("simcore.margin_softmax_partial: a second backward through the same graph is not "
                               "supported for reduction='mean'/'sum' (use reduction='none' and reduce yourself)")
        ctx.consumed = True
        gx = _scaled(gx, grad_loss) if need_gx else None
        gw = _scaled(gw, grad_loss) if need_gw else None
        gm = _scaled(gm, grad_loss) if need_gm else None
    return (gx if need_gx else None, None, gw if need_gw else None, None, gm if need_gm else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("simcore::margin_softmax_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _row_margins(m1, m2, m3, batch, device, dtype=torch.float32):
    """(B, 3) per-row margins when any of m1, m2, m3 is a tensor (differentiable), else None.
    float32 for the kernels; float64 inputs keep float64 (the reference path)."""
    if not any(isinstance(m, torch.Tensor) for m in (m1, m2, m3)):
        return None
    cols = []
    for name, m in (("m1", m1), ("m2", m2), ("m3", m3)):
        if isinstance(m, torch.Tensor):
            if m.shape != (batch,) or not m.is_floating_point():
                raise ValueError(f"{name} must be a float or a floating (B,) = ({batch},) tensor, got "
                                 f"{m.dtype} of shape {tuple(m.shape)}")
            if m.device != device:
                raise ValueError(f"{name} is on {m.device} but embeddings on {device}")
            cols.append(m.to(dtype))
        else:
            cols.append(torch.full((batch,), float(m), dtype=dtype, device=device))
    rm = torch.stack(cols, dim=1)
    if not torch.compiler.is_compiling():  # the CPU kernel checks again; the CUDA kernel cannot
        d = rm.detach()
        if not bool(torch.isfinite(d).all()) or bool((d[:, 0] <= 0).any()) or bool((d[:, 1].abs() >= math.pi).any()):
            raise ValueError("per-row margins must be finite with m1 > 0 and |m2| < pi")
    return rm


def _margin_dtype(embeddings):
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def _loss_on_sampled(embeddings, labels, weight, sampled, spec, reduction, row_margins=None):
    """Dispatch: compiled kernels (float32/float16/bfloat16) or the reference (float64, or backend).
    ``row_margins`` (B, 3) per-row (m1, m2, m3) overrides the spec's scalars."""
    if (embeddings.dtype == torch.float64 or weight.dtype == torch.float64
            or not dispatch.use_compiled(embeddings.device)):
        m = (spec.m1, spec.m2, spec.m3) if row_margins is None else row_margins.to(embeddings.dtype).unbind(1)
        with torch.autocast(embeddings.device.type, enabled=False):
            return margin_softmax_loss(embeddings, labels, weight, sampled, m1=m[0], m2=m[1], m3=m[2],
                                       scale=spec.scale, reduction=reduction, cam=spec.cam_power or None,
                                       filter_threshold=spec.filter_threshold, curricular_t=spec.curricular_t,
                                       subcenters=spec.subcenters)
    grad = torch.is_grad_enabled()
    need_gm = grad and row_margins is not None and row_margins.requires_grad
    if row_margins is not None:
        row_margins = row_margins.float()
    loss, _, _, _ = _fwd_op(embeddings.contiguous(), labels.contiguous(), weight, sampled, row_margins,
                            spec.as_list(), spec.subcenters, _REDUCTIONS[reduction],
                            grad and embeddings.requires_grad, grad and weight.requires_grad, need_gm,
                            _bf16_gemms(embeddings, weight))
    return loss


def _check_family(subcenters, filter_threshold, weight=None):
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or not 1 <= subcenters <= 255:
        raise ValueError(f"subcenters must be an int in [1, 255], got {subcenters!r}")
    if weight is not None and weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters} "
                         "(sub-centre weights are (C·K, D), class-major)")
    if filter_threshold is not None and (isinstance(filter_threshold, bool)
                                         or not isinstance(filter_threshold, (int, float))
                                         or math.isnan(filter_threshold)):
        raise ValueError(f"filter_threshold must be a number or None, got {filter_threshold!r}")


def _partial(embeddings, labels, weight, prepare, *, subcenters=1, filter_threshold=None, sample_rate, num_samples,
             generator, reduction, return_sampled):
    """Shared body of the functional losses: checks, sampling, dispatch.

    ``prepare(embeddings)``, called once the inputs are checked, returns the variant's
    MarginSpec fields, its per-row (m1, m2, m3) (floats or (B,) tensors; None: the
    fields' scalars) and a per-row regulariser added to the loss (None: none).
    """
    _check_inputs(embeddings, labels, weight, sample_rate, num_samples, reduction, subcenters=subcenters)
    fields, margins, reg = prepare(embeddings)
    spec = MarginSpec(**fields, subcenters=subcenters,
                      filter_threshold=math.inf if filter_threshold is None else float(filter_threshold))
    num_classes = weight.shape[0] // subcenters
    if num_samples is None:
        num_samples = math.ceil(sample_rate * num_classes)
    if num_samples >= num_classes:
        sampled = torch.arange(num_classes, device=labels.device)
    else:
        sampled = sample_classes(labels, num_classes, num_samples, generator)
    rm = None if margins is None else _row_margins(*margins, embeddings.shape[0], embeddings.device,
                                                   _margin_dtype(embeddings))
    loss = _loss_on_sampled(embeddings, labels, weight, sampled, spec, reduction, rm)
    if reg is not None:
        loss = loss + _reduce(reg, _REDUCTIONS[reduction]).to(loss.dtype)
    return (loss, sampled) if return_sampled else loss


def margin_softmax_partial(embeddings, labels, weight, *, m1=1.0, m2=0.5, m3=0.0, scale=64.0,
                           sample_rate=0.1, num_samples=None, generator=None, reduction="mean",
                           return_sampled=False, subcenters=1, filter_threshold=None):
    """Combined-margin softmax cross-entropy over a sampled subset of classes (Partial FC).

    Logits are ``scale·cos θ_ij`` for the sampled classes j, and ``scale·ψ(θ)`` with
    ``ψ(θ) = cos(m1·θ + m2) − m3`` for the target (beyond θ* = (π − m2)/m1:
    ``cos θ − cos θ* − 1 − m3``). ``embeddings`` (B, D) and ``weight`` (C, D) are
    L2-normalised inside. ``labels`` (B,) int64 in [0, C).

    ``m1``, ``m2``, ``m3`` may be (B,) tensors: per-row margins (AdaFace, MagFace);
    gradients flow to them when they require grad. ``subcenters=K``: ``weight`` is
    (C·K, D), K centres per class (class-major) and a class's cosine is the max
    over its centres (sub-centre ArcFace). ``filter_threshold``: non-target
    cosines above it count as 0 and get no gradient (Partial FC's inter-class
    filtering, 0.4 in the paper).

    Sampling: every class in ``labels`` plus uniform negatives without replacement
    up to ``num_samples`` (default ``ceil(sample_rate·C)``); ``sample_rate=1.0`` is
    the full softmax. ``generator`` makes it deterministic. ``return_sampled=True``
    returns ``(loss, sampled)`` with the sorted int64 class ids used.

    Returns a float32 loss for float32/float16/bfloat16 inputs (float64 for float64),
    reduced by ``reduction`` ('mean', 'sum' or 'none'). Gradients flow to
    ``embeddings`` and ``weight`` (non-zero only on sampled rows). NaN or Inf in
    the inputs gives a NaN loss for the rows they reach (no error is raised).
    """
    _check_margins(m1, m2, m3, scale)
    _check_family(subcenters, filter_threshold)
    per_row = any(isinstance(m, torch.Tensor) for m in (m1, m2, m3))
    # per-row tensors travel as row margins; the scalars they replace are placeholders
    fields = dict(m1=1.0, m2=0.0, m3=0.0, scale=float(scale)) if per_row else \
        dict(m1=float(m1), m2=float(m2), m3=float(m3), scale=float(scale))
    return _partial(embeddings, labels, weight, lambda x: (fields, (m1, m2, m3) if per_row else None, None),
                    subcenters=subcenters, filter_threshold=filter_threshold, sample_rate=sample_rate,
                    num_samples=num_samples, generator=generator, reduction=reduction, return_sampled=return_sampled)


def arcface_partial(embeddings, labels, weight, *, margin=0.5, scale=64.0, sample_rate=0.1, num_samples=None,
                    generator=None, reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None):
    """ArcFace (additive angular margin, Deng et al. 2019): target logit s·cos(θ + margin).
    ``subcenters=K`` gives sub-centre ArcFace (Deng et al. 2020; weight (C·K, D)).
    See :func:`margin_softmax_partial`."""
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=margin, m3=0.0, scale=scale,
                                  sample_rate=sample_rate, num_samples=num_samples, generator=generator,
                                  reduction=reduction, return_sampled=return_sampled, subcenters=subcenters,
                                  filter_threshold=filter_threshold)


def cosface_partial(embeddings, labels, weight, *, margin=0.35, scale=64.0, sample_rate=0.1, num_samples=None,
                    generator=None, reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None):
    """CosFace / AM-Softmax (additive cosine margin, Wang et al. 2018): target logit s·(cos θ − margin).
    See :func:`margin_softmax_partial`."""
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=0.0, m3=margin, scale=scale,
                                  sample_rate=sample_rate, num_samples=num_samples, generator=generator,
                                  reduction=reduction, return_sampled=return_sampled, subcenters=subcenters,
                                  filter_threshold=filter_threshold)


# --------------------------------------------------------------------------- the head
class PartialMarginHead(nn.Module):
    """Class centres for a margin-softmax loss over sampled classes, with a truly
    sparse update: each step touches only the sampled rows of the centres and of
    their optimizer state (InsightFace's PartialFC V1 behaviour).

    The centres (``weight``, (C, D)) are a parameter with ``requires_grad=False``:
    standard optimizers and DDP ignore it. ``loss.backward()`` sends the embedding
    gradient to the backbone as usual and records the gradient of the sampled
    centre rows in the head; ``head.step()`` then applies the head's own row-wise
    optimizer ("sgd": momentum + L2 weight decay, PyTorch SGD semantics; "adamw":
    Adam with per-row step counts and decoupled weight decay, on sampled rows only)::

        head = PartialMarginHead(num_classes, 512, margin=0.5, scale=64.0, sample_rate=0.1, lr=0.1)
        opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
        for images, labels in loader:
            loss = head(backbone(images), labels)
            opt.zero_grad(); head.zero_grad()
            loss.backward()
            opt.step(); head.step()

    Change the head's learning rate with ``head.lr = ...`` (schedulers act on the
    backbone optimizer only). Gradients from several backward passes before
    ``step()`` accumulate (duplicate rows are summed).

    ``process_group`` (a ``torch.distributed`` group): the centres are sharded
    across its ranks and the constructor returns a
    :class:`simcore.ShardedPartialMarginHead` (docs/distributed.md).
    """

    def __new__(cls, *args, process_group=None, **kwargs):
        if process_group is not None and cls is PartialMarginHead:
            from simcore.margin.sharded import ShardedPartialMarginHead
            cls = ShardedPartialMarginHead
        return super().__new__(cls)

    def __init__(self, num_classes, embedding_dim, *, margin=0.5, scale=64.0, sample_rate=0.1, m1=1.0, m3=0.0,
                 optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                 device=None, dtype=None, process_group=None, loss=None, subcenters=1, filter_threshold=None):
        super().__init__()
        if process_group is not None:  # PartialMarginHead(...) itself dispatches in __new__
            raise ValueError(f"{type(self).__name__} does not shard: use PartialMarginHead(..., process_group=g) "
                             "or simcore.ShardedPartialMarginHead")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        _check_margins(m1, margin, m3, scale)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        _check_family(subcenters, filter_threshold)
        if loss is not None and not (isinstance(loss, nn.Module) and hasattr(loss, "kernel_args")):
            raise TypeError(f"loss must be one of simcore's margin-family modules (simcore.ArcFace, CamSoftmax, "
                            f"AdaFace, MagFace, CurricularFace), got {type(loss).__name__}")
        self.loss = loss  # a submodule: its statistics (EMAs) are saved with the head
        self.subcenters, self.filter_threshold = subcenters, filter_threshold
        self.m1, self.margin, self.m3, self.scale, self.sample_rate = m1, margin, m3, scale, sample_rate
        self.optimizer, self.lr, self.momentum, self.weight_decay = optimizer, lr, momentum, weight_decay
        self.betas, self.eps = betas, eps
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_dim, device=device, dtype=dtype),
                                   requires_grad=False)
        nn.init.normal_(self.weight, std=0.01)
        self._init_state(num_classes * subcenters)
        self._pending = []  # (centre row ids, gradient rows) recorded by backward

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // self.subcenters

    def _init_state(self, rows):
        like = dict(device=self.weight.device, dtype=torch.float32)
        d = self.weight.shape[1]
        if self.optimizer == "sgd":
            self.register_buffer("momentum_buffer", torch.zeros(rows, d, **like) if self.momentum else None)
        else:
            self.register_buffer("exp_avg", torch.zeros(rows, d, **like))
            self.register_buffer("exp_avg_sq", torch.zeros(rows, d, **like))
            self.register_buffer("row_step", torch.zeros(rows, dtype=torch.int64, device=self.weight.device))

    def forward(self, embeddings, labels, *, generator=None, sampled=None, return_sampled=False):
        """Loss (mean over the batch) over the positives plus sampled negatives.
        ``sampled``: use these sorted unique class ids (they must include every
        label) instead of drawing them."""
        w = self.weight
        _check_inputs(embeddings, labels, w, self.sample_rate, None, "mean", subcenters=self.subcenters)
        num_samples = math.ceil(self.sample_rate * self.num_classes)
        if sampled is not None:
            check_sampled(sampled, labels, self.num_classes)
        elif num_samples >= self.num_classes:
            sampled = torch.arange(self.num_classes, device=labels.device)
        else:
            sampled = sample_classes(labels, self.num_classes, num_samples, generator)
        train = torch.is_grad_enabled() and self.training
        centres = _centre_ids(sampled, self.subcenters)
        rows = w.index_select(0, centres)
        if train:
            rows.requires_grad_(True)
            rows.register_hook(lambda g: self._pending.append((centres, g.detach())))
        target = torch.searchsorted(sampled, labels)
        loss = self._margin_loss(embeddings, target, rows, torch.arange(sampled.numel(), device=sampled.device))
        return (loss, sampled) if return_sampled else loss

    def _margin_loss(self, embeddings, target, rows, sampled):
        """Mean loss of the head's variant on the gathered centre rows."""
        spec, margins, reg = self._spec(embeddings, lambda: target_cosines(embeddings, target, rows, self.subcenters))
        rm = None if margins is None else _row_margins(*margins, embeddings.shape[0], embeddings.device,
                                                       _margin_dtype(embeddings))
        loss = _loss_on_sampled(embeddings, target, rows, sampled, spec, "mean", rm)
        return loss if reg is None else loss + reg.mean().to(loss.dtype)

    def _spec(self, embeddings, target_cos):
        """(MarginSpec, per-row margins or None, per-row regulariser or None) of this batch."""
        family = dict(subcenters=self.subcenters,
                      filter_threshold=math.inf if self.filter_threshold is None else float(self.filter_threshold))
        if self.loss is None:
            return MarginSpec(self.m1, self.margin, self.m3, self.scale, **family), None, None
        fields, margins, reg = self.loss.kernel_args(embeddings, target_cos)
        return MarginSpec(**fields, **family), margins, reg

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the recorded centre gradients (and any parameter gradients)."""
        super().zero_grad(set_to_none)
        self._pending.clear()

    @torch.no_grad()
    def step(self):
        """Apply the recorded gradients to the sampled rows only; returns the updated row ids."""
        if not self._pending:
            return None
        idx = torch.cat([i for i, _ in self._pending])
        grad = torch.cat([g for _, g in self._pending]).float()
        self._pending.clear()
        if len(idx) and torch.unique(idx).numel() != idx.numel():
            idx, inverse = torch.unique(idx, return_inverse=True)
            grad = torch.zeros(idx.numel(), grad.shape[1], device=grad.device).index_add_(0, inverse, grad)
        w = self.weight.index_select(0, idx).float()
        lr, wd = self.lr, self.weight_decay
        if self.optimizer == "sgd":
            if wd:
                grad = grad.add(w, alpha=wd)
            if self.momentum:
                buf = self.momentum_buffer.index_select(0, idx).mul_(self.momentum).add_(grad)
                self.momentum_buffer.index_copy_(0, idx, buf)
                grad = buf
            w.add_(grad, alpha=-lr)
        else:
            b1, b2 = self.betas
            step = self.row_step.index_select(0, idx) + 1
            self.row_step.index_copy_(0, idx, step)
            m = self.exp_avg.index_select(0, idx).mul_(b1).add_(grad, alpha=1 - b1)
            v = self.exp_avg_sq.index_select(0, idx).mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self.exp_avg.index_copy_(0, idx, m)
            self.exp_avg_sq.index_copy_(0, idx, v)
            stepf = step.to(torch.float32).unsqueeze(1)
            bc1 = 1 - b1 ** stepf
            bc2 = 1 - b2 ** stepf
            if wd:
                w.mul_(1 - lr * wd)
            w.sub_(lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))
        self.weight.index_copy_(0, idx, w.to(self.weight.dtype))
        return idx

    @torch.no_grad()
    def grow(self, new_centres: torch.Tensor) -> torch.Tensor:
        """Append classes whose centres are ``new_centres`` (n, D) (drip training: e.g.
        :meth:`centres_from_embeddings` of the model's own embeddings). Their optimizer
        state starts at zero. Returns the new class ids."""
        if not isinstance(new_centres, torch.Tensor) or new_centres.dim() != 2 \
                or new_centres.shape[1] != self.weight.shape[1] or new_centres.shape[0] % self.subcenters:
            rows = "n" if self.subcenters == 1 else f"n·{self.subcenters}"  # K sub-centres per class, class-major
            raise ValueError(f"new_centres must be a ({rows}, {self.weight.shape[1]}) tensor")
        if not torch.isfinite(new_centres).all():
            raise ValueError("new_centres holds NaN or Inf")
        old = self.num_classes
        n = new_centres.shape[0]  # rows (n / K classes)
        self.weight = nn.Parameter(torch.cat([self.weight, new_centres.to(self.weight)]), requires_grad=False)
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "row_step"):
            buf = getattr(self, name, None)
            if buf is not None:
                setattr(self, name, torch.cat([buf, buf.new_zeros((n,) + buf.shape[1:])]))
        self._pending.clear()
        return torch.arange(old, old + n // self.subcenters, device=self.weight.device)

    @staticmethod
    @torch.no_grad()
    def centres_from_embeddings(embeddings: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean of the L2-normalised ``embeddings`` per group id (0..G−1), e.g. a clean
        image and its augmented copies: the centre rows for :meth:`grow`."""
        if groups.dtype != torch.int64 or groups.dim() != 1 or groups.shape[0] != embeddings.shape[0]:
            raise ValueError("groups must be int64 of shape (n,) matching embeddings")
        if groups.numel() and groups.min().item() < 0:
            raise ValueError(f"groups must be ids >= 0, got {groups.min().item()}")
        x = torch.nn.functional.normalize(embeddings.float(), dim=1)
        g = int(groups.max().item()) + 1 if groups.numel() else 0
        sums = torch.zeros(g, x.shape[1], device=x.device).index_add_(0, groups, x)
        counts = torch.bincount(groups, minlength=g).clamp_min(1).unsqueeze(1)
        return sums / counts

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_dim={self.weight.shape[1]}, m1={self.m1}, "
                f"margin={self.margin}, m3={self.m3}, scale={self.scale}, sample_rate={self.sample_rate}, "
                f"optimizer={self.optimizer!r}, lr={self.lr}, subcenters={self.subcenters}, "
                f"filter_threshold={self.filter_threshold}")
