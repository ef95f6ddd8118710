"""The sampled head alone at 1M classes on the CPU against its GEMM floors, interleaved in one
process (issue 24): forward + backward + ``head.step()`` + ``zero_grad()`` at B=64, D=128,
sample rate 0.1 (S=100,000), one thread; the floors are the three GEMMs at (B, S, D) with fresh
outputs (as bench_train's floor row) and into preallocated ones. Prints one JSON line: medians,
ratios and the minor page faults of a step.

    python benchmarks/head_1m.py sgd        # or adamw; --rounds N (default 7)
"""
import argparse
import json
import resource
import statistics
import time

import torch
from bench_train import DenseArcFace

import simcore

C, D, B = 1_000_000, 128, 64
S = C // 10


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def dense_peer(optimizer, x, y):
    """A step of the dense peer with the same margin, scale and optimizer settings as simcore's head."""
    peer = DenseArcFace(C, D, margin=0.4, scale=40.0)
    opt = (torch.optim.SGD(peer.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(peer.parameters(), lr=0.1, weight_decay=0.0))

    def step():
        peer(x.clone().requires_grad_(True), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build(optimizer):
    head = simcore.PartialMarginHead(C, D, margin=0.4, scale=40.0, sample_rate=0.1, optimizer=optimizer, lr=0.1,
                                     momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, D, generator=g) * 8, torch.randint(0, C, (B,), generator=g)
    w, xx, gl = torch.randn(S, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, S, generator=g)
    cos, gx, gw = torch.empty(B, S), torch.empty(B, D), torch.empty(S, D)

    def step():
        head(x.clone().requires_grad_(True), y).backward()
        head.step()
        head.zero_grad()

    def floor_fresh():
        torch.mm(xx, w.t()), torch.mm(gl, w), torch.mm(gl.t(), xx)

    def floor_out():
        torch.mm(xx, w.t(), out=cos), torch.mm(gl, w, out=gx), torch.mm(gl.t(), xx, out=gw)
    return dict(step=step, floor_fresh=floor_fresh, floor_out=floor_out, peer=dense_peer(optimizer, x, y))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("optimizer", choices=["sgd", "adamw"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fns = build(args.optimizer)
    for fn in fns.values():                              # warm-up: optimizer state, kept buffers
        fn(), fn()
    times, faults = {k: [] for k in fns}, []
    for _ in range(args.rounds):
        for name, fn in fns.items():
            f0, t0 = minor_faults(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if name == "step":
                faults.append(minor_faults() - f0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps(dict(optimizer=args.optimizer, step_ms=round(med["step"], 1),
                          floor_fresh_ms=round(med["floor_fresh"], 1), floor_out_ms=round(med["floor_out"], 1),
                          peer_ms=round(med["peer"], 1), x_peer=round(med["step"] / med["peer"], 4),
                          x_floor_fresh=round(med["step"] / med["floor_fresh"], 3),
                          x_floor_out=round(med["step"] / med["floor_out"], 3),
                          faults_per_step=int(statistics.median(faults)))))


if __name__ == "__main__":
    main()
