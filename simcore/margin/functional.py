"""Margin-softmax losses over sampled class subsets: ArcFace, CosFace, the combined margin.

:func:`margin_softmax_partial` is the one loss; :func:`arcface_partial` (additive
angular margin m2) and :func:`cosface_partial` (additive cosine margin m3) fix its
margins. :func:`partial_loss` is the body they share with the margin family
(:mod:`simcore.margin.family`): checks, sampling, per-row margins, then
:func:`simcore.margin.ops.sampled_margin_loss`. Semantics and design:
docs/margin_softmax.md.

The package's other modules, in dependency order: :mod:`~simcore.margin.sampling`
(the class sampler), :mod:`~simcore.margin.checks` (argument checks),
:mod:`~simcore.margin.gemm` and :mod:`~simcore.margin.engine` (the fused block
engine and its options), :mod:`~simcore.margin.ops` (custom ops, autograd),
this module, :mod:`~simcore.margin.family`, :mod:`~simcore.margin.head`
(:class:`~simcore.margin.head.PartialMarginHead`) and
:mod:`~simcore.margin.sharded`.
"""
from __future__ import annotations

import math

import torch

from simcore.margin.checks import (check_family, check_inputs, check_margins, check_validate, margin_dtype,
                                   per_row_margins)
from simcore.margin.engine import MarginSpec
from simcore.margin.ops import REDUCTION_CODES, reduce_rows, sampled_margin_loss
from simcore.margin.sampling import sample_classes

__all__ = ["margin_softmax_partial", "arcface_partial", "cosface_partial", "partial_loss"]


def partial_loss(embeddings, labels, weight, prepare, *, subcenters=1, filter_threshold=None, sample_rate,
                 num_samples, generator, reduction, return_sampled, validate="first"):
    """Shared body of the functional losses: checks, sampling, dispatch.

    ``prepare(embeddings)``, called once the inputs are checked, returns the variant's
    :class:`~simcore.margin.engine.MarginSpec` fields, its per-row (m1, m2, m3) (floats
    or (B,) tensors; None: the fields' scalars) and a per-row regulariser added to the
    loss (None: none). The other arguments are :func:`margin_softmax_partial`'s.
    """
    validate = check_validate(validate)
    check_inputs(embeddings, labels, weight, sample_rate, num_samples, reduction, subcenters=subcenters,
                 validate=validate)
    fields, margins, reg = prepare(embeddings)
    spec = MarginSpec(**fields, subcenters=subcenters,
                      filter_threshold=math.inf if filter_threshold is None else float(filter_threshold))
    num_classes = weight.shape[0] // subcenters
    if num_samples is None:
        num_samples = math.ceil(sample_rate * num_classes)
    if num_samples >= num_classes:
        sampled = torch.arange(num_classes, device=labels.device)
    else:
        sampled = sample_classes(labels, num_classes, num_samples, generator, validate="never")  # checked above
    rm = None if margins is None else per_row_margins(*margins, embeddings.shape[0], embeddings.device,
                                                      margin_dtype(embeddings), validate=validate)
    loss = sampled_margin_loss(embeddings, labels, weight, sampled, spec, reduction, rm)
    if reg is not None:
        loss = loss + reduce_rows(reg, REDUCTION_CODES[reduction]).to(loss.dtype)
    return (loss, sampled) if return_sampled else loss


def margin_softmax_partial(embeddings, labels, weight, *, m1=1.0, m2=0.5, m3=0.0, scale=64.0,
                           sample_rate=0.1, num_samples=None, generator=None, reduction="mean",
                           return_sampled=False, subcenters=1, filter_threshold=None, validate="first"):
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
    ``validate``: how values on the device (label range, per-row margins) are checked:
    ``"first"`` (default), ``"always"`` or ``"never"``
    (:func:`simcore.margin.checks.value_check`; docs/margin_softmax.md, "What syncs remain").
    How it runs (GEMM operands, block sizes): :mod:`simcore.margin.engine`.
    """
    check_margins(m1, m2, m3, scale)
    check_family(subcenters, filter_threshold)
    per_row = any(isinstance(m, torch.Tensor) for m in (m1, m2, m3))
    # per-row tensors travel as row margins; the scalars they replace are placeholders
    fields = dict(m1=1.0, m2=0.0, m3=0.0, scale=float(scale)) if per_row else \
        dict(m1=float(m1), m2=float(m2), m3=float(m3), scale=float(scale))
    return partial_loss(embeddings, labels, weight, lambda x: (fields, (m1, m2, m3) if per_row else None, None),
                        subcenters=subcenters, filter_threshold=filter_threshold, sample_rate=sample_rate,
                        num_samples=num_samples, generator=generator, reduction=reduction,
                        return_sampled=return_sampled, validate=validate)


def arcface_partial(embeddings, labels, weight, *, margin=0.5, scale=64.0, sample_rate=0.1, num_samples=None,
                    generator=None, reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None,
                    validate="first"):
    """ArcFace (additive angular margin, Deng et al. 2019): target logit s·cos(θ + margin).
    ``subcenters=K`` gives sub-centre ArcFace (Deng et al. 2020; weight (C·K, D)).
    See :func:`margin_softmax_partial`."""
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=margin, m3=0.0, scale=scale,
                                  sample_rate=sample_rate, num_samples=num_samples, generator=generator,
                                  reduction=reduction, return_sampled=return_sampled, subcenters=subcenters,
                                  filter_threshold=filter_threshold, validate=validate)


def cosface_partial(embeddings, labels, weight, *, margin=0.35, scale=64.0, sample_rate=0.1, num_samples=None,
                    generator=None, reduction="mean", return_sampled=False, subcenters=1, filter_threshold=None,
                    validate="first"):
    """CosFace / AM-Softmax (additive cosine margin, Wang et al. 2018): target logit s·(cos θ − margin).
    See :func:`margin_softmax_partial`."""
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=0.0, m3=margin, scale=scale,
                                  sample_rate=sample_rate, num_samples=num_samples, generator=generator,
                                  reduction=reduction, return_sampled=return_sampled, subcenters=subcenters,
                                  filter_threshold=filter_threshold, validate=validate)
