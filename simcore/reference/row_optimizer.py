"""Reference sparse row optimizers: PartialMarginHead's update of its sampled centre rows.

Rows ``rows`` (sorted, unique) of ``weight`` (C, D) and of the optimizer state are
updated in place with the gradient rows ``grad`` (n, D), exactly as PyTorch's SGD
(momentum, L2 weight decay) and AdamW (decoupled weight decay) would update those rows
of a dense parameter, except that AdamW counts steps per row (``row_step``): a row's
bias correction follows how often that row was sampled. ``grad_scale`` (a tensor, the
loss scale still in ``grad``) and ``found_inf`` (a tensor; > 0 keeps every tensor as it
was) are GradScaler's. Arithmetic in float32, or float64 when ``weight`` is float64.
"""
import torch

__all__ = ["row_sgd_", "row_adamw_"]


def _unscaled(grad, grad_scale, dtype):
    grad = grad.to(dtype)
    return grad if grad_scale is None else grad / grad_scale.to(grad.device, dtype).reshape(())


def _write(buffers_and_rows, rows, found_inf):
    """Scatter each buffer's new rows; with ``found_inf`` > 0 the old rows are written back."""
    skip = None if found_inf is None else found_inf.to(rows.device).reshape(()) > 0
    for buf, new in buffers_and_rows:
        new = new.to(buf.dtype)
        if skip is not None:
            new = torch.where(skip, buf.index_select(0, rows), new)
        buf.index_copy_(0, rows, new)


@torch.no_grad()
def row_sgd_(weight, rows, grad, momentum_buffer=None, grad_scale=None, found_inf=None, *, lr, momentum=0.0,
             weight_decay=0.0):
    """PyTorch SGD on rows ``rows``: g = grad (+ weight_decay·w); buf = momentum·buf + g
    (with a ``momentum_buffer``); w −= lr·buf (or lr·g)."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.index_select(0, rows).to(dtype)
    g = _unscaled(grad, grad_scale, dtype)
    if weight_decay:
        g = g.add(w, alpha=weight_decay)
    out = []
    if momentum_buffer is not None:
        g = momentum_buffer.index_select(0, rows).to(dtype).mul_(momentum).add_(g)
        out.append((momentum_buffer, g))
    w.add_(g, alpha=-lr)
    _write([(weight, w)] + out, rows, found_inf)


@torch.no_grad()
def row_adamw_(weight, rows, grad, exp_avg, exp_avg_sq, row_step, grad_scale=None, found_inf=None, *, lr,
               betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """AdamW with a step count per row: t = row_step + 1; m = β1·m + (1 − β1)·g;
    v = β2·v + (1 − β2)·g²; w ·= 1 − lr·weight_decay;
    w −= lr·(m/(1 − β1^t))/(sqrt(v/(1 − β2^t)) + eps)."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    b1, b2 = betas
    w = weight.index_select(0, rows).to(dtype)
    g = _unscaled(grad, grad_scale, dtype)
    step = row_step.index_select(0, rows) + 1
    m = exp_avg.index_select(0, rows).to(dtype).mul_(b1).add_(g, alpha=1 - b1)
    v = exp_avg_sq.index_select(0, rows).to(dtype).mul_(b2).addcmul_(g, g, value=1 - b2)
    t = step.to(torch.float64).unsqueeze(1)
    bc1, bc2 = (1 - b1 ** t).to(dtype), (1 - b2 ** t).to(dtype)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.sub_(lr * (m / bc1) / ((v / bc2).sqrt() + eps))
    _write([(weight, w), (exp_avg, m), (exp_avg_sq, v), (row_step, step)], rows, found_inf)
