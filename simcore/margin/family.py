"""The margin family on the one fused engine (:mod:`simcore.margin.engine`).

Each variant is a target transform, a per-row margin or a transform of the
non-target cosines inside the same blocks (docs/margin_softmax.md, "The margin
family"):

* :func:`cam_softmax_partial` — Cam-Softmax (Suveges & McKenna, ICPR 2020), with
  :class:`CamSchedule` to anneal c;
* :func:`adaface_partial` — AdaFace (Kim et al., CVPR 2022): margins from the
  feature norm against EMA batch statistics;
* :func:`magface_partial` — MagFace (Meng et al., CVPR 2021): margin growing with
  the feature norm, plus its norm regulariser;
* :func:`curricularface_partial` — CurricularFace (Huang et al., CVPR 2020);
* sub-centre ArcFace (Deng et al., ECCV 2020): ``subcenters=K`` on every loss,
  and :func:`subcenter_dominant` for the dominant-centre / outlier step;
* inter-class filtering (Partial FC, CVPR 2022): ``filter_threshold`` on every loss.

The modules (:class:`ArcFace`, :class:`CamSoftmax`, :class:`AdaFace`,
:class:`MagFace`, :class:`CurricularFace`) keep the state the papers keep (EMA
statistics, schedules) and plug into :class:`simcore.PartialMarginHead`
(``loss=...``); called directly they take ``(embeddings, labels, weight)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from simcore.margin.checks import check_family, check_margins
from simcore.margin.engine import target_cosines
from simcore.margin.functional import partial_loss
from simcore.reference.margin_softmax import cam_power

__all__ = ["cam_softmax_partial", "adaface_partial", "magface_partial", "curricularface_partial", "adaface_margins",
           "magface_margin", "subcenter_dominant", "CamSchedule", "ArcFace", "CamSoftmax",
           "AdaFace", "MagFace", "CurricularFace"]


def _number(name, v, lo=-math.inf, hi=math.inf, lo_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")


def _options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction, return_sampled,
             validate="first"):
    """The keyword arguments every family loss passes on to :func:`simcore.margin.functional.partial_loss`
    (``validate``: :func:`simcore.margin.checks.value_check`)."""
    check_family(subcenters, filter_threshold)
    return dict(subcenters=subcenters, filter_threshold=filter_threshold, sample_rate=sample_rate,
                num_samples=num_samples, generator=generator, reduction=reduction, return_sampled=return_sampled,
                validate=validate)


# --------------------------------------------------------------------------- Cam-Softmax
def cam_softmax_partial(embeddings, labels, weight, *, c=math.pi / 2, scale=20.0, sample_rate=0.1, num_samples=None,
                        generator=None, reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None,
                        validate="first"):
    """Cam-Softmax: the target logit is s·ψ_c(cos θ), ψ_c(x) = (1 + x)^c′ / 2^(c′−1) − 1
    with c′ = 1 / (1 − log2(1 + cos c)); ψ_c(±1) = ±1 and ψ_c(cos c) = 0, so c is the
    angle where the target's logit crosses zero. ``c = π/2`` is the plain normalised
    softmax; smaller c is a harder target. Anneal it with :class:`CamSchedule`.
    Sampling, ``subcenters`` and ``filter_threshold`` as :func:`simcore.margin_softmax_partial`."""
    _number("c", c, 0.0, math.pi, lo_open=True)
    if c >= math.pi:
        raise ValueError(f"c must lie in (0, pi), got {c}")
    check_margins(1.0, 0.0, 0.0, scale)
    fields = dict(scale=float(scale), cam_power=cam_power(c))
    return partial_loss(embeddings, labels, weight, lambda x: (fields, None, None),
                    **_options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction,
                               return_sampled, validate))


class CamSchedule:
    """Cam-Softmax's c annealed linearly per step: c_k = max(end, start − rate·k).

    The defaults are the public implementation's: from π/2 (plain softmax) to π/4,
    1e-4 per step (7,854 steps). The paper's automatic rule is not implemented."""

    def __init__(self, start=math.pi / 2, end=math.pi / 4, rate=1e-4):
        _number("start", start, 0.0, math.pi, lo_open=True)
        _number("end", end, 0.0, math.pi, lo_open=True)
        _number("rate", rate, 0.0)
        if end > start:
            raise ValueError(f"end ({end}) must not exceed start ({start}): c anneals downwards")
        self.start, self.end, self.rate = float(start), float(end), float(rate)

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return max(self.end, self.start - self.rate * step)

    def power_at(self, step: torch.Tensor) -> torch.Tensor:
        """Cam-Softmax's exponent c′ at c_k for a 0-d integer tensor ``step`` (float64, on its
        device: no host read), as ``cam_power(self(k))``."""
        c = (self.start - self.rate * step.to(torch.float64)).clamp(min=self.end)
        return 1.0 / (1.0 - torch.log2(1.0 + torch.cos(c)))

    def __repr__(self):
        return f"CamSchedule(start={self.start}, end={self.end}, rate={self.rate})"


