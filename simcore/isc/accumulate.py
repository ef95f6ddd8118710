"""Gradient accumulation for the margin head (``simcore train --grad-accum N``): one optimizer step
from N micro-batches, equal to one step over their concatenation.

``accumulate_gradients(embed, head, micro_batches)`` runs one forward and backward pass per
micro-batch and leaves the step's gradients in the backbone's ``.grad`` and in the head's recorded
rows; the caller then steps both optimizers (``opt.step(); head.step()``) as after one batch. Three
things make it the big batch's step:

- the classes are sampled once, from the labels of all N micro-batches, as the head's own forward
  would sample them for the whole batch (``simcore.sample_classes`` with the head's sample rate and
  ``generator``; the class-sharded head: each rank draws its shard's classes from the labels of
  every rank's micro-batches, and the ranks exchange their draws), and every micro-batch's forward
  uses that set (``sampled=``): each sample's softmax runs over the same classes as in the big batch;
- micro-batch i's mean loss is weighted by its share B_i / ΣB of the samples (of every rank's, for
  the sharded head, whose loss is the mean over the global micro-batch), so the weighted losses add
  up to the big batch's mean loss and the gradients to its gradients;
- the head records the row gradients of each backward pass and sums them at ``step()`` (duplicate
  rows summed; one ``unique`` over the row ids, the synchronisation docs/margin_softmax.md lists
  for accumulation).

Under DDP, ``no_sync=model.no_sync`` skips the backbone's gradient all-reduce on all but the last
micro-batch (DDP then averages the summed gradients once). One micro-batch is the plain step: the
head draws the classes itself (the same draw), with no collective beyond its own.

The equality holds when the embedding of a sample does not depend on the rest of its batch and the
loss keeps no running statistics: batch-norm layers in training mode (IResNet, MobileFaceNet) see
micro-batch statistics, and AdaFace, CurricularFace and MagFace update theirs once per micro-batch,
as in every framework's accumulation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import simcore

__all__ = ["accumulate_gradients"]


def accumulate_gradients(embed: Callable, head, micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                         generator: Optional[torch.Generator] = None,
                         backward: Optional[Callable] = None,
                         forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
                         no_sync: Optional[Callable[[], ContextManager]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the step's mean loss, detached, float64; the sampled class ids: all of them, or with the sharded
    head those of this rank's shard) after one backward pass per ``(images, labels)`` micro-batch.
    ``embed(images)`` gives the embeddings; ``backward(loss)`` (default ``loss.backward()``; under AMP
    ``lambda l: scaler.scale(l).backward()``); ``forward_context()`` wraps each forward pass (autocast:
    the backward passes run outside it); ``no_sync()`` wraps every micro-batch but the last (DDP's)."""
    if not micro_batches:
        raise ValueError("gradient accumulation needs at least one micro-batch")
    backward = backward or (lambda loss: loss.backward())
    if len(micro_batches) == 1:
        images, labels = micro_batches[0]
        with forward_context():
            loss, sampled = head(embed(images), labels, generator=generator, return_sampled=True)
        backward(loss)
        return loss.detach().to(torch.float64), sampled
    labels = [y for _, y in micro_batches]
    sampled, mine = _step_classes(head, torch.cat(labels), generator)
    shares = _shares(head, labels)
    step_loss = torch.zeros((), dtype=torch.float64, device=labels[0].device)
    for i, (images, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with forward_context():
                loss = head(embed(images), y, sampled=sampled) * shares[i]
            backward(loss)
        step_loss += loss.detach().to(torch.float64)
    return step_loss, mine


def _step_classes(head, labels: torch.Tensor, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the step's sampled class ids, the same on every rank; those this rank drew) for the labels of
    all its micro-batches: what the head's forward would draw for them as one batch."""
    if not isinstance(head, simcore.ShardedPartialMarginHead):
        sampled = _draw(labels, head.num_classes, head.sample_rate, generator)
        return sampled, sampled
    group, (start, end) = head.process_group, head.shard
    every = _gather_ids(labels.to(head.weight.device), group)       # rank order, as the head's all-gather
    own = every[(every >= start) & (every < end)] - start
    mine = _draw(own, end - start, head.sample_rate, generator) + start
    return _gather_ids(mine, group), mine                           # shards are ordered by rank: sorted


def _draw(labels, num_classes, sample_rate, generator):
    num_samples = math.ceil(sample_rate * num_classes)
    if num_samples >= num_classes:
        return torch.arange(num_classes, device=labels.device)
    return simcore.sample_classes(labels, num_classes, num_samples, generator)


def _gather_ids(ids: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ids (int64, >= 0), concatenated in rank order; unequal lengths padded with -1."""
    longest = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    padded = torch.full((int(longest),), -1, dtype=torch.int64, device=ids.device)
    padded[:ids.numel()] = ids
    out = torch.empty(dist.get_world_size(group) * padded.numel(), dtype=torch.int64, device=ids.device)
    dist.all_gather_into_tensor(out, padded, group=group)
    return out[out >= 0]


def _shares(head, labels: Sequence[torch.Tensor]) -> List[float]:
    """Each micro-batch's share of the step's samples: of every rank's, for the sharded head (its loss
    is the mean over the global micro-batch)."""
    sizes = torch.tensor([y.numel() for y in labels], dtype=torch.int64)
    if isinstance(head, simcore.ShardedPartialMarginHead):
        sizes = sizes.to(head.weight.device)
        dist.all_reduce(sizes, group=head.process_group)
    sizes = sizes.tolist()
    return [n / sum(sizes) for n in sizes]
