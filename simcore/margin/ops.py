"""The fused engine as torch.library custom ops with autograd, and the dispatch to them.

``simcore::margin_softmax_fwd`` returns the loss and, for reduction mean/sum, the
gradients computed in the same pass (backward only scales them);
``simcore::margin_softmax_bwd`` recomputes the forward for ``reduction="none"``
with the upstream per-row gradients as row weights. Both have fake
implementations, so ``torch.compile`` traces through them.

Scalars that change between steps (CurricularFace's t, a scheduled Cam-Softmax
exponent) travel as the ops' ``dyn`` tensor, not in the ``spec`` list of floats:
a float in ``spec`` is a constant of a traced graph (a new value recompiles it),
a tensor is an input. The kernels read ``dyn`` where it lives (device memory on CUDA): no
host read, so no synchronisation.

The engine's options (:class:`simcore.margin.engine.EngineOptions`) travel as the
ops' ``engine`` argument: read once when the loss is called, they also govern a
backward that autograd runs on another thread.

:func:`sampled_margin_loss` is the one entry the losses and the head call: the
compiled ops for float32/float16/bfloat16, the float64 reference otherwise.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from simcore import dispatch
from simcore.margin.checks import REDUCTIONS
from simcore.margin.engine import (EngineOptions, MarginSpec, current_engine_options, fused_margin_softmax,
                                   gradient_buffer, margin_grad, split_dynamic)
from simcore.margin.gemm import gemm_operand_dtype
from simcore.reference.margin_softmax import margin_softmax_loss

__all__ = ["REDUCTION_CODES", "reduce_rows", "scaled_by_upstream", "split_dynamic", "host_spec",
           "runs_compiled", "sampled_margin_loss"]

REDUCTION_CODES = {name: code for code, name in enumerate(REDUCTIONS)}  # mean 0, sum 1, none 2
_NONE = REDUCTION_CODES["none"]


def reduce_rows(loss_rows, code):
    """Per-row values reduced by a :data:`REDUCTION_CODES` code."""
    if code == REDUCTION_CODES["mean"]:
        return loss_rows.mean()
    if code == REDUCTION_CODES["sum"]:
        return loss_rows.sum()
    return loss_rows


def scaled_by_upstream(grad, upstream):
    """grad·upstream; skips the full pass when the upstream gradient is exactly 1 (the usual
    ``loss.backward()``), checked eagerly only: traced graphs (torch.compile, and AOTAutograd's
    fake/functional tensors, whose value is unknown) always multiply."""
    eager = type(upstream) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and not dispatch.cuda_path(upstream.device) and upstream.numel() == 1 and upstream.item() == 1.0:
        return grad
    return grad * upstream.to(grad.dtype)


def _row_weight(b, reduction, device):
    return torch.full((b,), 1.0 / b if reduction == REDUCTION_CODES["mean"] else 1.0, dtype=torch.float32,
                      device=device)


def _weight_grad_buffer(weight, rows):
    """Dense (C, D) gradient of ``weight``: the kernels write ``rows`` rows, the rest are zero."""
    if rows == weight.shape[0]:  # every row is written (sampled ids are unique)
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.zeros_like(weight, memory_format=torch.contiguous_format)


def host_spec(spec):
    """``spec`` with its tensor fields read as floats (one synchronisation each on an accelerator)."""
    return spec._replace(**{k: float(getattr(spec, k)) for k in ("cam_power", "curricular_t")
                            if isinstance(getattr(spec, k), torch.Tensor)})


_GEMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # ops' gemm_dtype
_GEMM_NAMES = {dtype: name for name, dtype in _GEMM_DTYPES.items()}


def _run_engine(x, labels, weight, sampled, row_margins, sp, dyn, row_weight, need, gemm_dtype, engine,
                compact_gw=False):
    """The per-row losses, and (gx, gw, gm) of Σ_i row_weight_i·loss_i (empty tensors where not needed).
    ``dyn``: :func:`split_dynamic`'s tensor (or None), read by the kernels on its device. ``compact_gw``:
    gw holds the sampled centres' rows only, (S·K, D) float32 in ``sampled`` order (a row sink's gradient)."""
    need_gx, need_gw, need_gm = need
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else x.new_empty(0)
    if not need_gw:
        gw = weight.new_empty(0)
    elif compact_gw:  # every row is written
        gw = gradient_buffer((sampled.numel() * sp.subcenters, weight.shape[1]), torch.float32, weight.device)
    else:
        gw = _weight_grad_buffer(weight, sampled.numel() * sp.subcenters)
    loss_rows, tcos = fused_margin_softmax(x, labels, weight, sampled, sp, row_margins=row_margins,
                                           row_weight=row_weight, grad_x=gx if need_gx else None,
                                           grad_w=gw if need_gw else None,
                                           gemm_dtype=_GEMM_DTYPES[gemm_dtype],
                                           options=EngineOptions.from_op_arg(engine), dyn=dyn)
    gm = margin_grad(loss_rows, tcos, row_margins, sp.scale, row_weight) if need_gm else x.new_empty(0)
    return loss_rows, gx, gw, gm


@torch.library.custom_op("simcore::margin_softmax_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, sampled: torch.Tensor,
            row_margins: Optional[torch.Tensor], spec: List[float], subcenters: int, reduction: int, need_gx: bool,
            need_gw: bool, need_gm: bool, gemm_dtype: str, engine: str, dyn: Optional[torch.Tensor] = None,
            row_sink: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and, for reduction mean/sum, the gradients in the same pass (scaled in backward).
    ``dyn``: see :func:`split_dynamic`. ``row_sink``: a (S·K, D) float32 tensor that receives the
    centre gradient instead of ``weight``, as the sampled centres' rows only (:func:`sampled_margin_loss`)."""
    grads = reduction != _NONE and (need_gx or need_gw or need_gm)
    need = (grads and need_gx, grads and need_gw, grads and need_gm)
    rw = _row_weight(x.shape[0], reduction, x.device) if grads else None
    loss_rows, gx, gw, gm = _run_engine(x, labels, weight, sampled, row_margins,
                                        MarginSpec.from_list(spec, subcenters), dyn, rw, need, gemm_dtype, engine,
                                        compact_gw=row_sink is not None)
    return reduce_rows(loss_rows, reduction), gx, gw, gm


