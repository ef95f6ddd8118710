"""A face-recognition training step on the CPU, timed in its parts (issue 25): the head's share of the
step, simcore's head against the dense one a user would otherwise write.

Parts, each timed on its own in interleaved rounds of one run (the order rotates every round; the
median of the rounds is reported, with every round's figure):
  backbone          iresnet50 (simcore.isc.face_backbones, InsightFace's layout) at 112 px: forward,
                    backward from a fixed upstream gradient, SGD step (lr 0.1, momentum 0.9, weight
                    decay 5e-4: the ms1mv3_r50 recipe)
  simcore head      simcore.PartialMarginHead, ArcFace s = 64, m = 0.5, sample rate 0.1, its sparse row
                    SGD with the same settings: forward, backward, head.step() on fixed embeddings
  dense head (peer) nn.Linear(D, C) weights, normalised W and x, the ArcFace margin on the target,
                    scale, F.cross_entropy; torch.optim.SGD (same settings) on the whole weight
                    (benchmarks/bench_train.py's DenseArcFace, InsightFace's single-process path)
  floors            the three GEMMs of each head's step at its shapes, torch.mm: (B, S, D) for simcore
                    (S = ceil(0.1 C) sampled classes), (B, C, D) for the dense head
The head's share of a step is head / (backbone + head), for each head.

The issue's setting is 1M classes x 512 dims. On the 2-core CI-class machine it does not fit beside
the other sessions: the dense head holds its weight and momentum (2 x 2 GB) and a step adds 5.0x its
weight on top (measured at 100k classes: normalised W, its gradient, W's gradient, temporaries),
~14 GB, beside simcore's 4.1 GB (centres and momentum) and the backbone; the machine has 23 GB and is
shared. Its time does not fit either: the dense step took 10 s at 100k classes under load 7.6 (1
thread), so ~100 s a step at 1M. The CPU-sized setting (the defaults) scales both heads down by the
same factor, to 100k classes x 512 (sample rate 0.1: S = 10,000), with batch 8 and 1 intra-op thread.
Both heads' costs are linear in C at a fixed batch (the dense head passes over its C x D weight, the
sampled head over its S x D rows), so their ratio carries to 1M; the share at 1M follows by scaling
the head times by 10 (a prediction, not a measurement).

Run (1 min 40 s on the shared 2-core machine under load 8):
    python benchmarks/face_step.py [--classes 100000] [--dim 512] [--batch 8] [--rounds 3] [--threads 1]
"""
import argparse
import math
import os
import platform
import statistics
import time

import torch
from bench_train import DenseArcFace

import simcore
from simcore.isc.backbones import backbone_spec, build_backbone

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
MARGIN, SCALE, SAMPLE_RATE = 0.5, 64.0, 0.1


def backbone_part(batch, dim, g):
    torch.manual_seed(0)
    model = build_backbone(backbone_spec("iresnet50", dim, 112)).train()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    x, upstream = torch.rand(batch, 3, 112, 112, generator=g), torch.randn(batch, dim, generator=g)

    def run():
        opt.zero_grad(set_to_none=True)
        model(x).backward(upstream)
        opt.step()
    return run, sum(p.numel() for p in model.parameters()) * 4 * 2     # weights + momentum


def head_parts(classes, dim, batch, g):
    """{part: (step, held bytes)} for the two heads and their floors, on the same embeddings and labels."""
    emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g)).requires_grad_()
    labels = torch.randint(classes, (batch,), generator=g)
    head = simcore.PartialMarginHead(classes, dim, margin=MARGIN, scale=SCALE, sample_rate=SAMPLE_RATE,
                                     optimizer="sgd", **SGD)
    dense = DenseArcFace(classes, dim, margin=MARGIN, scale=SCALE)
    dense_opt = torch.optim.SGD(dense.parameters(), **SGD)

    def simcore_step():
        emb.grad = None
        head.zero_grad()
        head(emb, labels).backward()
        head.step()

    def dense_step():
        emb.grad = None
        dense_opt.zero_grad(set_to_none=True)
        dense(emb, labels).backward()
        dense_opt.step()

    sampled = math.ceil(SAMPLE_RATE * classes)
    weight_bytes = classes * dim * 4
    return {"simcore head": (simcore_step, 2 * weight_bytes), "dense head (peer)": (dense_step, 2 * weight_bytes),
            "floor: simcore's 3 GEMMs": (gemms(batch, sampled, dim, g), 0),
            "floor: dense 3 GEMMs": (gemms(batch, classes, dim, g), 0)}


def gemms(batch, rows, dim, g):
    """The three GEMMs of a head step at (B, rows, D): cosines, dL/dx, dL/dW."""
    x, w, grad = torch.randn(batch, dim, generator=g), torch.randn(rows, dim, generator=g), \
        torch.randn(batch, rows, generator=g)

    def run():
        torch.mm(x, w.t())
        torch.mm(grad, w)
        torch.mm(grad.t(), x)
    return run


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine():
    model = flags = "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v for k, v in (line.split(":", 1) for line in f if ":" in line)}
        model = " ".join(info.get("model name", "?").split())
        have = set(info.get("flags", "").split())
        flags = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in have)
    return f"{model} ({os.cpu_count()} cores; {flags}; {platform.machine()})"


def report(times, args, held, load):
    med = {k: statistics.median(v) for k, v in times.items()}
    bb = med["backbone"]
    print(f"face step: iresnet50 at 112 px, B={args.batch}, D={args.dim}, C={args.classes:,}, sample rate "
          f"{SAMPLE_RATE}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); {machine()}; "
          f"{args.rounds} interleaved rounds (median); load average {load[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'part':28s} {'median s':>9s} {'rounds':>24s} {'held MB':>9s}")
    for k, v in times.items():
        print(f"{k:28s} {med[k]:9.3f} {' '.join(f'{t:.3f}' for t in v):>24s} {held.get(k, 0) / 2**20:9.0f}")
    for head, floor in (("simcore head", "floor: simcore's 3 GEMMs"), ("dense head (peer)", "floor: dense 3 GEMMs")):
        h = med[head]
        share = [hh / (b + hh) for hh, b in zip(times[head], times["backbone"])]
        print(f"{head}: share of the step {h / (bb + h):.1%} (per round {', '.join(f'{s:.1%}' for s in share)}); "
              f"{h / med[floor]:.2f}x its GEMM floor; predicted at 10x the classes: {10 * h / (bb + 10 * h):.1%}")
    ratio = [s / d for s, d in zip(times["simcore head"], times["dense head (peer)"])]
    print(f"simcore head / dense head: {med['simcore head'] / med['dense head (peer)']:.3f} "
          f"(per round {', '.join(f'{r:.3f}' for r in ratio)}); whole step simcore / dense: "
          f"{(bb + med['simcore head']) / (bb + med['dense head (peer)']):.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    parts = {"backbone": backbone_part(args.batch, args.dim, g), **head_parts(args.classes, args.dim, args.batch, g)}
    held = {k: v[1] for k, v in parts.items()}
    for step, _ in parts.values():      # warm-up: oneDNN primitives, the optimizers' lazily made state
        step()
    names = list(parts)
    times = {k: [] for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(parts[k][0]))
    report(times, args, held, load)


if __name__ == "__main__":
    main()
