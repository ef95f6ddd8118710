"""Reference margin-softmax cross-entropy over a given subset of classes.

Logits are s·cos θ_ij for non-targets and s·ψ(θ) for the target, with the
combined margin ψ(θ) = cos(m1·θ + m2) − m3 (shared/REFERENCE.md §1). Beyond
θ* = (π − m2)/m1, where that stops decreasing, ψ(θ) = cos θ − cos θ* − 1 − m3:
continuous at θ*, still decreasing, with the gradient of cos θ. With m2 < 0
(AdaFace) ψ is 1 − m3 below θ = −m2/m1, where m1·θ + m2 would be negative.

The rest of the family (docs/margin_softmax.md) changes one piece each:
Cam-Softmax replaces ψ by 2·((1 + cos θ)/2)^p − 1; inter-class filtering counts
non-target cosines above a threshold as 0; CurricularFace turns a non-target
cosine a above the row's ψ into a·(t + a); sub-centre ArcFace takes each class's
cosine as the max over its K centres (rows c·K .. c·K + K − 1 of ``weight``).
"""
import math

import torch
import torch.nn.functional as F

# dψ/dcos θ = m1·sin(m1·θ + m2) / sin θ is infinite at cos θ = ±1. It is
# evaluated at θ clamped to [SIN_EPS, π − SIN_EPS], which keeps it finite and
# exact for CosFace (m1 = 1, m2 = 0: the ratio is 1). In float32 this only
# changes cos θ = ±1 exactly. Cam-Softmax's slope p·u^(p−1), u = (1 + cos θ)/2,
# uses u >= SIN_EPS.
SIN_EPS = 1e-4


def theta_star(m1, m2):
    return (math.pi - m2) / m1


def _margin_pieces(cos, m1, m2, m3):
    """ψ, dψ/dcos θ and (∂ψ/∂m1, ∂ψ/∂m2, ∂ψ/∂m3) of the combined margin, elementwise."""
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    t_star = (math.pi - m2) / m1
    arg = m1 * theta + m2
    beyond = theta > t_star
    below = ~beyond & (arg < 0)
    inside = ~beyond & ~below
    one = torch.ones_like(theta)
    psi = torch.where(inside, torch.cos(arg) - m3, torch.where(beyond, cos - torch.cos(t_star * one) - 1.0 - m3,
                                                               1.0 - m3 * one))
    t = theta.clamp(SIN_EPS, math.pi - SIN_EPS)
    slope = torch.where(inside, m1 * torch.sin(m1 * t + m2) / torch.sin(t), torch.where(beyond, one, 0 * one))
    s_arg, s_star = torch.sin(arg), torch.sin(t_star * one)
    d_m1 = torch.where(inside, -s_arg * theta, torch.where(beyond, -s_star * t_star / m1, 0 * one))
    d_m2 = torch.where(inside, -s_arg, torch.where(beyond, -s_star / m1, 0 * one))
    d_m3 = -one
    return psi, slope, (d_m1, d_m2, d_m3)


def margin_param_grads(cos, m1, m2, m3):
    """(B, 3) float64 ∂ψ/∂(m1, m2, m3) at the target cosines ``cos`` (per-row margins broadcast)."""
    c = cos.detach().double()
    m = [torch.as_tensor(v, dtype=torch.float64, device=c.device).detach() if isinstance(v, torch.Tensor)
         else float(v) for v in (m1, m2, m3)]
    _, _, grads = _margin_pieces(c, *m)
    return torch.stack([g.expand_as(c) for g in grads], dim=1)


class _MarginTarget(torch.autograd.Function):
    """ψ as a function of cos θ (clamped slope above) and of the margins (tensors or floats)."""

    @staticmethod
    def forward(ctx, cos, m1, m2, m3):
        psi, slope, grads = _margin_pieces(cos, m1, m2, m3)
        ctx.save_for_backward(slope, *grads)
        ctx.tensor_margins = tuple(isinstance(m, torch.Tensor) for m in (m1, m2, m3))
        return psi

    @staticmethod
    def backward(ctx, grad):
        slope, *grads = ctx.saved_tensors
        out = [grad * slope]
        for is_tensor, g in zip(ctx.tensor_margins, grads):
            out.append(grad * g if is_tensor and ctx.needs_input_grad[len(out)] else None)
        return tuple(out)