@_fwd_op.register_fake
def _(x, labels, weight, sampled, row_margins, spec, subcenters, reduction, need_gx, need_gw, need_gm, gemm_dtype, engine,
      dyn=None, row_sink=None):
    grads = reduction != _NONE and (need_gx or need_gw or need_gm)
    loss = x.new_empty((x.shape[0],) if reduction == _NONE else (), dtype=torch.float32)
    gx = x.new_empty(x.shape) if grads and need_gx else x.new_empty(0)
    gw = _fake_gw(weight, row_sink) if grads and need_gw else weight.new_empty(0)
    gm = torch.empty_like(row_margins) if grads and need_gm else x.new_empty(0)
    return loss, gx, gw, gm


def _fake_gw(weight, row_sink):
    return weight.new_empty(weight.shape) if row_sink is None else row_sink.new_empty(row_sink.shape)


@torch.library.custom_op("simcore::margin_softmax_bwd", mutates_args=())
def _bwd_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, sampled: torch.Tensor,
            row_margins: Optional[torch.Tensor], grad_rows: torch.Tensor, spec: List[float], subcenters: int,
            need_gx: bool, need_gw: bool, need_gm: bool, gemm_dtype: str, engine: str,
            dyn: Optional[torch.Tensor] = None,
            row_sink: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ_i grad_rows_i·loss_i (reduction='none'): the forward is recomputed."""
    _, gx, gw, gm = _run_engine(x, labels, weight, sampled, row_margins, MarginSpec.from_list(spec, subcenters), dyn,
                                grad_rows.float().contiguous(), (need_gx, need_gw, need_gm), gemm_dtype, engine,
                                compact_gw=row_sink is not None)
    return gx, gw, gm


@_bwd_op.register_fake
def _(x, labels, weight, sampled, row_margins, grad_rows, spec, subcenters, need_gx, need_gw, need_gm, gemm_dtype, engine,
      dyn=None, row_sink=None):
    return (x.new_empty(x.shape) if need_gx else x.new_empty(0),
            _fake_gw(weight, row_sink) if need_gw else weight.new_empty(0),
            torch.empty_like(row_margins) if need_gm else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, labels, weight, sampled, row_margins, spec, subcenters, reduction, need_gx, need_gw, need_gm, gemm_dtype, \
        engine = inputs[:13]
    dyn = inputs[13] if len(inputs) > 13 else None
    row_sink = inputs[14] if len(inputs) > 14 else None
    _, gx, gw, gm = output
    ctx.set_materialize_grads(False)  # the gradient outputs get no upstream grads: no (C, D) zeros
    ctx.consumed = False
    ctx.spec, ctx.subcenters, ctx.engine = spec, subcenters, engine
    ctx.reduction, ctx.needs, ctx.gemm_dtype = reduction, (need_gx, need_gw, need_gm), gemm_dtype
    ctx.to_sink = row_sink is not None
    if reduction == _NONE:
        ctx.save_for_backward(x, labels, weight, sampled, row_margins, dyn, row_sink)
    else:
        ctx.save_for_backward(gx, gw, gm)


def _backward(ctx, grad_loss, _gx, _gw, _gm):
    need_gx, need_gw, need_gm = ctx.needs
    if grad_loss is None:
        return (None,) * 15
    if ctx.reduction == _NONE:
        x, labels, weight, sampled, row_margins, dyn, row_sink = ctx.saved_tensors
        gx, gw, gm = _bwd_op(x, labels, weight, sampled, row_margins, grad_loss, ctx.spec, ctx.subcenters,
                             need_gx, need_gw, need_gm, ctx.gemm_dtype, ctx.engine, dyn, row_sink)
    else:
        gx, gw, gm = ctx.saved_tensors
        if ctx.consumed and not torch.compiler.is_compiling():
            # The first backward may hand out the saved gradients themselves (upstream grad 1),
            # and autograd may then accumulate into them: they are not reusable.
            raise RuntimeError("simcore.margin_softmax_partial: a second backward through the same graph is not "
                               "supported for reduction='mean'/'sum' (use reduction='none' and reduce yourself)")
        ctx.consumed = True
        gx = scaled_by_upstream(gx, grad_loss) if need_gx else None
        gw = scaled_by_upstream(gw, grad_loss) if need_gw else None
        gm = scaled_by_upstream(gm, grad_loss) if need_gm else None
    gw = gw if need_gw else None
    weight_grad, sink_grad = (None, gw) if ctx.to_sink else (gw, None)
    return (gx if need_gx else None, None, weight_grad, None, gm if need_gm else None) + (None,) * 9 + (sink_grad,)


torch.library.register_autograd("simcore::margin_softmax_fwd", _backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # torch.compile cannot trace json: the string is a graph constant
def _engine_op_arg() -> str:
    return current_engine_options().to_op_arg()


def _gemm_op_arg(embeddings, weight) -> str:
    """The GEMM operand dtype (:func:`gemm_operand_dtype`) as the ops' ``gemm_dtype`` string."""
    opts = current_engine_options()
    return _GEMM_NAMES[gemm_operand_dtype(embeddings, weight, opts.lowp_gemms, opts.cpu_bf16)]


