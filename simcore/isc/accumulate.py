"""Gradient accumulation for the margin head (``--grad-accum N``): one optimizer step from N
micro-batches, equal to one step over their concatenation.

``accumulate_gradients(embed, head, micro_batches)`` runs one forward and backward pass per
micro-batch and leaves the step's gradients in the backbone's ``.grad`` and in the head's recorded
rows; the caller then steps both optimizers (``opt.step(); head.step()``) as after one batch. Three
things make it the big batch's step:

- the classes are sampled once, from the labels of all N micro-batches (``simcore.sample_classes``
  with the head's sample rate), and every micro-batch's forward uses that set (``sampled=``): each
  sample's softmax runs over the same classes as in the big batch;
- micro-batch i's mean loss is weighted by its share B_i / ΣB of the samples, so the weighted losses
  add up to the big batch's mean loss and the gradients to its gradients;
- the head records the row gradients of each backward pass and sums them at ``step()`` (duplicate
  rows summed; one ``unique`` over the row ids, the synchronisation docs/margin_softmax.md lists
  for accumulation).

The equality holds when the embedding of a sample does not depend on the rest of its batch and the
loss keeps no running statistics: batch-norm layers in training mode (IResNet, MobileFaceNet) see
micro-batch statistics, and AdaFace, CurricularFace and MagFace update theirs once per micro-batch,
as in every framework's accumulation.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

import simcore

__all__ = ["accumulate_gradients"]


def accumulate_gradients(embed: Callable, head, micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                         generator: Optional[torch.Generator] = None,
                         backward: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the step's mean loss, detached; the sampled class ids) after one backward pass per
    ``(images, labels)`` micro-batch. ``embed(images)`` gives the embeddings; ``backward(loss)``
    (default ``loss.backward()``; under AMP ``lambda l: scaler.scale(l).backward()``)."""
    if not micro_batches:
        raise ValueError("gradient accumulation needs at least one micro-batch")
    backward = backward or (lambda loss: loss.backward())
    labels = torch.cat([y for _, y in micro_batches])
    num_samples = math.ceil(head.sample_rate * head.num_classes)
    if num_samples >= head.num_classes:
        sampled = torch.arange(head.num_classes, device=labels.device)
    else:
        sampled = simcore.sample_classes(labels, head.num_classes, num_samples, generator)
    total = labels.numel()
    step_loss = torch.zeros((), dtype=torch.float64, device=labels.device)
    for images, y in micro_batches:
        loss = head(embed(images), y, sampled=sampled) * (y.numel() / total)
        backward(loss)
        step_loss += loss.detach().to(torch.float64)
    return step_loss, sampled
