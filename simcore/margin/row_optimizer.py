"""The head's sparse row optimizers as torch.library custom ops.

``simcore::row_sgd_`` and ``simcore::row_adamw_`` update rows ``rows`` of the centres
and of their optimizer state in place, in one pass (``ro_sgd`` / ``ro_adamw`` in
``simcore._C``, csrc/cpu/row_optimizer.h), instead of the ~15 torch passes over
(n, D) temporaries that the same update takes as gather, arithmetic and scatter.
They declare what they mutate, so ``torch.compile`` traces a head step through them.
float64 centres, and the reference backend, run :mod:`simcore.reference.row_optimizer`.

``rows`` must be sorted and unique, as the head's recorded row ids are: the CPU kernel
checks it (ValueError), on CUDA a device assert does (no synchronisation) and the
kernel skips an id that is out of range or repeats the one before it.
"""
from __future__ import annotations

from typing import Optional

import torch

from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.reference import row_optimizer as reference

__all__ = ["row_sgd_", "row_adamw_", "row_table", "stacked_rows"]

_HUGE_PAGE = 2 << 20


def row_table(shape, *, dtype=None, device=None) -> torch.Tensor:
    """An uninitialised table of rows for the head's weight or optimizer state. A CPU table of
    several MiB is put on 2 MiB pages before it is first written (``advise_huge_pages``,
    csrc/cpu/huge_pages.h): a step touches ~sample_rate of its rows in random order, and on 4 KiB
    pages nearly each of those rows costs a TLB miss."""
    table = torch.empty(shape, dtype=dtype, device=device)
    big = table.numel() * table.element_size() >= 4 * _HUGE_PAGE
    if big and table.device.type == "cpu" and not dispatch.cuda_path(table.device) \
            and dispatch.use_compiled(table.device):
        dispatch.extension().advise_huge_pages(tensor_arg(table))
    return table


def stacked_rows(parts) -> torch.Tensor:
    """``torch.cat(parts)`` (along rows) into a :func:`row_table`."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    return torch.cat(parts, out=row_table((rows,) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device))


def _packed(t):
    return None if t is None else tensor_arg(t)


def _control(t, device):
    """GradScaler's grad_scale / found_inf as one float32 value on ``device`` (None stays None)."""
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(1)


def _compiled(weight, rows):
    if weight.dtype == torch.float64 or not dispatch.use_compiled(weight.device):
        return False
    if dispatch.cuda_path(rows.device) and rows.numel() > 1:  # the CPU kernel checks on the host
        torch._assert_async((rows[1:] > rows[:-1]).all(), "simcore: row ids must be strictly increasing")
    return True


@torch.library.custom_op("simcore::row_sgd_", mutates_args=("weight", "momentum_buffer"))
def _row_sgd_op(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
                grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], lr: float, momentum: float,
                weight_decay: float) -> None:
    if not _compiled(weight, rows):
        reference.row_sgd_(weight, rows, grad, momentum_buffer, grad_scale, found_inf, lr=lr, momentum=momentum,
                           weight_decay=weight_decay)
        return
    dev = weight.device
    grad_scale, found_inf = _control(grad_scale, dev), _control(found_inf, dev)
    grad = grad.to(torch.float32)
    dispatch.extension().ro_sgd(tensor_arg(weight), tensor_arg(rows), tensor_arg(grad), _packed(momentum_buffer),
                                _packed(grad_scale), _packed(found_inf), lr, momentum, weight_decay,
                                dispatch.executor(dev))


@_row_sgd_op.register_fake
def _(weight, rows, grad, momentum_buffer, grad_scale, found_inf, lr, momentum, weight_decay):
    return None


@torch.library.custom_op("simcore::row_adamw_", mutates_args=("weight", "exp_avg", "exp_avg_sq", "row_step"))
def _row_adamw_op(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, row_step: torch.Tensor, grad_scale: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    if not _compiled(weight, rows):
        reference.row_adamw_(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale, found_inf, lr=lr,
                             betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        return
    dev = weight.device
    grad_scale, found_inf = _control(grad_scale, dev), _control(found_inf, dev)
    grad = grad.to(torch.float32)
    dispatch.extension().ro_adamw(tensor_arg(weight), tensor_arg(rows), tensor_arg(grad), tensor_arg(exp_avg),
                                  tensor_arg(exp_avg_sq), tensor_arg(row_step), _packed(grad_scale),
                                  _packed(found_inf), lr, beta1, beta2, eps, weight_decay, dispatch.executor(dev))


@_row_adamw_op.register_fake
def _(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay):
    return None


def row_sgd_(weight, rows, grad, momentum_buffer=None, grad_scale=None, found_inf=None, *, lr, momentum=0.0,
             weight_decay=0.0):
    """In place: PyTorch SGD (momentum when ``momentum_buffer`` is given, L2 ``weight_decay``)
    on rows ``rows`` (sorted, unique) of ``weight`` (C, D) and ``momentum_buffer`` (C, D)
    float32, with the gradient rows ``grad`` (n, D) divided by ``grad_scale``; nothing
    changes when ``found_inf`` > 0 (GradScaler's tensors, read on the device)."""
    _row_sgd_op(weight, rows, grad, momentum_buffer, grad_scale, found_inf, float(lr), float(momentum),
                float(weight_decay))


def row_adamw_(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale=None, found_inf=None, *, lr,
               betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """In place: AdamW with per-row step counts ``row_step`` (C,) int64 on rows ``rows``
    (sorted, unique) of ``weight``, ``exp_avg`` and ``exp_avg_sq`` (C, D) float32; ``grad``,
    ``grad_scale`` and ``found_inf`` as :func:`row_sgd_`."""
    _row_adamw_op(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale, found_inf, float(lr),
                  float(betas[0]), float(betas[1]), float(eps), float(weight_decay))
