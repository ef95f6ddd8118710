"""margin_softmax_partial: time against the GEMM floor and the peers, and peak memory.

Run: python -m pytest benchmarks/bench_margin_softmax.py -q -s

Floor (written down first): forward+backward needs three GEMMs of 2·B·S·D FLOPs
each (logits X̂Ŵᵀ, ∂L/∂X̂ = GŴ, ∂L/∂Ŵ = GᵀX̂). At B=256, D=512, S=10,000 that is
7.9 GFLOP: ~44 ms at the ~180 GFLOP/s float32 rate of 2 threads on this machine
(shared/REFERENCE.md §5). The "floor" row times exactly those three torch.mm
calls at the same sizes in the same run, so every ratio is taken side by side.

Groups:
  loss-10k-vs-lce    peer: torch's fused F.linear_cross_entropy (plain CE, no margin)
  loss-10k-vs-ref    peer: the plain-PyTorch ArcFace reference; also pytorch-metric-learning
  memory-100k        B=512, D=256, 100,000 sampled classes; peer: the reference. Peak
                     memory is reported ABOVE the gradients (x.grad, weight.grad),
                     which both allocate inside the timed call.
"""
import pytest
import torch
import torch.nn.functional as F

import simcore
from simcore.reference.margin_softmax import margin_softmax_loss

B, D, C = 256, 512, 10_000
BM, DM, CM = 512, 256, 100_000
ROUNDS = 11  # the shared 2-core machine is noisy: medians over more rounds


def _inputs(b, d, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).requires_grad_()
    w = (torch.randn(c, d, generator=g) * 0.01).requires_grad_()
    y = torch.randint(c, (b,), generator=g)
    return x, y, w


def _step(loss_fn, *params):
    def run():
        for p in params:
            p.grad = None
        loss_fn().backward()
    return run


def _floor(b, d, c):
    g = torch.Generator().manual_seed(1)
    x, w, gl = torch.randn(b, d, generator=g), torch.randn(c, d, generator=g), torch.randn(b, c, generator=g)

    def run():
        torch.mm(x, w.t())
        torch.mm(gl, w)
        torch.mm(gl.t(), x)
    return run


def _simcore(x, y, w):
    return _step(lambda: simcore.arcface_partial(x, y, w, sample_rate=1.0), x, w)


def _reference(x, y, w):
    sampled = torch.arange(w.shape[0])
    return _step(lambda: margin_softmax_loss(x, y, w, sampled), x, w)


@pytest.mark.benchmark(group="loss-10k-vs-lce")
@pytest.mark.parametrize("impl", ["floor", "linear_cross_entropy", "simcore"])
def test_loss_vs_lce(measure, impl):
    x, y, w = _inputs(B, D, C)
    if impl == "floor":
        measure(_floor(B, D, C), impl="3 GEMMs (floor)", role="floor", items=B, rounds=ROUNDS)
    elif impl == "linear_cross_entropy":
        measure(_step(lambda: F.linear_cross_entropy(x, w, y), x, w), impl="F.linear_cross_entropy (no margin)",
                role="peer", items=B, rounds=ROUNDS)
    else:
        measure(_simcore(x, y, w), impl="simcore.arcface_partial", role="simcore", items=B, rounds=ROUNDS)


@pytest.mark.benchmark(group="loss-10k-vs-ref")
@pytest.mark.parametrize("impl", ["floor", "reference", "pml", "simcore"])
def test_loss_vs_reference(measure, impl):
    x, y, w = _inputs(B, D, C)
    if impl == "floor":
        measure(_floor(B, D, C), impl="3 GEMMs (floor)", role="floor", items=B, rounds=ROUNDS)
    elif impl == "reference":
        measure(_reference(x, y, w), impl="plain-PyTorch ArcFace (reference)", role="peer", items=B, rounds=ROUNDS)
    elif impl == "pml":
        pml = pytest.importorskip("pytorch_metric_learning.losses")
        loss_fn = pml.ArcFaceLoss(num_classes=C, embedding_size=D, margin=28.6479, scale=64.0)  # 0.5 rad
        measure(_step(lambda: loss_fn(x, y), x, loss_fn.W), impl="pytorch-metric-learning ArcFaceLoss",
                role="other", items=B, rounds=ROUNDS)
    else:
        measure(_simcore(x, y, w), impl="simcore.arcface_partial", role="simcore", items=B, rounds=ROUNDS)


@pytest.mark.benchmark(group="memory-100k")
@pytest.mark.parametrize("impl", ["floor", "reference", "simcore"])
def test_memory_100k(measure, benchmark, impl):
    x, y, w = _inputs(BM, DM, CM)
    grad_bytes = x.numel() * 4 + w.numel() * 4
    if impl == "floor":
        measure(_floor(BM, DM, CM), impl="3 GEMMs (floor)", role="floor", items=BM, rounds=2)
        return
    fn = _reference(x, y, w) if impl == "reference" else _simcore(x, y, w)
    name = "reference" if impl == "reference" else "simcore.arcface_partial"
    measure(fn, impl=f"{name} (peak above grads)", role="peer" if impl == "reference" else "simcore",
            items=BM, rounds=2)
    benchmark.extra_info["peak_bytes"] -= grad_bytes