# --------------------------------------------------------------------------- AdaFace
def adaface_margins(norms, *, margin=0.4, h=0.333, norm_mean=20.0, norm_std=100.0, eps=1e-3):
    """AdaFace's per-row (m1, m2, m3) = (1, −m·ẑ, m + m·ẑ), ẑ = clip(h·(‖x‖ − µ)/(σ + eps), −1, 1):
    high-norm (good quality) rows get an angular margin, low-norm rows an additive one."""
    z = ((norms.detach() - norm_mean) / (norm_std + eps) * h).clamp(-1.0, 1.0)
    return torch.ones_like(z), -margin * z, margin * z + margin


def _feature_norms(embeddings, lo=1e-3, hi=100.0):
    x = embeddings.detach()
    return x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=1).clamp(lo, hi)  # AdaFace's safe norms


def adaface_partial(embeddings, labels, weight, *, margin=0.4, h=0.333, scale=64.0, norm_mean=20.0, norm_std=100.0,
                    sample_rate=0.1, num_samples=None, generator=None, reduction="mean", return_sampled=False,
                    subcenters=1, filter_threshold=None, validate="first"):
    """AdaFace with the given feature-norm statistics (µ, σ); :class:`AdaFace` keeps
    them as an EMA of batch statistics. The norms are taken without gradient, as the
    paper. Target logit s·(cos(θ − m·ẑ) − m − m·ẑ); where θ − m·ẑ < 0 the cosine is 1
    (AdaFace clips at eps), beyond π simcore's continuous fallback applies."""
    _number("margin", margin, 0.0, math.pi / 2)
    _number("h", h, 0.0)
    _number("norm_mean", norm_mean)
    _number("norm_std", norm_std, 0.0)
    check_margins(1.0, 0.0, 0.0, scale)
    margins = lambda x: adaface_margins(_feature_norms(x), margin=margin, h=h, norm_mean=norm_mean,  # noqa: E731
                                        norm_std=norm_std)
    return partial_loss(embeddings, labels, weight, lambda x: (dict(scale=float(scale)), margins(x), None),
                    **_options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction,
                               return_sampled, validate))


# --------------------------------------------------------------------------- MagFace
def magface_margin(embeddings, *, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0):
    """MagFace's angular margin m(a), linear from l_margin at a = l_a to u_margin at u_a,
    a = ‖x‖ clamped to [l_a, u_a]; differentiable in the embeddings (as the paper)."""
    a = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)).norm(dim=1).clamp(l_a, u_a)
    return (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin, a


def magface_partial(embeddings, labels, weight, *, scale=64.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0,
                    lambda_g=35.0, sample_rate=0.1, num_samples=None, generator=None, reduction="mean",
                    return_sampled=False, subcenters=1, filter_threshold=None, validate="first"):
    """MagFace: ArcFace with the per-row margin m(‖x‖) (:func:`magface_margin`), plus
    λ_g·g(a), g(a) = a/u_a² + 1/a, which pulls norms up. Gradients flow through the
    margin to the embeddings' norms."""
    for name, v in (("l_margin", l_margin), ("u_margin", u_margin)):
        _number(name, v, 0.0, math.pi / 2)
    _number("l_a", l_a, 0.0, lo_open=True)
    _number("u_a", u_a, 0.0, lo_open=True)
    _number("lambda_g", lambda_g, 0.0)
    if u_a <= l_a:
        raise ValueError(f"u_a ({u_a}) must exceed l_a ({l_a})")
    check_margins(1.0, 0.0, 0.0, scale)

    def prepare(x):
        m, a = magface_margin(x, l_margin=l_margin, u_margin=u_margin, l_a=l_a, u_a=u_a)
        return dict(scale=float(scale)), (1.0, m, 0.0), lambda_g * (a / u_a ** 2 + 1.0 / a)

    return partial_loss(embeddings, labels, weight, prepare,
                    **_options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction,
                               return_sampled, validate))