def margin_target(cos: torch.Tensor, m1=1.0, m2=0.5, m3=0.0) -> torch.Tensor:
    """ψ(θ) for the target cosines ``cos``, differentiable (margins: floats or tensors like ``cos``)."""
    m = [v.to(cos.dtype) if isinstance(v, torch.Tensor) else float(v) for v in (m1, m2, m3)]
    return _MarginTarget.apply(cos, *m)


class _CamTarget(torch.autograd.Function):
    """Cam-Softmax's ψ_c(cos θ) = 2·((1 + cos θ)/2)^p − 1, slope p·u^(p−1) at u >= SIN_EPS."""

    @staticmethod
    def forward(ctx, cos, power):
        u = 0.5 * (1.0 + cos.clamp(-1.0, 1.0))
        ctx.save_for_backward(u)
        ctx.power = power
        return 2.0 * u.pow(power) - 1.0

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * ctx.power * u.clamp_min(SIN_EPS).pow(ctx.power - 1.0), None


def cam_power(c: float) -> float:
    """Cam-Softmax's exponent c′ = 1 / (1 − log2(1 + cos c)): ψ(cos c) = 0 (c = π/2 gives 1)."""
    return 1.0 / (1.0 - math.log2(1.0 + math.cos(c)))


def cam_target(cos: torch.Tensor, power: float) -> torch.Tensor:
    return _CamTarget.apply(cos, float(power))


def negative_logits(cos, scale, *, filter_threshold=math.inf, hard=None, curricular_t=0.0):
    """Logits of non-target cosines: above ``filter_threshold`` they count as 0;
    above the row's ``hard`` (B, 1) threshold (CurricularFace) a becomes a·(t + a)."""
    a = torch.where(cos > filter_threshold, torch.zeros_like(cos), cos)
    if hard is not None:
        a = torch.where(a > hard, a * (curricular_t + a), a)
    return scale * a


def margin_softmax_loss(embeddings, labels, weight, sampled, *, m1=1.0, m2=0.5, m3=0.0,
                        scale=64.0, reduction="mean", cam=None, filter_threshold=math.inf,
                        curricular_t=None, subcenters=1):
    """Cross-entropy of the margin logits over the classes ``sampled``.

    embeddings (B, D), labels (B,) class ids, weight (C·K, D) all class centres
    (K = ``subcenters`` per class, class-major), sampled (S,) sorted class ids that
    include every label. m1, m2, m3: floats or (B,) tensors (per-row margins; they
    receive gradients). ``cam``: Cam-Softmax exponent c′ (replaces the margins).
    ``curricular_t``: CurricularFace's t (None: off). Computes in the inputs'
    dtype promoted to at least float32 (float64 stays float64).
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    k = int(subcenters)
    x = F.normalize(embeddings.to(dtype), dim=1)
    centres = (sampled[:, None] * k + torch.arange(k, device=sampled.device)).reshape(-1)
    w = F.normalize(weight[centres].to(dtype), dim=1)
    cos = (x @ w.T).view(len(labels), len(sampled), k).max(dim=2).values   # (B, S): best sub-centre
    target_col = torch.searchsorted(sampled, labels.contiguous())   # label -> column in the sampled set
    rows = torch.arange(len(labels), device=labels.device)
    tc = cos[rows, target_col]
    psi = cam_target(tc, cam) if cam else margin_target(tc, m1, m2, m3)
    hard = psi.detach()[:, None] if curricular_t is not None else None
    logits = negative_logits(cos, scale, filter_threshold=filter_threshold, hard=hard,
                             curricular_t=0.0 if curricular_t is None else curricular_t)
    logits = logits.index_put((rows, target_col), scale * psi)
    return F.cross_entropy(logits, target_col, reduction=reduction)
