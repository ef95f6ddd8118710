"""Margin-softmax losses over sampled class subsets (ArcFace, CosFace, combined).

INTERIM: runs the plain-PyTorch reference; the fused kernel replaces the body
of ``margin_softmax_partial`` (issue: arcface_partial).
"""
import math

import torch
from torch import nn

from simcore.reference.margin_softmax import margin_softmax_loss


def sample_classes(labels, num_classes, num_samples, generator=None):
    """Sorted int64 class ids: every label, plus uniform negatives without
    replacement up to ``num_samples`` in total."""
    positives = torch.unique(labels)
    if num_samples <= positives.numel():
        return positives
    keep = torch.ones(num_classes, dtype=torch.bool, device=labels.device)
    keep[positives] = False
    rest = keep.nonzero().squeeze(1)
    pick = torch.randperm(rest.numel(), generator=generator, device="cpu")[: num_samples - positives.numel()]
    return torch.sort(torch.cat([positives, rest[pick.to(rest.device)]])).values


def margin_softmax_partial(embeddings, labels, weight, *, m1=1.0, m2=0.5, m3=0.0, scale=64.0,
                           sample_rate=0.1, num_samples=None, generator=None, reduction="mean",
                           return_sampled=False):
    num_classes = weight.shape[0]
    if num_samples is None:
        num_samples = math.ceil(sample_rate * num_classes)
    sampled = sample_classes(labels, num_classes, num_samples, generator)
    loss = margin_softmax_loss(embeddings, labels, weight, sampled, m1=m1, m2=m2, m3=m3, scale=scale,
                               reduction=reduction)
    return (loss, sampled) if return_sampled else loss


def arcface_partial(embeddings, labels, weight, *, margin=0.5, scale=64.0, **kwargs):
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=margin, m3=0.0, scale=scale, **kwargs)


def cosface_partial(embeddings, labels, weight, *, margin=0.35, scale=64.0, **kwargs):
    return margin_softmax_partial(embeddings, labels, weight, m1=1.0, m2=0.0, m3=margin, scale=scale, **kwargs)


class PartialMarginHead(nn.Module):
    def __init__(self, num_classes, embedding_dim, *, margin=0.5, scale=64.0, sample_rate=0.1):
        super().__init__()
        self.margin, self.scale, self.sample_rate = margin, scale, sample_rate
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def forward(self, embeddings, labels):
        return arcface_partial(embeddings, labels, self.weight, margin=self.margin, scale=self.scale,
                               sample_rate=self.sample_rate)