# --------------------------------------------------------------------------- CurricularFace
def curricularface_partial(embeddings, labels, weight, *, margin=0.5, scale=64.0, t=0.0, sample_rate=0.1,
                           num_samples=None, generator=None, reduction="mean", return_sampled=False, subcenters=1,
                           filter_threshold=None, validate="first"):
    """CurricularFace: ArcFace's target, and every non-target cosine a above the row's
    margined target value ψ becomes a·(t + a), so hard negatives weigh more as t (an
    EMA of the mean target cosine, kept by :class:`CurricularFace`) grows."""
    _number("t", t)
    check_margins(1.0, margin, 0.0, scale)
    fields = dict(m1=1.0, m2=float(margin), m3=0.0, scale=float(scale), curricular_t=float(t))
    return partial_loss(embeddings, labels, weight, lambda x: (fields, None, None),
                    **_options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction,
                               return_sampled, validate))


# --------------------------------------------------------------------------- sub-centres
@torch.no_grad()
def subcenter_dominant(weight, subcenters, embeddings, labels, *, max_angle=75.0):
    """Sub-centre ArcFace's clean-up after training with K sub-centres per class.

    Each sample is assigned to the nearest of its class's K centres; a class's
    dominant centre is the one most of its samples chose (centre 0 for a class
    without samples). Samples farther than ``max_angle`` degrees from their class's
    dominant centre are outliers (likely label noise).

    Returns ``(centres, keep)``: the (C, D) dominant centres (one per class, the
    weight for a plain head) and the (N,) bool mask of samples to keep.
    """
    check_family(subcenters, None, weight)
    _number("max_angle", max_angle, 0.0, 180.0)
    k = subcenters
    c = weight.shape[0] // k
    if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError("labels must be int64 of shape (N,) matching embeddings")
    if labels.numel() and (labels.min().item() < 0 or labels.max().item() >= c):
        raise ValueError(f"labels must lie in [0, {c})")
    w = F.normalize(weight.float(), dim=1).view(c, k, -1)
    x = F.normalize(embeddings.float(), dim=1)
    nearest = torch.bmm(w[labels], x.unsqueeze(2)).squeeze(2).argmax(1)
    votes = torch.bincount(labels * k + nearest, minlength=c * k).view(c, k)
    dominant = votes.argmax(1)
    centres = weight.view(c, k, -1)[torch.arange(c, device=weight.device), dominant]
    cos = (x * w[labels, dominant[labels]]).sum(1)
    keep = cos >= math.cos(math.radians(max_angle))
    return centres, keep


# --------------------------------------------------------------------------- modules
class _MarginLoss(nn.Module):
    """A family member as a module: ``kernel_args`` turns a batch into the kernel's
    MarginSpec fields and per-row margins (updating the module's statistics in
    training mode); ``forward(embeddings, labels, weight)`` is the functional loss."""

    def kernel_args(self, embeddings, target_cos):
        """(MarginSpec fields, (m1, m2, m3) per-row tensors or None, per-row regulariser or None).
        ``target_cos()`` returns the rows' target cosines when a statistic needs them."""
        raise NotImplementedError

    def forward(self, embeddings, labels, weight, *, sample_rate=0.1, num_samples=None, generator=None,
                reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None, validate="first"):
        return partial_loss(embeddings, labels, weight,
                        lambda x: self.kernel_args(x, lambda: target_cosines(x, labels, weight, subcenters)),
                        **_options(subcenters, filter_threshold, sample_rate, num_samples, generator, reduction,
                                   return_sampled, validate))


class ArcFace(_MarginLoss):
    """The combined margin cos(m1·θ + m2) − m3 (ArcFace: m2 = margin; CosFace: m1=1, m2=0, m3=margin)."""

    def __init__(self, margin=0.5, scale=64.0, *, m1=1.0, m3=0.0):
        super().__init__()
        check_margins(m1, margin, m3, scale)
        self.m1, self.margin, self.m3, self.scale = float(m1), float(margin), float(m3), float(scale)

    def kernel_args(self, embeddings, target_cos):
        return dict(m1=self.m1, m2=self.margin, m3=self.m3, scale=self.scale), None, None

    def extra_repr(self):
        return f"m1={self.m1}, margin={self.margin}, m3={self.m3}, scale={self.scale}"


