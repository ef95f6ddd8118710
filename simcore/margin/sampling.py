"""The Partial FC class sampler and the check of a caller's own sample.

:func:`sample_classes` draws the classes one step's loss runs over: every class
in the batch plus uniform negatives; :func:`check_sampled` validates ids a
caller passes instead (``PartialMarginHead.forward(..., sampled=ids)``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.margin.checks import check_label_range, check_validate, value_check

__all__ = ["sample_classes", "check_sampled"]


def sample_classes(labels: torch.Tensor, num_classes: int, num_samples: int,
                   generator: Optional[torch.Generator] = None, *, validate="first") -> torch.Tensor:
    """Sorted int64 class ids: every class in ``labels``, plus negatives drawn
    uniformly without replacement up to ``num_samples`` ids in total (exactly the
    positives when they alone reach ``num_samples``). Deterministic for a given
    ``generator`` state (random numbers are drawn on the generator's device, CPU
    by default) and backend.

    Compiled backend (under ``torch.compile`` the custom op ``simcore::sample_classes``,
    ``generator=None`` only): Floyd's algorithm on the host over the negatives' ranks with
    a C/8-byte bitmap, O(k + C/64) for k negatives (C in the millions is fine); the
    ids are then moved to ``labels.device``. Reference backend: rejection sampling in
    torch, O(k log k).

    Accelerator labels (CUDA), when the result's size is static (``labels.numel() <=
    num_samples < num_classes``, the usual Partial FC case): sampled on the labels'
    device without a host synchronisation, eagerly and traced alike: one uniform
    float64 key per class, −1 for the labels' classes, the ``num_samples`` smallest
    keys (``torch.topk``), sorted; O(C) work on the device. Use a ``generator`` on the
    labels' device (or None): a CPU generator's keys are copied over. Otherwise (more
    labels than ``num_samples``: a data-dependent size) the host path above runs, with
    its synchronisations. ``validate``: the label-range check, as in
    :func:`simcore.margin.checks.value_check`.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class ids, got {labels.dtype}")
    for name, v in (("num_classes", num_classes), ("num_samples", num_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    validate = check_validate(validate)
    if dispatch.cuda_path(labels.device) and labels.numel() <= num_samples < num_classes:
        check_label_range(labels, num_classes, validate)
        return sample_on_device(labels, num_classes, num_samples, generator)
    gdev = generator.device if generator is not None else torch.device("cpu")
    if torch.compiler.is_compiling() and dispatch.use_compiled(torch.device("cpu")):
        # The number of positives is unknown when tracing: draw num_samples random words (at least
        # as many as negatives; the op uses the first k). Dynamo traces randint (not random_), and
        # compiled graphs have their own RNG: same distribution, not the eager ids.
        rng = {} if generator is None else {"generator": generator}  # generator=None fails on a symbolic size
        randoms = torch.randint(-2**63, 2**63 - 1, (num_samples,), device=gdev, **rng)
        return _sample_classes_op(labels, randoms, num_classes, num_samples)
    positives = torch.unique(labels)  # sorted
    p = positives.numel()
    if not torch.compiler.is_compiling():
        _check_label_range(positives, num_classes)
    k, n = num_samples - p, num_classes - p  # negatives wanted, negatives available
    if k <= 0:
        return positives
    if k >= n:
        return torch.arange(num_classes, device=labels.device)
    if dispatch.use_compiled(torch.device("cpu")):
        # Eagerly the op's host path runs directly: going through the op (dispatcher, a second
        # unique) would add ~17 µs to a ~35 µs call at B = 256, 1024 of 100k classes.
        randoms = torch.empty(k, dtype=torch.int64, device=gdev).random_(generator=generator)
        return _floyd_sample(positives.cpu(), randoms, num_classes).to(labels.device)
    ranks = _distinct_uniform(k, n, generator, gdev).to(labels.device)
    # The r-th negative class is r + #{j : positives[j] − j <= r}.
    shift = positives - torch.arange(p, device=labels.device)
    negatives = ranks + torch.searchsorted(shift, ranks, right=True)
    return torch.sort(torch.cat([positives, negatives])).values


def sample_on_device(labels, num_classes, num_samples, generator=None):
    """``num_samples`` sorted class ids on ``labels.device``: every label's class plus uniform
    negatives without replacement, with no host synchronisation (static shapes only). Needs
    ``labels.numel() <= num_samples <= num_classes`` and labels in range (checked by the caller:
    an out-of-range label is an index error on the device)."""
    dev = labels.device
    gdev = dev if generator is None else generator.device
    keys = torch.rand(num_classes, dtype=torch.float64, device=gdev, generator=generator).to(dev)
    keys.index_fill_(0, labels, -1.0)  # every positive ranks first; ties among keys have probability ~2^-53
    return torch.sort(torch.topk(keys, num_samples, largest=False, sorted=False).indices).values


@torch.library.custom_op("simcore::sample_classes", mutates_args=())
def _sample_classes_op(labels: torch.Tensor, randoms: torch.Tensor, num_classes: int,
                       num_samples: int) -> torch.Tensor:
    """:func:`sample_classes` on the compiled host path, as ``torch.compile`` sees it (eager calls
    run the same path without the dispatcher). ``randoms`` holds at least k = num_samples −
    #unique(labels) random int64 words, of which the first k are used."""
    positives = torch.unique(labels).cpu()
    _check_label_range(positives, num_classes)
    p = positives.numel()
    k = num_samples - p
    if k <= 0:
        return positives.to(labels.device)
    if k >= num_classes - p:
        return torch.arange(num_classes, device=labels.device)
    if randoms.numel() < k:
        raise ValueError(f"sample_classes needs {k} random words, got {randoms.numel()}")
    return _floyd_sample(positives, randoms[:k], num_classes).to(labels.device)


def _floyd_sample(positives, randoms, num_classes):
    """The compiled host sampler: the CPU ``positives`` plus k = len(randoms) negatives, sorted."""
    p, k = positives.numel(), randoms.numel()
    bitmap = torch.empty((num_classes - p + 63) // 64, dtype=torch.int64)
    out = torch.empty(p + k, dtype=torch.int64)
    dispatch.extension().ms_sample_classes(tensor_arg(positives), tensor_arg(randoms.cpu()), num_classes,
                                            tensor_arg(bitmap), tensor_arg(out))
    return out


def _check_label_range(positives, num_classes):
    """Raise unless the sorted unique labels ``positives`` lie in [0, num_classes)."""
    if positives.numel():
        lo, hi = positives[0].item(), positives[-1].item()
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


@_sample_classes_op.register_fake
def _(labels, randoms, num_classes, num_samples):
    # min(num_classes, max(#unique labels, num_samples)) ids: data-dependent only when the
    # labels alone may exceed num_samples.
    if num_samples >= num_classes or labels.numel() <= num_samples:
        return labels.new_empty(min(num_samples, num_classes))
    # new_dynamic_size takes only static bounds (the counts are symbolic when they vary between calls).
    size = torch.library.get_ctx().new_dynamic_size(min=num_samples if isinstance(num_samples, int) else 0,
                                                    max=num_classes if isinstance(num_classes, int) else None)
    return labels.new_empty(size)


def _distinct_uniform(k, n, generator, device):
    """k distinct values of [0, n), a uniformly random k-subset: the first k distinct
    values of an i.i.d. uniform sequence (sequential sampling without replacement)."""
    m = int(math.ceil(-n * math.log1p(-k / n) * 1.05)) + 64  # expected draws for k distinct, plus slack
    vals = torch.randint(n, (m,), generator=generator, device=device)
    while True:
        uniq, inverse = torch.unique(vals, return_inverse=True)
        if uniq.numel() >= k:
            break
        vals = torch.cat([vals, torch.randint(n, (max(64, m // 8),), generator=generator, device=device)])
    first = torch.full((uniq.numel(),), vals.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(vals.numel(), device=device), reduce="amin")
    return uniq[torch.argsort(first)[:k]]


def check_sampled(sampled, labels, num_classes, validate="first"):
    """Raise unless ``sampled`` is a 1-D int64 tensor of strictly increasing class ids
    in [0, num_classes) on ``labels.device`` that contains every label. Type, shape and
    device are checked on every call; the ids' values as ``validate`` says
    (:func:`simcore.margin.checks.value_check`)."""
    if not isinstance(sampled, torch.Tensor) or sampled.dtype != torch.int64 or sampled.dim() != 1:
        raise TypeError("sampled must be a 1-D int64 tensor of class ids")
    if sampled.device != labels.device:
        raise ValueError(f"sampled is on {sampled.device} but labels on {labels.device}")
    if sampled.numel() == 0:
        raise ValueError("sampled is empty")
    how = value_check(check_validate(validate), labels.device,
                      ("sampled", num_classes, tuple(sampled.shape), tuple(labels.shape), labels.device))
    if how is None:
        return
    if how == "device":
        ok = (sampled[1:] > sampled[:-1]).all() & (sampled[0] >= 0) & (sampled[-1] < num_classes)
        if labels.numel():
            col = torch.searchsorted(sampled, labels).clamp_(max=sampled.numel() - 1)
            ok = ok & (sampled[col] == labels).all()
        torch._assert_async(ok, f"simcore: sampled must be strictly increasing ids in [0, {num_classes}) "
                                "containing every label")
        return
    if sampled.numel() > 1 and not bool((sampled[1:] > sampled[:-1]).all()):
        raise ValueError("sampled must be strictly increasing (sorted, no duplicates)")
    if int(sampled[0]) < 0 or int(sampled[-1]) >= num_classes:
        raise ValueError(f"sampled holds ids outside [0, {num_classes}): [{int(sampled[0])}, {int(sampled[-1])}]")
    if labels.numel():
        col = torch.searchsorted(sampled, labels).clamp_(max=sampled.numel() - 1)
        missing = sampled[col] != labels
        if bool(missing.any()):
            raise ValueError(f"sampled must contain every label; missing e.g. class {int(labels[missing][0])}")