def runs_compiled(embeddings, weight) -> bool:
    """Whether :func:`sampled_margin_loss` runs the compiled ops here (else the float64 reference)."""
    return (embeddings.dtype != torch.float64 and weight.dtype != torch.float64
            and dispatch.use_compiled(embeddings.device))


def sampled_margin_loss(embeddings, labels, weight, sampled, spec, reduction, row_margins=None, row_sink=None):
    """The loss over the classes ``sampled``: compiled ops (float32/float16/bfloat16) or the
    float64 reference (float64 inputs, or the reference backend). ``row_margins`` (B, 3)
    per-row (m1, m2, m3) overrides the spec's scalars; the spec's ``cam_power`` and
    ``curricular_t`` may be 0-d tensors (:func:`split_dynamic`). ``row_sink`` (compiled ops
    only, :func:`runs_compiled`): a (S·K, D) float32 leaf that receives the gradient of the
    sampled centres' rows (in ``sampled`` order) instead of ``weight``, so no (S·K, D) copy of
    the rows is gathered (PartialMarginHead). Arguments are checked by the caller."""
    if not runs_compiled(embeddings, weight):
        if row_sink is not None:
            raise ValueError("row_sink needs the compiled ops (float32/float16/bfloat16 on a compiled backend)")
        spec = host_spec(spec)
        m = (spec.m1, spec.m2, spec.m3) if row_margins is None else row_margins.to(embeddings.dtype).unbind(1)
        with torch.autocast(embeddings.device.type, enabled=False):
            return margin_softmax_loss(embeddings, labels, weight, sampled, m1=m[0], m2=m[1], m3=m[2],
                                       scale=spec.scale, reduction=reduction, cam=spec.cam_power or None,
                                       filter_threshold=spec.filter_threshold, curricular_t=spec.curricular_t,
                                       subcenters=spec.subcenters)
    grad = torch.is_grad_enabled()
    need_gm = grad and row_margins is not None and row_margins.requires_grad
    need_gw = grad and (weight.requires_grad if row_sink is None else row_sink.requires_grad)
    if row_margins is not None:
        row_margins = row_margins.float()
    spec, dyn = split_dynamic(spec)
    if dyn is not None and dyn.device != embeddings.device:  # a module's state elsewhere: 16 bytes copied
        dyn = dyn.to(embeddings.device)
    loss, _, _, _ = _fwd_op(embeddings.contiguous(), labels.contiguous(), weight, sampled, row_margins,
                            spec.as_list(), spec.subcenters, REDUCTION_CODES[reduction],
                            grad and embeddings.requires_grad, need_gw, need_gm,
                            _gemm_op_arg(embeddings, weight), _engine_op_arg(), dyn, row_sink)
    return loss
