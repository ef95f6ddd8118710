"""The margin family against plain arcface_partial: what each variant costs on the fused path.

Run: python -m pytest benchmarks/bench_margin_family.py -q
     PYTHONPATH=. python benchmarks/bench_margin_family.py      # interleaved rounds (steadier under load)

B=256, D=512, 10,000 classes (all sampled), float32, forward+backward. The peer is
simcore.arcface_partial itself at the same sizes (issue target: each variant at most
1.1x its time). The floor row is the three GEMMs (3·2·B·S·D FLOPs). Sub-centres with
K=3 triple every GEMM (10,000 classes x 3 centres), so they are compared with
arcface_partial over 30,000 classes: the same GEMMs, plus the max over centres and the
gradient routed back to the winning centre.
"""
import math
import statistics
import time

import pytest
import torch

import simcore

B, D, C = 256, 512, 10_000
ROUNDS = 15


def _inputs(k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
         * (torch.rand(B, 1, generator=g) * 60 + 10)).requires_grad_()  # norms 10..70: AdaFace/MagFace ranges
    w = (torch.randn(C * k, D, generator=g) * 0.01).requires_grad_()
    y = torch.randint(C, (B,), generator=g)
    return x, y, w


VARIANTS = {
    "arcface_partial": (simcore.arcface_partial, {}),
    "cam_softmax_partial": (simcore.cam_softmax_partial, dict(c=math.pi / 4)),
    "adaface_partial": (simcore.adaface_partial, {}),
    "magface_partial": (simcore.magface_partial, {}),
    "curricularface_partial": (simcore.curricularface_partial, dict(t=0.3)),
    "arcface_partial + filtering 0.4": (simcore.arcface_partial, dict(filter_threshold=0.4)),
}
SUBCENTRE = {
    "arcface_partial 30k classes": (simcore.arcface_partial, dict(subcenters=1)),
    "arcface_partial K=3": (simcore.arcface_partial, dict(subcenters=3)),
    "arcface_partial K=3 + filtering": (simcore.arcface_partial, dict(subcenters=3, filter_threshold=0.4)),
}


def _step(fn, kw, x, y, w):
    def run():
        x.grad = w.grad = None
        fn(x, y, w, sample_rate=1.0, **kw).backward()
    return run


def _floor(k=1):
    g = torch.Generator().manual_seed(1)
    x, w, gl = torch.randn(B, D, generator=g), torch.randn(C * k, D, generator=g), torch.randn(B, C * k, generator=g)

    def run():
        torch.mm(x, w.t())
        torch.mm(gl, w)
        torch.mm(gl.t(), x)
    return run


@pytest.mark.benchmark(group="family-10k")
@pytest.mark.parametrize("name", ["floor"] + list(VARIANTS))
def test_variant_vs_arcface(measure, name):
    if name == "floor":
        measure(_floor(), impl="3 GEMMs (floor)", role="floor", items=B, rounds=ROUNDS)
        return
    fn, kw = VARIANTS[name]
    x, y, w = _inputs()
    measure(_step(fn, kw, x, y, w), impl=name, role="peer" if name == "arcface_partial" else "simcore", items=B,
            rounds=ROUNDS)


@pytest.mark.benchmark(group="family-10k-subcentres")
@pytest.mark.parametrize("name", ["floor"] + list(SUBCENTRE))
def test_subcentres_vs_arcface(measure, name):
    if name == "floor":
        measure(_floor(3), impl="3 GEMMs at C·K (floor)", role="floor", items=B, rounds=ROUNDS)
        return
    fn, kw = SUBCENTRE[name]
    x, y, w = _inputs(k=3)  # (C·3, D) rows: 30,000 classes for the peer, 10,000 x 3 centres otherwise
    measure(_step(fn, kw, x, y, w), impl=name, role="peer" if name == "arcface_partial 30k classes" else "simcore",
            items=B, rounds=ROUNDS)


def main(rounds=15):
    """Interleaved: every variant once per round, medians; ratios against arcface_partial."""
    cases = {"3 GEMMs (floor)": _floor()}
    for name, (fn, kw) in {**VARIANTS, **SUBCENTRE}.items():
        cases[name] = _step(fn, kw, *_inputs(k=3 if name in SUBCENTRE else 1))
    times = {n: [] for n in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(rounds):
        for n, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["arcface_partial"]
    print(f"B={B}, D={D}, {C:,} classes, float32 fwd+bwd, {torch.get_num_threads()} threads, median of {rounds}")
    print(f"{'variant':<36}{'ms':>9}{'vs arcface':>12}{'samples/s':>11}")
    for n, t in med.items():
        ref = med["arcface_partial 30k classes"] if n in SUBCENTRE else base
        print(f"{n:<36}{t * 1e3:>9.1f}{t / ref:>11.2f}x{B / t:>11,.0f}")


if __name__ == "__main__":
    main()
