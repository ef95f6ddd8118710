"""Training helpers for copy-detection descriptors: a small CNN, an ArcFace training loop over
augmented copies (every training image its own class), and drip training.

The loss is ``simcore.arcface_partial`` over a plain ``nn.Parameter`` of class
centres, so this module needs nothing from simcore beyond that function.

Drip training (the 2nd-place ISC 2021 recipe): train the head on a subset of
the classes, then enlarge the class set in stages; the backbone is kept and
each new class centre starts at the mean embedding of the clean image and a
few augmented copies (``centres_from_embeddings``), then training restarts
(new optimizer) on the larger set. ``drip_train`` runs such a schedule.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simcore import arcface_partial

__all__ = ["GeM", "SmallCNN", "TrainStats", "train_arcface", "centres_from_embeddings", "drip_train", "embed"]


class GeM(nn.Module):
    """Generalised-mean pooling (p = 3 as the 2nd-place team used)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):
        return x.clamp_min(self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CPU-friendly CNN: stages of 3x3 convolutions (the first of each with stride 2), GeM pooling,
    a linear projection. ``input_size`` resizes the input first (area averaging); ``standardize``
    removes each image's channel means and scales it to unit standard deviation (invariance to brightness
    and contrast for free), else ImageNet statistics are used. ``forward`` returns unnormalised embeddings
    (the margin loss normalises them)."""

    def __init__(self, embedding_dim: int = 128, widths: Sequence[int] = (32, 64, 128, 256), depth: int = 1,
                 input_size: Optional[int] = None, standardize: bool = True):
        super().__init__()
        self.input_size, self.standardize = input_size, standardize
        layers, cin = [], 3
        for w in widths:
            layers.append(_block(cin, w, 2))
            layers += [_block(w, w, 1) for _ in range(depth - 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = GeM()
        self.fc = nn.Linear(cin, embedding_dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        if self.standardize:      # per image: channel means removed, unit overall std (brightness/contrast-free)
            x = x - x.mean((2, 3), keepdim=True)
            x = x / (x.std((1, 2, 3), keepdim=True) + 1e-2)
        else:
            x = (x - self.mean) / self.std
        return self.fc(self.pool(self.features(x)))


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 256, *, flip: bool = False) -> torch.Tensor:
    """L2-normalised embeddings of a float (N, 3, H, W) batch in [0, 1] (uint8 accepted), in eval mode.

    ``flip=True``: normalise(f(x) + f(horizontally flipped x)), a descriptor that is exactly invariant to
    horizontal flips, at twice the cost."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        e = model(x)
        if flip:
            e = F.normalize(e, dim=1) + F.normalize(model(x.flip(3)), dim=1)
        out.append(F.normalize(e, dim=1))
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class TrainStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0            # forward + backward + optimizer only
    augment_seconds: float = 0.0    # making the augmented copies
    losses: List[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Training throughput (forward + backward + step), excluding augmentation."""
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def end_to_end_images_per_second(self) -> float:
        total = self.seconds + self.augment_seconds
        return self.images / total if total else 0.0


def train_arcface(model: nn.Module, images: torch.Tensor, weight: nn.Parameter, *, steps: int,
                  batch_size: int = 128, augment: Optional[Callable] = None, classes: Optional[torch.Tensor] = None,
                  lr: float = 1e-3, head_lr: Optional[float] = None, margin: float = 0.4, scale: float = 40.0,
                  sample_rate: float = 1.0, generator: Optional[torch.Generator] = None,
                  stats: Optional[TrainStats] = None, progress: bool = False, desc: str = "train",
                  stop_loss: Optional[float] = None, warmup: int = 0, augment_threads: Optional[int] = 1) -> TrainStats:
    """Train ``model`` with an ArcFace head where image i is class i (``weight`` (C, D) rows).

    Each step draws ``batch_size`` distinct classes among ``classes`` (default:
    all rows of ``weight``), makes one augmented copy of each with ``augment(x,
    generator=g)``, and minimises ``arcface_partial`` (s = 40, m = 0.4 as the
    2nd-place team) with Adam; the learning rate follows a cosine decay after
    ``warmup`` linear steps. ``stop_loss`` ends early once the mean loss of the
    last 20 steps falls below it (the drip schedule's criterion).
    ``augment_threads``: torch's intra-op thread count while augmenting (default
    1: the augmentations are many small ops, which run several times faster on
    one thread than with OpenMP's fork/join on a busy machine); None keeps it.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    stats = stats if stats is not None else TrainStats()
    pool = torch.arange(weight.shape[0]) if classes is None else classes
    batch_size = min(batch_size, pool.numel())
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
                            {"params": [weight], "lr": head_lr if head_lr is not None else lr}])
    base = [group["lr"] for group in opt.param_groups]
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="step", leave=False)
    model.train()
    for step in it:
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group, b in zip(opt.param_groups, base):
            group["lr"] = b * f
        labels = pool[torch.randperm(pool.numel(), generator=g)[:batch_size]]
        t0 = time.perf_counter()
        x = images[labels]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if augment is not None:
            threads = torch.get_num_threads()
            if augment_threads is not None:
                torch.set_num_threads(augment_threads)
            try:
                x = augment(x, generator=g)
            finally:
                torch.set_num_threads(threads)
        t1 = time.perf_counter()
        loss = arcface_partial(model(x), labels, weight, margin=margin, scale=scale,
                               sample_rate=sample_rate, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        stats.augment_seconds += t1 - t0
        stats.seconds += t2 - t1
        stats.steps += 1
        stats.images += int(labels.numel())
        stats.losses.append(float(loss.detach()))
        if progress:
            it.set_postfix(loss=f"{stats.losses[-1]:.3f}")
        if stop_loss is not None and len(stats.losses) >= 20 and sum(stats.losses[-20:]) / 20 < stop_loss:
            break
    return stats


@torch.no_grad()
def centres_from_embeddings(model: nn.Module, images: torch.Tensor, *, augment: Optional[Callable] = None,
                            views: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """New class centres: the normalised mean embedding of each clean image and ``views`` augmented copies."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    acc = embed(model, x)
    for _ in range(views if augment is not None else 0):
        acc = acc + embed(model, augment(x, generator=g))
    return F.normalize(acc, dim=1)


def drip_train(model: nn.Module, images: torch.Tensor, *, stages: Sequence[float] = (0.25, 0.5, 1.0),
               steps: Sequence[int] = (100, 100, 200), batch_sizes: Optional[Sequence[int]] = None,
               augment: Optional[Callable] = None, views: int = 4, stop_loss: Optional[float] = None,
               generator: Optional[torch.Generator] = None, progress: bool = False, **train_kwargs):
    """Drip training: classes = images; train on the first ``stages[0]`` fraction of them, then grow.

    At each stage the head grows to ``stages[s]·N`` classes; the new rows are
    ``centres_from_embeddings`` of the new images (clean + ``views`` augmented
    copies) from the current backbone, the old rows are kept, and training
    restarts with a fresh optimizer for ``steps[s]`` steps (or until the loss
    falls below ``stop_loss``). Returns ``(weight, stats)``; ``weight`` is the
    final (N, D) ``nn.Parameter``. (Class order: image order, so shuffle first
    if the images are grouped.)
    """
    if len(stages) != len(steps) or not stages or abs(stages[-1] - 1.0) > 1e-9 or \
            any(b <= a for a, b in zip(stages, stages[1:])) or stages[0] <= 0:
        raise ValueError("stages must be increasing fractions ending at 1.0, one steps entry per stage")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = images.shape[0]
    stats = TrainStats()
    weight = None
    done = 0
    for s, (frac, st) in enumerate(zip(stages, steps)):
        upto = max(1, round(frac * n))
        new = centres_from_embeddings(model, images[done:upto], augment=augment, views=views, generator=g)
        rows = new if weight is None else torch.cat([weight.detach(), new])
        weight = nn.Parameter(rows.clone())
        kwargs = dict(train_kwargs)
        if batch_sizes is not None:
            kwargs["batch_size"] = batch_sizes[s]
        train_arcface(model, images, weight, steps=st, augment=augment, generator=g, stats=stats,
                      stop_loss=stop_loss, progress=progress, desc=f"drip {upto} classes", **kwargs)
        done = upto
    return weight, stats
