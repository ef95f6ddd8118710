"""The fused block engine behind every margin-softmax loss (single-process and sharded).

:func:`fused_margin_softmax` computes per-row losses and, on request, the
gradients, without ever holding the (B × S) logits. CPU and CUDA run this same
Python code; only the epilogue kernels in ``simcore._C`` differ by device:

* ``ms_normalize_rows`` gathers the sampled centres of one class block (by index),
  L2-normalises them and writes them in the GEMM operand dtype (float32, or
  bfloat16 / float16 under ``lowp_gemms``); the embeddings likewise, once.
* torch's GEMM (oneDNN/MKL on CPU, cuBLAS on CUDA; :mod:`simcore.margin.gemm`)
  forms the block of cosines.
* pass 1, ``ms_lse_block``: the margin on the target column, and the block merged
  into an online log-sum-exp per row;
* pass 2, ``ms_grad_block``: the block, in place, becomes
  row_weight·s·(softmax − one-hot) with dψ/dcos θ on the target; two GEMMs give
  ∂L/∂x̂ and ∂L/∂ŵ, and ``ms_project_rows`` applies the normalisation Jacobian
  (u − (u·v̂)v̂)/‖v‖ and scatters the rows straight into the gradient of ``weight``.

:func:`plan_block` picks the block (a pure function of the problem's size, the
device type and the options): one block holding every sampled class is computed
once and reused (3 GEMMs); otherwise classes stream in blocks twice (4 GEMMs) and
extra memory stays O(B·block + block·D), never O(B·S).

Behaviour callers choose (GEMM operands, CPU GEMM library, block budgets) is an
:class:`EngineOptions`, set for a ``with`` block by :func:`engine_options` (a
context variable: per thread and per asyncio task). The losses read it when they
are called; the custom ops receive it as an argument (:mod:`simcore.margin.ops`),
so a backward that runs on autograd's own thread computes with the caller's options.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import sys
import threading
from typing import NamedTuple, Optional

import torch

from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.margin.gemm import CPU_GEMMS, LOWP_POLICIES, fp16_block_scale, mm_f32, onednn_linear
from simcore.reference.margin_softmax import SIN_EPS, margin_param_grads

__all__ = ["EngineOptions", "engine_options", "current_engine_options", "plan_block", "MarginSpec", "split_dynamic",
           "centre_ids", "target_cosines", "margin_grad", "fused_margin_softmax", "NORM_EPS", "MIN_BLOCK_CLASSES"]

NORM_EPS = 1e-12  # as F.normalize: rows are divided by max(‖row‖, NORM_EPS)
MIN_BLOCK_CLASSES = 256  # a streamed block never holds fewer classes (GEMM efficiency)
_F32 = torch.float32


# --------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; none of it changes the loss beyond float rounding.

    lowp_gemms: "auto" (default) half GEMM operands on CUDA (float32 accumulation and
        output): bfloat16 when the embeddings or the weight are bfloat16 or autocast to
        bfloat16 is on, else float16 when they are float16 or autocast to float16 is on
        (:func:`simcore.margin.gemm.gemm_operand_dtype`), and bfloat16 ones by the same rule
        on a CPU with fast bfloat16 GEMMs (``cpu_bf16``); "cuda" on CUDA only; "always" the
        same rule on every device (CPU forms the products in float32, exact for half values,
        so it reproduces the CUDA numerics: the tests use it); "never" float32 operands.
    cpu_bf16: whether the CPU counts as having fast bfloat16 GEMMs for ``lowp_gemms="auto"``:
        None (default) detects it once (:func:`simcore.margin.gemm.cpu_fast_bf16`: AVX512-BF16,
        which AMX CPUs have too); True / False override the detection.
    cpu_gemm: "auto" (default) oneDNN for the CPU's cosines and ∂L/∂x̂ on x86-64 where it
        passes a probe; "torch" torch.mm (MKL) for every GEMM.
    workspace_bytes: one block holds every sampled class when its (B × S·K) float32
        cosines fit this (32 MiB): pass 2 reuses pass 1's cosines (3 GEMMs, not 4).
    cpu_block_bytes: cap on one streamed CPU block (24 MiB): below glibc's largest mmap
        threshold (32 MiB), a block oneDNN allocates anew per class block (it has no out=)
        is reused from the heap instead of page-faulted in every time (3x the faults measured).
    cuda_block_bytes: cap on one streamed CUDA block (64 MiB): fewer launches and Python
        round trips per step than the CPU's, small beside the reference's (B × S) logits.
    block_classes: classes per block, overriding the byte budgets (None: planned from
        them); tests force the class-blocked two-pass path with small blocks.
    """
    lowp_gemms: str = "auto"
    cpu_gemm: str = "auto"
    workspace_bytes: int = 32 << 20
    cpu_block_bytes: int = 24 << 20
    cuda_block_bytes: int = 64 << 20
    block_classes: Optional[int] = None
    cpu_bf16: Optional[bool] = None

    def __post_init__(self):
        if self.lowp_gemms not in LOWP_POLICIES:
            raise ValueError(f"lowp_gemms must be one of {LOWP_POLICIES}, got {self.lowp_gemms!r}")
        if self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(f"cpu_gemm must be one of {CPU_GEMMS}, got {self.cpu_gemm!r}")
        for name in ("workspace_bytes", "cpu_block_bytes", "cuda_block_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.cpu_bf16 is not None and not isinstance(self.cpu_bf16, bool):
            raise ValueError(f"cpu_bf16 must be None, True or False, got {self.cpu_bf16!r}")
        b = self.block_classes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block_classes must be a positive int or None, got {b!r}")

    def to_op_arg(self) -> str:
        """The options as one string, for the custom ops' schema (it takes no dataclasses)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_op_arg(text: str) -> "EngineOptions":
        return EngineOptions(**json.loads(text))


_OPTIONS = contextvars.ContextVar("simcore_margin_engine_options", default=EngineOptions())


@torch.compiler.assume_constant_result  # torch.compile cannot trace ContextVar.get
def current_engine_options() -> EngineOptions:
    """The options in force here (the defaults outside any :func:`engine_options` block).
    Under ``torch.compile`` they are read once, when a function is traced, and stay in its graph."""
    return _OPTIONS.get()


@contextlib.contextmanager
def engine_options(**changes):
    """Run the ``with`` block with these :class:`EngineOptions` fields changed (the others
    as they are now); yields the options in force. Nests; per thread and asyncio task::

        with simcore.margin.engine.engine_options(lowp_gemms="always", block_classes=256):
            loss = simcore.arcface_partial(x, y, w)
    """
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def plan_block(batch: int, sampled: int, subcenters: int, device_type: str, options: EngineOptions) -> int:
    """Classes per block for ``batch`` rows against ``sampled`` classes of K = ``subcenters``
    centres on a ``device_type`` ("cpu", "cuda") device: every sampled class when the
    (B × S·K) float32 cosines fit ``options.workspace_bytes``, else as many as fit the
    device's streamed-block cap (at least :data:`MIN_BLOCK_CLASSES`); ``block_classes``
    overrides both. At least 1, at most ``sampled`` (when it is positive)."""
    if options.block_classes is not None:
        return max(1, min(options.block_classes, sampled))
    column_bytes = 4 * batch * subcenters  # one class's cosines
    if column_bytes * sampled <= options.workspace_bytes:
        return max(1, sampled)
    cap = options.cuda_block_bytes if device_type == "cuda" else options.cpu_block_bytes
    return max(1, min(sampled, max(MIN_BLOCK_CLASSES, cap // column_bytes)))


# --------------------------------------------------------------------------- what is computed
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


def split_dynamic(spec):
    """(spec with floats only, ``dyn`` or None): a :class:`MarginSpec` whose ``cam_power`` or
    ``curricular_t`` is a tensor (a module's state) keeps a placeholder that switches the variant
    on (cam_power 1, curricular_t 0), and ``dyn`` = float64 (cam_power, curricular_t), NaN where
    the spec's own float applies. The kernels read ``dyn`` where it lives (device memory on CUDA:
    no host read). A NaN in a tensor field becomes +inf in ``dyn`` (NaN there would mean "the
    placeholder applies"): out of range, so the CPU kernels raise and the CUDA kernels give NaN."""
    cam, t = spec.cam_power, spec.curricular_t
    cam_dyn, t_dyn = isinstance(cam, torch.Tensor), isinstance(t, torch.Tensor)
    if not (cam_dyn or t_dyn):
        return spec, None
    ref = cam if cam_dyn else t
    nan = torch.full((), math.nan, dtype=torch.float64, device=ref.device)

    def value(v):
        v = v.detach().to(torch.float64).reshape(())
        return torch.where(torch.isnan(v), math.inf, v)

    dyn = torch.stack([value(cam) if cam_dyn else nan, value(t) if t_dyn else nan])
    return spec._replace(cam_power=1.0 if cam_dyn else cam, curricular_t=0.0 if t_dyn else t), dyn


def centre_ids(classes, k):
    """Rows of ``weight`` holding the K sub-centres of each class, class-major."""
    if k == 1:
        return classes
    return (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)


@torch.no_grad()
def target_cosines(embeddings, labels, weight, subcenters=1):
    """cos θ of each embedding with its class centre (the max over the class's K
    sub-centres), float32 (B,), no gradient. CurricularFace's statistic and threshold."""
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    w = torch.nn.functional.normalize(weight[centre_ids(labels, subcenters)].float(), dim=1)
    return torch.bmm(w.view(len(labels), subcenters, -1), x.unsqueeze(2)).squeeze(2).amax(1)


def margin_grad(loss_rows, target_cos, row_margins, scale, row_weight):
    """∂(Σ_i row_weight_i·loss_i)/∂(m1, m2, m3) per row, (B, 3) float32: the margins
    enter only the target logit s·ψ, whose softmax weight is exp(−loss_i)."""
    coef = row_weight.double() * scale * (torch.exp(-loss_rows.double()) - 1.0)
    m = row_margins.double()
    return (coef[:, None] * margin_param_grads(target_cos, m[:, 0], m[:, 1], m[:, 2])).float()


# --------------------------------------------------------------------------- the engine
class _Block(NamedTuple):
    """One class block in the engine's buffers."""
    start: int  # its first column in ``sampled``
    rows: torch.Tensor  # its centres' row ids in ``weight`` (n·K)
    normed: torch.Tensor  # (n·K, D) normalised centres, GEMM operand dtype
    norms: torch.Tensor  # (n·K,) their norms
    cos: torch.Tensor  # (B, n) class cosines; pass 2 turns them into the gradient block
    centre_cos: Optional[torch.Tensor]  # sub-centres: (B, n·K) centre cosines (pass 2: the expanded gradient)


class _CpuScratch(threading.local):
    """Scratch memory of the CPU engine, kept between calls (per thread). glibc returns a block
    over its mmap threshold (32 MB at most) to the OS when it is freed, so a buffer made anew
    each call paid its page faults each call: at 1M classes, sample rate 0.1, D = 128 the
    normalised rows are 51 MB, and faulting them in cost ~38 ms a step, more than their gather.
    A buffer over ``KEEP_BYTES`` is not kept: memory held between steps is memory the rest of
    the step (the backbone's activations) cannot have."""

    KEEP_BYTES = 1 << 30

    def __init__(self):
        self.buffers = {}

    def take(self, numel, dtype):
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(dtype, None)  # the old one freed before the larger one is made
            buf = torch.empty(numel, dtype=dtype)
            if buf.element_size() * numel <= self.KEEP_BYTES:
                self.buffers[dtype] = buf
        return buf[:numel]


_cpu_scratch = _CpuScratch()


class _CpuGradients(threading.local):
    """Large CPU gradients handed to autograd (the head's compact row gradient: 51 MB at 1M
    classes, sample rate 0.1, D = 128) are made from the last one of the same shape once nothing
    else holds it, for the page faults above. Held means any reference: a Python name, autograd's
    ``.grad``, a view, a piece of an accumulation. One shape is kept (per thread)."""

    MIN_BYTES = 32 << 20

    def __init__(self):
        self.key, self.last = None, None

    def empty(self, shape, dtype):
        key, last = (tuple(shape), dtype), self.last
        self.last = None
        if key != self.key or last is None or not _held_only_here(last):
            last = torch.empty(shape, dtype=dtype)
        nbytes = last.numel() * last.element_size()
        if self.MIN_BYTES <= nbytes <= _CpuScratch.KEEP_BYTES:
            self.key, self.last = key, last
        return last


def _held_only_here(t):
    """Whether ``t`` is referenced by the caller's one name alone: no other Python reference, no
    other tensor on its TensorImpl (autograd's grad), no view of its storage."""
    # getrefcount: the caller's name, ``t`` and its own argument; storage: the TensorImpl and the temporary
    return (sys.getrefcount(t) == 3 and t._use_count() == 1
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2)


_cpu_gradients = _CpuGradients()


def gradient_buffer(shape, dtype, device):
    """An uninitialised tensor for a gradient that autograd receives: on the CPU recycled (see
    :class:`_CpuGradients`) when it is large; on CUDA a new one (torch's caching allocator)."""
    if device.type == "cpu":
        return _cpu_gradients.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _scratch(numel, dtype, device):
    """A flat buffer that lives until the next call on this thread (CPU), or a new one (CUDA:
    torch's caching allocator keeps its blocks already)."""
    if device.type == "cpu":
        return _cpu_scratch.take(numel, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


class _BlockEngine:
    """One call of the fused routine: the block plan, the normalised embeddings and the
    block buffers that pass 1 and pass 2 share. Call under no_grad with autocast off."""

    def __init__(self, x, weight, sampled, spec, row_margins, gemm_dtype, options, dyn=None):
        self.ext = dispatch.extension()
        self.device = dev = x.device
        self.executor = dispatch.executor(dev)
        self.batch, self.dim = x.shape
        self.weight, self.sampled, self.spec = weight, sampled, spec
        self.num_sampled, self.k = sampled.numel(), spec.subcenters
        self.block = plan_block(self.batch, self.num_sampled, self.k, "cuda" if dispatch.cuda_path(dev) else "cpu",
                                options)
        self.resident = self.block >= self.num_sampled  # one block: pass 2 reuses pass 1's cosines
        self.kept = None  # that block, between the passes
        self.gbuf = None  # half operands: the gradient block rounded for the two GEMMs (pass 2)
        self.ginv = None  # float16: 1/scale of the current gradient block (a 0-dim tensor), else None
        self.params = spec.kernel_params()
        self.operand_dtype = gemm_dtype
        self.lowp = gemm_dtype != _F32
        self.linear = None if self.lowp else onednn_linear(dev, options.cpu_gemm)
        self.row_margins = row_margins  # held: a packed tensor_arg does not keep its tensor alive
        self.row_margins_arg = None if row_margins is None else tensor_arg(row_margins)
        self.dyn = dyn  # held, as row_margins: the kernels read it (split_dynamic)
        self.dyn_arg = None if dyn is None else tensor_arg(dyn)
        self.xh = torch.empty(self.batch, self.dim, dtype=self.operand_dtype, device=dev)
        self.xn = torch.empty(self.batch, dtype=_F32, device=dev)
        self.ext.ms_normalize_rows(tensor_arg(x), None, tensor_arg(self.xh), tensor_arg(self.xn), NORM_EPS,
                                   self.executor)
        self._allocate_block_buffers()

    def _allocate_block_buffers(self):
        b, d, k, n, dev = self.batch, self.dim, self.k, self.block, self.device
        self.wbuf = _scratch(n * k * d, self.operand_dtype, dev)
        self.wnorm = torch.empty(n * k, dtype=_F32, device=dev)
        # oneDNN allocates each block's cosines itself (no out=); torch.mm writes them here
        self.cbuf = torch.empty(b * n, dtype=_F32, device=dev) if self.linear is None or k > 1 else None
        # sub-centres: the (B × n·K) centre cosines, reduced to (B × n) class cosines (no (B × S·K) matrix
        # beyond one block); the same memory carries the expanded gradient in pass 2
        self.kbuf = torch.empty(b * n * k, dtype=_F32, device=dev) if k > 1 and self.linear is None else None
        self.winners = torch.empty(b * n, dtype=torch.uint8, device=dev) if k > 1 else None

    def _cosines(self, normed, buf, cols):
        """X̂·Ŵᵀ (B × cols) float32: a new oneDNN tensor, or torch.mm into ``buf``."""
        if self.linear is not None:
            return self.linear(self.xh, normed, None, "none", [], "")
        return mm_f32(self.xh, normed.t(), out=buf[:self.batch * cols].view(self.batch, cols))

    def _winners(self, n):
        return self.winners[:self.batch * n].view(self.batch, n)

    def load_block(self, start):
        """Gather and normalise the centres of the block at column ``start`` and form its cosines
        (sub-centres: the max over each class's K centres, remembering the winner)."""
        n = min(self.block, self.num_sampled - start)
        k, d = self.k, self.dim
        rows = centre_ids(self.sampled[start:start + n], k)
        normed, norms = self.wbuf[:n * k * d].view(n * k, d), self.wnorm[:n * k]
        self.ext.ms_normalize_rows(tensor_arg(self.weight), tensor_arg(rows), tensor_arg(normed), tensor_arg(norms),
                                   NORM_EPS, self.executor)
        if k == 1:
            return _Block(start, rows, normed, norms, self._cosines(normed, self.cbuf, n), None)
        centre_cos = self._cosines(normed, self.kbuf, n * k)
        cos = self.cbuf[:self.batch * n].view(self.batch, n)
        self.ext.ms_subcenter_max(tensor_arg(centre_cos), k, tensor_arg(cos), tensor_arg(self._winners(n)),
                                  self.executor)
        return _Block(start, rows, normed, norms, cos, centre_cos)

    def target_columns(self, labels):
        """Each row's column in ``sampled`` (range-checked by the kernel)."""
        col = torch.empty(self.batch, dtype=torch.int64, device=self.device)
        self.ext.ms_targets(tensor_arg(labels), tensor_arg(self.sampled), self.weight.shape[0] // self.k,
                            tensor_arg(col), self.executor)
        return col

    def target_cosines(self, labels, given=None):
        """Each row's target cosine, which CurricularFace's kernels read from the first block on
        (``given``, or computed here); NaN rows when the variant does not need them."""
        b, d, k = self.batch, self.dim, self.k
        if self.spec.curricular_t is None:
            return torch.full((b,), math.nan, dtype=_F32, device=self.device)
        if given is None:  # from the normalised rows already here: one gather kernel, one product
            rows = centre_ids(labels, k)  # named: a packed tensor_arg does not keep its tensor alive
            tw = torch.empty(b * k, d, dtype=self.operand_dtype, device=self.device)  # rounded as GEMM operands
            tn = torch.empty(b * k, dtype=_F32, device=self.device)
            self.ext.ms_normalize_rows(tensor_arg(self.weight), tensor_arg(rows), tensor_arg(tw), tensor_arg(tn),
                                       NORM_EPS, self.executor)
            given = torch.bmm(tw.view(b, k, d).float(), self.xh.float().unsqueeze(2)).view(b, k).amax(1)
        return given.to(_F32).contiguous()

    def log_sum_exp(self, target_col, target_cos):
        """Pass 1: each row's running max and exp-sum over every class block (an online
        log-sum-exp), and its target logit (NaN if its class is in no block)."""
        b, dev = self.batch, self.device
        run_max = torch.full((b,), -math.inf, dtype=_F32, device=dev)
        run_sum = torch.zeros(b, dtype=_F32, device=dev)
        target_logit = torch.full((b,), math.nan, dtype=_F32, device=dev)
        for start in range(0, self.num_sampled, self.block):
            blk = self.load_block(start)
            self.ext.ms_lse_block(tensor_arg(blk.cos), tensor_arg(target_col), start, self.params,
                                  self.row_margins_arg, tensor_arg(run_max), tensor_arg(run_sum),
                                  tensor_arg(target_cos), tensor_arg(target_logit), self.executor, dyn=self.dyn_arg)
            if self.resident:
                self.kept = blk
            del blk  # streamed: one block alive at a time, so the next one reuses its memory
        return run_max, run_sum, target_logit

    def gradients(self, target_col, lse, row_weight, target_cos, grad_x, grad_w):
        """Pass 2: per block, G = row_weight·s·(softmax − one-hot) (dψ/dcos θ on the target)
        in place of the cosines, ∂L/∂x̂ += G·Ŵ, and ∂L/∂ŵ = Gᵀ·X̂ projected into ``grad_w``;
        then the normalisation Jacobian of x̂ into ``grad_x``."""
        # ∂L/∂ŵ goes straight into grad_w (then is projected in place) when its rows are the
        # blocks' rows in order: a compact (S·K, D) grad_w, or every class sampled.
        in_place = (grad_w is not None and grad_w.dtype == _F32 and grad_w.is_contiguous()
                    and self.num_sampled * self.k == grad_w.shape[0])
        scratch = None
        if grad_w is not None and not in_place:
            scratch = torch.empty(self.block * self.k * self.dim, dtype=_F32, device=self.device)
        if self.lowp:
            self.gbuf = torch.empty(self.batch * self.block * self.k, dtype=self.operand_dtype, device=self.device)
        gxh = None  # ∂L/∂x̂, float32
        for start in range(0, self.num_sampled, self.block):
            blk = self.kept if self.resident else self.load_block(start)
            g = self._gradient_block(blk, target_col, lse, row_weight, target_cos)
            if grad_x is not None:
                gxh = self._add_grad_x(gxh, g, blk.normed)
            if grad_w is not None:
                self._write_grad_w(grad_w, g, blk, scratch)
            del blk, g
        self.kept = None
        if grad_x is not None:
            self.ext.ms_project_rows(tensor_arg(gxh), tensor_arg(self.xh), tensor_arg(self.xn), tensor_arg(grad_x),
                                     None, NORM_EPS, self.executor)

    def _gradient_block(self, blk, target_col, lse, row_weight, target_cos):
        """The block's G, as the two gradient GEMMs' operand."""
        self.ext.ms_grad_block(tensor_arg(blk.cos), tensor_arg(target_col), blk.start, self.params,
                               self.row_margins_arg, tensor_arg(lse), tensor_arg(row_weight), tensor_arg(target_cos),
                               self.executor, dyn=self.dyn_arg)
        g = blk.cos
        if self.k > 1:  # each class's gradient goes to its winning centre
            g = blk.centre_cos
            self.ext.ms_subcenter_expand(tensor_arg(blk.cos), tensor_arg(self._winners(blk.cos.shape[1])), self.k,
                                         tensor_arg(g), self.executor)
        if self.operand_dtype == torch.float16:
            # G spans more than float16's range (1/B row weights times tiny softmax values; s·dψ/dcos θ
            # up to ~1e4): scaled by a power of two so that max|G| is in [2^14, 2^15), rounded once,
            # and each GEMM's float32 result is scaled back exactly (docs/margin_softmax.md)
            scale, self.ginv = fp16_block_scale(g)
            g = torch.mul(g, scale, out=self.gbuf[:g.numel()].view(g.shape))
        elif self.lowp:  # bfloat16 has float32's exponent range: rounded as it is
            g = self.gbuf[:g.numel()].view(g.shape).copy_(g)
        return g

    def _add_grad_x(self, gxh, g, normed):
        """gxh + G·Ŵ (gxh None: the first block's product)."""
        if self.linear is not None:
            part = self.linear(g, normed.t(), None, "none", [], "")
            return part if gxh is None else gxh.add_(part)
        if gxh is None:
            part = mm_f32(g, normed)
            return part if self.ginv is None else part.mul_(self.ginv)
        if self.ginv is not None:
            return gxh.addcmul_(mm_f32(g, normed), self.ginv)
        if self.lowp:
            return gxh.add_(mm_f32(g, normed))
        return gxh.addmm_(g, normed)

    def _grad_w_product(self, g, u):
        """u = Gᵀ·X̂ (float32), the float16 block's scale undone."""
        mm_f32(g.t(), self.xh, out=u)
        if self.ginv is not None:
            u.mul_(self.ginv)

    def _write_grad_w(self, grad_w, g, blk, scratch):
        """∂L/∂ŵ = Gᵀ·X̂ for the block's rows, projected and written into their rows of ``grad_w``
        (in place when ``scratch`` is None: the block's rows are ``grad_w``'s rows in order)."""
        nr = blk.normed.shape[0]
        if scratch is None:
            u = grad_w[blk.start * self.k:blk.start * self.k + nr]
            self._grad_w_product(g, u)
            self.ext.ms_project_rows(tensor_arg(u), tensor_arg(blk.normed), tensor_arg(blk.norms), tensor_arg(u),
                                     None, NORM_EPS, self.executor)
        else:
            u = scratch[:nr * self.dim].view(nr, self.dim)
            self._grad_w_product(g, u)
            self.ext.ms_project_rows(tensor_arg(u), tensor_arg(blk.normed), tensor_arg(blk.norms),
                                     tensor_arg(grad_w), tensor_arg(blk.rows), NORM_EPS, self.executor)


def fused_margin_softmax(x, labels, weight, sampled, spec, *, row_margins=None, row_weight=None, grad_x=None,
                         grad_w=None, gemm_dtype=None, options=None, target_col=None, target_cos=None,
                         combine=None, dyn=None):
    """Per-row losses (float32, shape (B,)) of the margin softmax over ``sampled``,
    and the target cosines (B,) (NaN unless the variant needs them).

    ``spec`` is a :class:`MarginSpec`; ``row_margins`` (B, 3) float32 per-row
    (m1, m2, m3). With ``row_weight`` (B,) float32 the gradients of
    Σ_i row_weight_i·loss_i are written into ``grad_x`` (B, D) and/or ``grad_w``:
    (C·K, D), the rows of the sampled classes' centres (the rest untouched), or compact
    (S·K, D) float32, the sampled centres' rows in ``sampled`` order. Either may be None.
    ``gemm_dtype``: the GEMM operand dtype (float32, bfloat16 or float16;
    :func:`simcore.margin.gemm.gemm_operand_dtype` picks it): the normalised rows and the
    gradient blocks are rounded to it for the GEMMs (float32 accumulation; the epilogues
    stay float32; a float16 gradient block is scaled by a power of two first); None: float32.
    ``options``: an :class:`EngineOptions` (default: :func:`current_engine_options`).

    Dynamic scalars: ``spec.cam_power`` / ``spec.curricular_t`` may be 0-d tensors (split here
    by :func:`split_dynamic`), or ``spec`` holds floats only and ``dyn`` is the float64
    (cam_power, curricular_t) tensor that :func:`split_dynamic` made, NaN where ``spec``'s
    float applies. The kernels read it on its device: no host read on CUDA. ``dyn`` is moved
    to ``x``'s device when it lives elsewhere.

    Class-sharded use (:mod:`simcore.margin.sharded`): ``target_col`` (B,) int64 gives
    each row's column in ``sampled`` directly, −1 where the target class lives on
    another shard (``labels`` is then ignored); ``combine(run_max, run_sum,
    target_logit)`` turns this shard's pass-1 pieces into the global
    ``(lse, target_logit)`` (all-reduces) before the losses and pass 2;
    ``target_cos`` gives every row's target cosine (CurricularFace needs it first).
    """
    options = current_engine_options() if options is None else options
    if gemm_dtype is None:
        gemm_dtype = _F32
    if gemm_dtype not in (_F32, torch.bfloat16, torch.float16):
        raise ValueError(f"gemm_dtype must be float32, bfloat16 or float16, got {gemm_dtype}")
    spec, spec_dyn = split_dynamic(spec)
    if spec_dyn is not None:
        if dyn is not None:
            raise ValueError("fused_margin_softmax: dyn given with tensor fields in spec (give one or the other)")
        dyn = spec_dyn
    if dyn is not None and dyn.device != x.device:
        dyn = dyn.to(x.device)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        engine = _BlockEngine(x, weight, sampled, spec, row_margins, gemm_dtype, options, dyn)
        tcol = engine.target_columns(labels) if target_col is None else target_col
        tcos = engine.target_cosines(labels, target_cos)
        run_max, run_sum, target_logit = engine.log_sum_exp(tcol, tcos)
        if combine is None:
            lse = run_max + torch.log(run_sum)
        else:
            lse, target_logit = combine(run_max, run_sum, target_logit)
        loss = lse - target_logit
        if row_weight is not None and (grad_x is not None or grad_w is not None):
            engine.gradients(tcol, lse, row_weight, tcos, grad_x, grad_w)
        return loss, tcos