class CamSoftmax(_MarginLoss):
    """Cam-Softmax (:func:`cam_softmax_partial`). With ``schedule`` (a :class:`CamSchedule`)
    c follows it, one step per training-mode forward (``self.step`` counts them)."""

    def __init__(self, c=math.pi / 2, scale=20.0, *, schedule: Optional[CamSchedule] = None):
        super().__init__()
        _number("c", c, 0.0, math.pi, lo_open=True)
        check_margins(1.0, 0.0, 0.0, scale)
        self.c, self.scale, self.schedule = float(c), float(scale), schedule
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._stepped = None  # None: no forward yet; else whether the latest forward advanced `step`

    @property
    def c(self) -> float:
        """The c of the latest forward (with a schedule; before any: the constructor's)."""
        if self.schedule is None or self._stepped is None:
            return self._c
        return self.schedule(max(0, int(self.step) - self._stepped))  # a host read, outside the step

    @c.setter
    def c(self, value):
        self._c = float(value)

    def kernel_args(self, embeddings, target_cos):
        if self.schedule is None:
            return dict(scale=self.scale, cam_power=cam_power(self.c)), None, None
        # c and its exponent stay on the device (a tensor: no host read, and one traced graph for
        # every step); the kernels read them from the op's dyn tensor
        with torch.no_grad():
            power = self.schedule.power_at(self.step)
            if self.training:
                self.step += 1
        self._stepped = int(self.training)
        return dict(scale=self.scale, cam_power=power), None, None

    def extra_repr(self):
        return f"c={self.c:.4f}, scale={self.scale}, schedule={self.schedule}"


class AdaFace(_MarginLoss):
    """AdaFace (:func:`adaface_partial`) with the batch mean and std of the feature norms
    kept as an EMA (``momentum`` 0.01; starting at µ = 20, σ = 100 as the paper's code),
    updated before use in each training-mode forward."""

    def __init__(self, margin=0.4, h=0.333, scale=64.0, *, momentum=0.01):
        super().__init__()
        _number("margin", margin, 0.0, math.pi / 2)
        _number("h", h, 0.0)
        _number("momentum", momentum, 0.0, 1.0)
        check_margins(1.0, 0.0, 0.0, scale)
        self.margin, self.h, self.scale, self.momentum = float(margin), float(h), float(scale), float(momentum)
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    def kernel_args(self, embeddings, target_cos):
        norms = _feature_norms(embeddings)
        if self.training:
            with torch.no_grad():
                std = norms.std() if norms.numel() > 1 else torch.zeros((), device=norms.device)
                self.norm_mean.lerp_(norms.mean().to(self.norm_mean), self.momentum)
                self.norm_std.lerp_(std.to(self.norm_std), self.momentum)
        margins = adaface_margins(norms, margin=self.margin, h=self.h, norm_mean=self.norm_mean.to(norms.device),
                                  norm_std=self.norm_std.to(norms.device))
        return dict(scale=self.scale), margins, None

    def extra_repr(self):
        return f"margin={self.margin}, h={self.h}, scale={self.scale}, momentum={self.momentum}"


class MagFace(_MarginLoss):
    """MagFace (:func:`magface_partial`): stateless; the regulariser is part of the loss."""

    def __init__(self, scale=64.0, *, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0):
        super().__init__()
        check_margins(1.0, 0.0, 0.0, scale)
        for name, v in (("l_margin", l_margin), ("u_margin", u_margin)):
            _number(name, v, 0.0, math.pi / 2)
        _number("lambda_g", lambda_g, 0.0)
        if not 0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        self.scale, self.l_margin, self.u_margin = float(scale), float(l_margin), float(u_margin)
        self.l_a, self.u_a, self.lambda_g = float(l_a), float(u_a), float(lambda_g)

    def kernel_args(self, embeddings, target_cos):
        m, a = magface_margin(embeddings, l_margin=self.l_margin, u_margin=self.u_margin, l_a=self.l_a, u_a=self.u_a)
        reg = self.lambda_g * (a / self.u_a ** 2 + 1.0 / a)
        return dict(scale=self.scale), (1.0, m, 0.0), reg

    def extra_repr(self):
        return (f"scale={self.scale}, margin=[{self.l_margin}, {self.u_margin}] over norms [{self.l_a}, {self.u_a}], "
                f"lambda_g={self.lambda_g}")


class CurricularFace(_MarginLoss):
    """CurricularFace (:func:`curricularface_partial`) with t = EMA of the batch's mean
    target cosine (``momentum`` 0.01, t starts at 0), updated before use in each
    training-mode forward, as the paper's code."""

    def __init__(self, margin=0.5, scale=64.0, *, momentum=0.01):
        super().__init__()
        check_margins(1.0, margin, 0.0, scale)
        _number("momentum", momentum, 0.0, 1.0)
        self.margin, self.scale, self.momentum = float(margin), float(scale), float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def kernel_args(self, embeddings, target_cos):
        if self.training:
            with torch.no_grad():
                self.t.lerp_(target_cos().mean().to(self.t), self.momentum)
        # t stays a tensor (no host read; one traced graph for every t): the op's dyn input
        return dict(m1=1.0, m2=self.margin, m3=0.0, scale=self.scale, curricular_t=self.t.detach()), None, None

    def extra_repr(self):
        return f"margin={self.margin}, scale={self.scale}, momentum={self.momentum}"
