"""Reference margin-softmax cross-entropy over a given subset of classes.

Logits are s·cos θ_ij for non-targets and s·ψ(θ) for the target, with the
combined margin ψ(θ) = cos(m1·θ + m2) − m3 (shared/REFERENCE.md §1). Beyond
θ* = (π − m2)/m1, where that stops decreasing, ψ(θ) = cos θ − cos θ* − 1 − m3:
continuous at θ*, still decreasing, with the gradient of cos θ.
"""
import math

import torch
import torch.nn.functional as F

# dψ/dcos θ = m1·sin(m1·θ + m2) / sin θ is infinite at cos θ = ±1. It is
# evaluated at θ clamped to [SIN_EPS, π − SIN_EPS], which keeps it finite and
# exact for CosFace (m1 = 1, m2 = 0: the ratio is 1). In float32 this only
# changes cos θ = ±1 exactly.
SIN_EPS = 1e-4


def theta_star(m1: float, m2: float) -> float:
    return (math.pi - m2) / m1


class _MarginTarget(torch.autograd.Function):
    """ψ as a function of cos θ, with the clamped derivative above."""

    @staticmethod
    def forward(ctx, cos, m1, m2, m3):
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        t_star = theta_star(m1, m2)
        inside = theta <= t_star
        psi = torch.where(inside, torch.cos(m1 * theta + m2) - m3,
                          cos - math.cos(t_star) - 1.0 - m3)
        ctx.save_for_backward(theta, inside)
        ctx.m1, ctx.m2 = m1, m2
        return psi

    @staticmethod
    def backward(ctx, grad):
        theta, inside = ctx.saved_tensors
        t = theta.clamp(SIN_EPS, math.pi - SIN_EPS)
        slope = torch.where(inside, ctx.m1 * torch.sin(ctx.m1 * t + ctx.m2) / torch.sin(t),
                            torch.ones_like(t))
        return grad * slope, None, None, None


def margin_target(cos: torch.Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> torch.Tensor:
    """ψ(θ) for the target cosines ``cos``, differentiable."""
    return _MarginTarget.apply(cos, float(m1), float(m2), float(m3))


def margin_softmax_loss(embeddings, labels, weight, sampled, *, m1=1.0, m2=0.5, m3=0.0,
                        scale=64.0, reduction="mean"):
    """Cross-entropy of the margin logits over the classes ``sampled``.

    embeddings (B, D), labels (B,) class ids, weight (C, D) all class centres,
    sampled (S,) sorted class ids that include every label. Computes in the
    inputs' dtype promoted to at least float32 (float64 stays float64).
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    x = F.normalize(embeddings.to(dtype), dim=1)
    w = F.normalize(weight[sampled].to(dtype), dim=1)
    cos = x @ w.T                                        # (B, S)
    target_col = torch.searchsorted(sampled, labels)     # label -> column in the sampled set
    rows = torch.arange(len(labels), device=labels.device)
    psi = margin_target(cos[rows, target_col], m1, m2, m3)
    logits = scale * cos.index_put((rows, target_col), psi)
    return F.cross_entropy(logits, target_col, reduction=reduction)
