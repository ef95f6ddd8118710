"""Issue 5 on one GPU: check and time simcore's CUDA paths against the floors and the peers.

Run on a GPU machine (benchmarks/gpu_check.sh builds first, then calls this):
    PYTHONPATH=. python3 benchmarks/bench_gpu.py
Dry run on a CPU, tiny sizes, to check the script end to end:
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --small

Sections, each in one process so every ratio is taken side by side:

ceilings  the measured rates every floor below is built from: an n x n x n GEMM
          (random inputs) in bfloat16, float16 and float32, and a device-to-device
          copy (bytes read + bytes written).
arcface   simcore.arcface_partial, forward + backward, B x D embeddings against S
          classes, all sampled (sample_rate=1.0 over S classes: exactly S used).
          floor: the three GEMMs alone at the same sizes in the same dtype
          (X.W^T -> B x S, G.W -> B x D, G^T.X -> S x D); peer: the plain-PyTorch
          reference simcore.reference.margin_softmax.margin_softmax_loss (computes in
          float32 for half inputs). Peak extra memory = torch.cuda.max_memory_allocated
          above what was allocated before the step, minus the two gradients
          (x.grad, weight.grad) that every implementation must return. Correctness:
          loss and both gradients against a float64 reference at a size where float64
          fits, relative error ||out - ref|| / ||ref||, float32 <= 1e-5, float16 <= 2.5e-3, bfloat16 <= 1e-2,
          NaN fails; the plain float32 reference's own error is printed beside it.
cosine    simcore.cosine_topk, Q queries (float32) against an N x D database (float16
          first; bfloat16 and float32 too), k and a large k. peer: torch.topk over
          q @ db^T computed in query chunks that fit memory, on a database normalised
          once beforehand (an index build, not timed; queries are normalised in the
          timed call), and faiss.knn_gpu when faiss with GPU support imports. Floors:
          2.Q.N.D FLOPs at the measured GEMM rate of the database dtype, and the bytes
          (database, queries and results once) at the copy rate; "tile GEMMs" times
          simcore's own tile schedule with the selection left out. Correctness: the
          exact top-k (indices and scores) of a sample of queries recomputed in float64.
          Small batches (Q = 1, 16, 64, float16): the (row, segment) block path
          against one block per row, identical results required.

Every measurement: fresh random (never zero) inputs, warm-up, then repeats interleaved
between the implementations of a group, median; CUDA events on a GPU, a host clock on a
CPU. The table printed last gives ratios (time / peer, time / floor) next to the times.
With OUT set (or --out), all numbers go to OUT/bench_gpu.json and OUT/bench_gpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from conftest import peak_memory_bytes  # benchmarks/conftest.py: the CPU peak the pytest benchmarks use

FULL = dict(gemm_n=8192, copy_bytes=1 << 30,
            arc_B=1024, arc_D=512, arc_S=200_000, arc_check=(256, 512, 20_000), arc_dtypes=("bfloat16", "float16", "float32"),
            cos_Q=10_000, cos_N=1_000_000, cos_D=256, cos_k=100, cos_k_large=4096, cos_sample=64, cos_sample_large=16,
            cos_dtypes=("float16", "bfloat16", "float32"), peer_scores_bytes=2 << 30,
            warmup=2, repeat=10, cos_repeat=5, cos_repeat_slow=3)
SMALL = dict(gemm_n=256, copy_bytes=8 << 20,
             arc_B=64, arc_D=32, arc_S=3000, arc_check=(32, 32, 500), arc_dtypes=("bfloat16", "float16", "float32"),
             cos_Q=300, cos_N=20_000, cos_D=32, cos_k=10, cos_k_large=1024, cos_sample=16, cos_sample_large=8,
             cos_dtypes=("float16", "bfloat16", "float32"), peer_scores_bytes=16 << 20,
             warmup=1, repeat=3, cos_repeat=2, cos_repeat_slow=1)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# float16: float16 GEMM operands with a scaled gradient block (docs/margin_softmax.md, "fp16 and bf16
# numerics"): 2.5e-3 as in tests/test_margin_softmax.py
ARC_TOL = {torch.float32: 1e-5, torch.float16: 2.5e-3, torch.bfloat16: 1e-2}
TOPK_SCORE_TOL = {torch.float32: 1e-5, torch.float16: 2e-6, torch.bfloat16: 2e-6}  # half: exact float32 rescoring
MB = 2.0 ** 20


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- timing and memory
class Timer:
    """Times callables on one device: CUDA events around each call on a GPU (the call's
    stream work, launch gaps included), a host clock on a CPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def group(self, fns, warmup, repeat):
        """Median seconds of each callable in ``fns`` (name -> fn): warm-up, then ``repeat``
        rounds, each timing every callable once, the order rotating between rounds."""
        names = list(fns)
        for n in names:
            for _ in range(warmup):
                fns[n]()
        self.sync()
        times = {n: [] for n in names}
        for r in range(repeat):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(self.once(fns[n]))
        return {n: statistics.median(v) for n, v in times.items()}, times


def peak_extra_bytes(fn, device, subtract=0):
    """Peak bytes allocated while fn runs above what was allocated before it, minus ``subtract``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base - subtract
    return peak_memory_bytes(fn) - subtract


def is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere gives inf (never passes)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def randn(shape, dtype, device, gen, scale=1.0, chunk_rows=1 << 17):
    """Random normal values (never zeros) drawn in float32 and rounded to dtype, by row chunks."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(-1, 1)
    for s in range(0, flat.shape[0], chunk_rows):
        part = torch.randn(flat[s:s + chunk_rows].shape, generator=gen, device=device)
        flat[s:s + chunk_rows] = part.mul_(scale) if scale != 1.0 else part
    return out


# ----------------------------------------------------------------------------- results
class Results:
    def __init__(self):
        self.rows = []      # table rows (dicts)
        self.ceilings = {}
        self.checks = []    # (name, passed, detail)
        self.notes = []
        self.errors = []
        self.targets = []   # (text, value, limit, "le" | "ge")

    def row(self, **kw):
        self.rows.append(kw)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in kw.items()}
        log("  row:", shown)

    def check(self, name, passed, detail):
        self.checks.append(dict(name=name, passed=bool(passed), detail=detail))
        log(f"  check {'PASS' if passed else 'FAIL'}: {name}: {detail}")

    def note(self, text):
        self.notes.append(text)
        log("  note:", text)


def fmt_ratio(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


def fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}" if t < 1 else f"{t * 1e3:.0f}"


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(res, timer, device, gen, sz):
    n = sz["gemm_n"]
    for name in ("bfloat16", "float16", "float32"):
        dt = DTYPES[name]
        a, b = randn((n, n), dt, device, gen), randn((n, n), dt, device, gen)
        c = torch.empty(n, n, dtype=dt, device=device)
        med, _ = timer.group({"gemm": lambda: torch.mm(a, b, out=c)}, sz["warmup"] + 1, sz["repeat"])
        rate = 2.0 * n ** 3 / med["gemm"]
        res.ceilings[f"gemm_{name}_flops"] = rate
        res.row(section="ceiling", impl=f"GEMM {n}^3 {name} (random)", dtype=name, ms=med["gemm"], rate=f"{rate / 1e12:.4g} TFLOP/s")
        del a, b, c
    nel = sz["copy_bytes"] // 4
    src = torch.rand(nel, generator=gen, device=device) + 0.5
    dst = torch.empty_like(src)
    med, _ = timer.group({"copy": lambda: dst.copy_(src)}, sz["warmup"] + 1, sz["repeat"])
    bw = 2.0 * nel * 4 / med["copy"]
    res.ceilings["copy_bytes_per_s"] = bw
    res.row(section="ceiling", impl=f"copy {nel * 4 / MB:.0f} MB (read + write)", dtype="-", ms=med["copy"],
            rate=f"{bw / 1e9:.0f} GB/s")
    del src, dst
    free_memory(device)


# ----------------------------------------------------------------------------- arcface_partial
def _arc_inputs(B, D, S, dtype, device, gen):
    x = randn((B, D), dtype, device, gen, scale=2.0).requires_grad_()
    w = randn((S, D), dtype, device, gen).requires_grad_()
    y = torch.randint(0, S, (B,), generator=gen, device=device)
    return x, y, w


def check_arcface(res, device, gen, sz, dtype):
    import simcore
    from simcore.reference.margin_softmax import margin_softmax_loss

    B, D, S = sz["arc_check"]
    x, y, w = _arc_inputs(B, D, S, dtype, device, gen)
    loss = simcore.arcface_partial(x, y, w, sample_rate=1.0)
    loss.backward()
    sampled = torch.arange(S, device=device)
    out = {}
    for ref_dtype in (torch.float64, torch.float32):
        xd = x.detach().to(ref_dtype).requires_grad_()
        wd = w.detach().to(ref_dtype).requires_grad_()
        ref = margin_softmax_loss(xd, y, wd, sampled, m1=1.0, m2=0.5, m3=0.0, scale=64.0)
        ref.backward()
        out[ref_dtype] = (ref.detach(), xd.grad, wd.grad)
        del xd, wd
    r64, r32 = out[torch.float64], out[torch.float32]
    errs = [rel_err(loss, r64[0]), rel_err(x.grad, r64[1]), rel_err(w.grad, r64[2])]
    errs32 = [rel_err(r32[i], r64[i]) for i in range(3)]
    tol = ARC_TOL[dtype]
    name = str(dtype).replace("torch.", "")
    res.check(f"arcface {name} B={B} D={D} S={S} vs float64", all(e <= tol for e in errs),
              f"rel err loss {errs[0]:.2e}, dL/dx {errs[1]:.2e}, dL/dW {errs[2]:.2e} (tol {tol:g}); "
              f"plain float32 reference: {errs32[0]:.2e}, {errs32[1]:.2e}, {errs32[2]:.2e}")
    del x, w, loss, out
    free_memory(device)
    return errs, tol


# CUDA class-block caps swept besides the default 64 MiB (engine option cuda_block_bytes,
# simcore.margin.engine.engine_options): smaller blocks mean more launches and Python round trips
# per step, larger ones more memory.
BLOCK_SWEEP_MB = (32, 128)


def _measure_arcface(timer, device, gen, sz, dtype, B, D, S, sweep=()):
    """Median times of the floor, simcore and the reference at one size, and the peak extra
    memory of the last two (locals die with the frame, also when the reference runs out of memory).
    ``sweep``: extra simcore runs with the CUDA class-block cap at these MB ("simcore@<MB>")."""
    import simcore
    from simcore.margin.engine import engine_options
    from simcore.reference.margin_softmax import margin_softmax_loss

    x, y, w = _arc_inputs(B, D, S, dtype, device, gen)
    sampled = torch.arange(S, device=device)
    a, wf, g = randn((B, D), dtype, device, gen), randn((S, D), dtype, device, gen), randn((B, S), dtype, device, gen)
    c1, c2, c3 = (torch.empty(B, S, dtype=dtype, device=device), torch.empty(B, D, dtype=dtype, device=device),
                  torch.empty(S, D, dtype=dtype, device=device))

    def floor():  # the three GEMMs of forward + backward, alone
        torch.mm(a, wf.t(), out=c1)
        torch.mm(g, wf, out=c2)
        torch.mm(g.t(), a, out=c3)

    def step_simcore():
        x.grad = w.grad = None
        simcore.arcface_partial(x, y, w, sample_rate=1.0).backward()

    def step_reference():
        x.grad = w.grad = None
        margin_softmax_loss(x, y, w, sampled, m1=1.0, m2=0.5, m3=0.0, scale=64.0).backward()

    def capped(mb):
        def step():
            with engine_options(cuda_block_bytes=mb << 20):
                step_simcore()
        return step

    fns = {"floor": floor, "simcore": step_simcore, "reference": step_reference}
    fns.update({f"simcore@{mb}": capped(mb) for mb in sweep})
    grads = (x.numel() + w.numel()) * x.element_size()
    mem = {}
    for n in [n for n in fns if n != "floor"]:
        x.grad = w.grad = None
        mem[n] = peak_extra_bytes(fns[n], device, subtract=grads)
    x.grad = w.grad = None
    med, _ = timer.group(fns, sz["warmup"], sz["repeat"])
    return med, mem


def time_arcface(res, timer, device, gen, sz, dtype, errs, tol):
    name = str(dtype).replace("torch.", "")
    B, D, S0 = sz["arc_B"], sz["arc_D"], sz["arc_S"]
    rate = res.ceilings.get(f"gemm_{name}_flops")
    for S in (S0, S0 // 2, S0 // 4):  # the reference may not fit at full size: measure where it does
        try:
            sweep = BLOCK_SWEEP_MB if dtype == torch.bfloat16 else ()
            med, mem = _measure_arcface(timer, device, gen, sz, dtype, B, D, S, sweep)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            res.note(f"arcface {name}: out of memory at S={S:,} ({type(exc).__name__})")
            del exc
            free_memory(device)
            continue
        free_memory(device)
        size = f"B={_n(B)} D={D} S={_n(S)}"
        if S != S0:
            res.note(f"arcface {name}: measured at S={S:,}, the largest size where everything fit (asked {S0:,})")
        flops = 3 * 2.0 * B * S * D
        ok = all(e <= tol for e in errs)
        res.row(section="arcface", impl="3 GEMMs alone (floor)", dtype=name, size=size, ms=med["floor"],
                vs_floor=1.0, gemm_tflops=flops / med["floor"] / 1e12,
                vs_gemm_ceiling=(flops / rate) / med["floor"] if rate else None,
                check=f"{flops / med['floor'] / 1e12:.3g} TFLOP/s")
        res.row(section="arcface", impl="reference (plain PyTorch)", dtype=name, size=size, ms=med["reference"],
                vs_peer=1.0, vs_floor=med["reference"] / med["floor"], extra_mb=mem["reference"] / MB, mem_vs_peer=1.0)
        res.row(section="arcface", impl="simcore.arcface_partial", dtype=name, size=size, ms=med["simcore"],
                vs_peer=med["simcore"] / med["reference"], vs_floor=med["simcore"] / med["floor"],
                extra_mb=mem["simcore"] / MB, mem_vs_peer=mem["simcore"] / mem["reference"] if mem["reference"] > 0 else None,
                check=f"{'ok' if ok else 'FAIL'} {max(errs):.1e}")
        for mb in sweep:
            key = f"simcore@{mb}"
            res.row(section="arcface", impl=f"simcore, class blocks <= {mb} MB", dtype=name, size=size, ms=med[key],
                    vs_peer=med[key] / med["reference"], vs_floor=med[key] / med["floor"], extra_mb=mem[key] / MB,
                    mem_vs_peer=mem[key] / mem["reference"] if mem["reference"] > 0 else None)
        if dtype == torch.bfloat16:
            res.targets.append((f"arcface bf16 {size}: time <= 1.25x the 3 GEMMs", med["simcore"] / med["floor"], 1.25, "le"))
            res.targets.append((f"arcface bf16 {size}: >= 2x faster than the reference (time ratio <= 0.5)",
                                med["simcore"] / med["reference"], 0.5, "le"))
            if mem["reference"] > 0:
                res.targets.append((f"arcface bf16 {size}: peak extra memory <= 5% of the reference's",
                                    mem["simcore"] / mem["reference"], 0.05, "le"))
        if dtype == torch.float16:  # float16 GEMM operands; one more pass per block than bf16 (the scale's max)
            res.targets.append((f"arcface fp16 {size}: time <= 1.35x the 3 float16 GEMMs", med["simcore"] / med["floor"],
                                1.35, "le"))
        return
    res.note(f"arcface {name}: did not fit at any size tried")


def _n(x):
    """10000 -> 10k, 1000000 -> 1M (compact sizes for the table)."""
    for div, suffix in ((10**6, "M"), (10**3, "k")):
        if x >= div and x % (div // 10) == 0:
            v = x / div
            return f"{v:g}{suffix}"
    return str(x)


# ----------------------------------------------------------------------------- cosine_topk
def faiss_gpu():
    """(faiss module or None, one line saying which)."""
    try:
        import faiss  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install)
        return None, f"faiss-gpu absent (import faiss failed: {type(exc).__name__}); peer is torch.topk(q @ db.T) only"
    if not hasattr(faiss, "StandardGpuResources"):
        return None, (f"faiss {getattr(faiss, '__version__', '?')} has no GPU support (faiss-cpu); "
                      "peer is torch.topk(q @ db.T) only")
    try:
        if faiss.get_num_gpus() < 1:
            return None, "faiss-gpu sees no GPU; peer is torch.topk(q @ db.T) only"
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in faiss.knn_gpu)
    except Exception as exc:  # noqa: BLE001
        return None, f"faiss-gpu unusable ({exc}); peer is torch.topk(q @ db.T) only"
    return faiss, f"faiss-gpu {faiss.__version__} with {faiss.get_num_gpus()} GPU(s)"


def _normalized_db(db, chunk=1 << 17):
    out = torch.empty_like(db)
    for s in range(0, db.shape[0], chunk):
        out[s:s + chunk] = F.normalize(db[s:s + chunk].float(), dim=1).to(db.dtype)
    return out


def exact_topk(q, db, k, chunk=1 << 16):
    """Float64 recomputation: (scores (n, k), indices (n, k), full (n, N)) of the cosine top-k,
    ties to the lower index (stable sort)."""
    qd = F.normalize(q.double(), dim=1)
    full = torch.empty(q.shape[0], db.shape[0], dtype=torch.float64, device=q.device)
    for s in range(0, db.shape[0], chunk):
        full[:, s:s + chunk] = qd @ F.normalize(db[s:s + chunk].double(), dim=1).T
    ref_s, ref_i = torch.sort(full, dim=1, descending=True, stable=True)
    return ref_s[:, :k].clone(), ref_i[:, :k].clone(), full


def check_topk_sample(res, label, scores, index, q, db, k, tol):
    """The exact top-k of the sampled queries: every returned score is the float64 score of its
    index within tol, the scores equal the reference's k best within tol, every index clearly
    inside the top-k (beyond tol of the k-th score) is returned, no duplicates, no NaN / -1."""
    ref_s, ref_i, full = exact_topk(q, db, k)
    problems = []
    if scores.shape != (q.shape[0], k) or index.shape != (q.shape[0], k):
        problems.append(f"shapes {tuple(scores.shape)} {tuple(index.shape)}")
    if not torch.isfinite(scores).all():
        problems.append("non-finite scores")
    if (index < 0).any() or (index >= db.shape[0]).any():
        problems.append("index out of range or -1")
    idx = index.clamp(0, db.shape[0] - 1)
    own = (full.gather(1, idx) - scores.double()).abs().max().item()
    vs_ref = (ref_s - scores.double()).abs().max().item()
    if not own <= tol:
        problems.append(f"returned scores off their index's score by {own:.2e}")
    if not vs_ref <= tol:
        problems.append(f"scores off the reference's k best by {vs_ref:.2e}")
    if (scores[:, 1:] > scores[:, :-1]).any():
        problems.append("scores not sorted")
    match = (index == ref_i).float().mean().item()
    missing = 0
    for r in range(q.shape[0]):
        clear = ref_i[r][ref_s[r] > ref_s[r, -1] + tol]
        missing += int((~torch.isin(clear, index[r])).sum())
        if index[r].unique().numel() != k:
            problems.append(f"duplicate indices in row {r}")
            break
    if missing:
        problems.append(f"{missing} clear top-k indices missing")
    if match < 0.99:
        problems.append(f"only {match:.4f} of indices equal the reference's")
    detail = (f"{q.shape[0]} queries: max |score - own float64| {own:.1e}, vs reference k best {vs_ref:.1e} "
              f"(tol {tol:g}), indices equal {match:.4f}")
    res.check(label, not problems, detail + ("" if not problems else "; " + "; ".join(problems)))
    return not problems, ref_i


def time_cosine(res, timer, device, gen, sz, dtype, faiss_mod, large=True):
    import simcore
    from simcore.search.tile_gemm import gemm_dtype
    from simcore.search.tiled_search import tile_shape

    name = str(dtype).replace("torch.", "")
    Q, N, D = sz["cos_Q"], sz["cos_N"], sz["cos_D"]
    db = randn((N, D), dtype, device, gen)
    q = randn((Q, D), torch.float32, device, gen)
    dbn = _normalized_db(db)  # the peers' index, built once (not timed)
    size = f"Q={_n(Q)} N={_n(N)} D={D}"
    # simcore's own tile schedule, GEMMs only (what the selection kernels add comes on top)
    nb, qb = tile_shape(device, Q)
    gdt = gemm_dtype(dtype, device, True, Q)  # the dtype simcore's tile GEMMs run in (CUDA: the database's)
    gname = str(gdt).replace("torch.", "")
    rate = res.ceilings.get(f"gemm_{gname}_flops")
    bw = res.ceilings.get("copy_bytes_per_s")
    gemm_floor = 2.0 * Q * N * D / rate if rate else None
    qg = F.normalize(q, dim=1).to(gdt)
    dbg = db if db.dtype == gdt else db.to(gdt)
    tile = torch.empty(qb * nb, dtype=gdt, device=device)

    def tile_gemms():
        for s in range(0, N, nb):
            blk = dbg[s:s + nb]
            for q0 in range(0, Q, qb):
                q1 = min(Q, q0 + qb)
                torch.mm(qg[q0:q1], blk.T, out=tile[:(q1 - q0) * blk.shape[0]].view(q1 - q0, blk.shape[0]))

    chunk = max(1, min(Q, sz["peer_scores_bytes"] // (N * dbn.element_size())))
    ks = [sz["cos_k"]] + ([sz["cos_k_large"]] if large else [])
    for k in ks:
        out = {}
        ps = torch.empty(Q, k, dtype=dbn.dtype, device=device)
        pi = torch.empty(Q, k, dtype=torch.int64, device=device)

        def run_simcore():
            out["simcore"] = simcore.cosine_topk(q, db, k)

        def run_topk():
            qn = F.normalize(q, dim=1).to(dbn.dtype)
            for c in range(0, Q, chunk):
                s, i = torch.topk(qn[c:c + chunk] @ dbn.T, k, dim=1)
                ps[c:c + chunk] = s
                pi[c:c + chunk] = i

        fns = {"simcore": run_simcore, "torch.topk": run_topk}
        if k == ks[0]:
            fns["tile GEMMs"] = tile_gemms
        faiss_res = None
        if faiss_mod is not None and k <= 2048 and dtype != torch.bfloat16:
            faiss_res = faiss_mod.StandardGpuResources()

            def run_faiss():
                qn = F.normalize(q, dim=1).to(dbn.dtype)
                out["faiss"] = faiss_mod.knn_gpu(faiss_res, qn, dbn, k, metric=faiss_mod.METRIC_INNER_PRODUCT)
            fns["faiss.knn_gpu"] = run_faiss
        elif faiss_mod is not None:
            res.note(f"faiss.knn_gpu not run for {name} k={k} (k > 2048 or bfloat16 unsupported)")
        slow = k != ks[0] or dtype == torch.float32
        try:
            med, _ = timer.group(fns, 1, sz["cos_repeat_slow"] if slow else sz["cos_repeat"])
        except Exception as exc:  # noqa: BLE001
            if "faiss.knn_gpu" not in fns:
                raise
            res.note(f"faiss.knn_gpu failed ({type(exc).__name__}: {exc}); timing without it")
            fns.pop("faiss.knn_gpu")
            med, _ = timer.group(fns, 1, sz["cos_repeat_slow"] if slow else sz["cos_repeat"])
        mem = peak_extra_bytes(run_simcore, device, subtract=Q * k * 12)  # minus the (Q, k) results

        # correctness on a fresh random sample of queries
        n_s = sz["cos_sample"] if k == ks[0] else sz["cos_sample_large"]
        pick = torch.randperm(Q, generator=gen, device=device)[:n_s]
        s_sc, i_sc = out["simcore"]
        ok, ref_i = check_topk_sample(res, f"cosine_topk {name} k={k} exact vs float64", s_sc[pick], i_sc[pick],
                                      q[pick], db, k, TOPK_SCORE_TOL[dtype])
        peer_recall = torch.stack([torch.isin(pi[p], ref_i[r]) for r, p in enumerate(pick.tolist())]).float().mean().item()
        bytes_floor = (N * D * db.element_size() + Q * D * 4 + Q * k * 12) / bw if bw else None
        ksz = f"{size} k={k}"
        peer = med["torch.topk"]
        if "faiss.knn_gpu" in med:
            res.row(section="cosine", impl="faiss.knn_gpu", dtype=name, size=ksz, ms=med["faiss.knn_gpu"],
                    vs_peer=med["faiss.knn_gpu"] / peer, vs_floor=med["faiss.knn_gpu"] / gemm_floor if gemm_floor else None)
        res.row(section="cosine", impl="torch.topk(q @ db.T), chunked", dtype=name, size=ksz, ms=peer, vs_peer=1.0,
                vs_floor=peer / gemm_floor if gemm_floor else None, check=f"recall {peer_recall:.4f}")
        if "tile GEMMs" in med:
            res.row(section="cosine", impl=f"tile GEMMs only {qb}x{nb} {gname}", dtype=name, size=size,
                    ms=med["tile GEMMs"], vs_peer=med["tile GEMMs"] / peer,
                    vs_floor=med["tile GEMMs"] / gemm_floor if gemm_floor else None,
                    check=f"{2.0 * Q * N * D / med['tile GEMMs'] / 1e12:.3g} TFLOP/s")
        sc = med["simcore"]
        res.row(section="cosine", impl="simcore.cosine_topk", dtype=name, size=ksz, ms=sc, vs_peer=sc / peer,
                vs_floor=sc / gemm_floor if gemm_floor else None, vs_bytes_floor=sc / bytes_floor if bytes_floor else None,
                extra_mb=mem / MB, check="exact" if ok else "FAIL", qps=Q / sc,
                vs_faiss=sc / med["faiss.knn_gpu"] if "faiss.knn_gpu" in med else None)
        if dtype == torch.float16 and k == ks[0]:
            if "faiss.knn_gpu" in med:
                res.targets.append((f"cosine fp16 k={k} throughput >= 1.5x faiss.knn_gpu (time ratio <= 0.667)",
                                    sc / med["faiss.knn_gpu"], 1 / 1.5, "le"))
            res.targets.append((f"cosine fp16 k={k} throughput >= 1.5x torch.topk(q @ db.T) (time ratio <= 0.667)"
                                + ("" if "faiss.knn_gpu" in med else " [faiss-gpu absent: torch peer instead]"),
                                sc / peer, 1 / 1.5, "le"))
            if gemm_floor:
                res.targets.append((f"cosine fp16 k={k} within 1.3x of the GEMM floor", sc / gemm_floor, 1.3, "le"))
        if dtype == torch.float16 and k != ks[0]:
            res.targets.append((f"cosine fp16 k={k} works (exact vs float64)", 1.0 if ok else 0.0, 1.0, "ge"))
        del out, ps, pi
        free_memory(device)
    if gemm_floor:
        res.note(f"cosine {name}: GEMM floor {gemm_floor * 1e3:.3g} ms (2QND at the {gname} rate, {rate / 1e12:.3g} TFLOP/s), "
                 f"bytes floor {((N * D * db.element_size() + Q * D * 4) / bw) * 1e3:.3g} ms; torch.topk peer in chunks of {chunk} queries")
    del db, q, dbn, dbg, qg, tile
    free_memory(device)


def time_cosine_small(res, timer, device, gen, sz):
    """Small batches (Q <= 64: tiles of at most 64 query rows, csrc/cuda/cosine_topk.cu): the
    (row, segment) blocks + merge against one block per row (tiled_search.SPLIT_SMALL_TILES off).
    Both must return identical scores and indices; the rows give the speed-up."""
    import simcore
    from simcore.search import tiled_search
    N, D, k = sz["cos_N"], sz["cos_D"], sz["cos_k"]
    db = randn((N, D), torch.float16, device, gen)
    for Q in (1, 16, 64):
        q = randn((Q, D), torch.float32, device, gen)
        out = {}

        def run(split):
            def f():
                saved = tiled_search.SPLIT_SMALL_TILES
                tiled_search.SPLIT_SMALL_TILES = split
                try:
                    out[split] = simcore.cosine_topk(q, db, k)
                finally:
                    tiled_search.SPLIT_SMALL_TILES = saved
            return f

        med, _ = timer.group({"split": run(True), "one block per row": run(False)}, 1, sz["cos_repeat"])
        same = torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
        size = f"Q={Q} N={_n(N)} D={D} k={k}"
        res.check(f"cosine_topk small batch {size}: split path == one-block path", same,
                  "scores and indices bit for bit" if same else "results differ")
        ok, _ = check_topk_sample(res, f"cosine_topk small batch {size} exact vs float64", out[True][0],
                                  out[True][1], q, db, k, TOPK_SCORE_TOL[torch.float16])
        one = med["one block per row"]
        res.row(section="cosine", impl="simcore.cosine_topk, one block per row", dtype="float16", size=size, ms=one,
                vs_peer=1.0)
        res.row(section="cosine", impl="simcore.cosine_topk, (row, segment) blocks", dtype="float16", size=size,
                ms=med["split"], vs_peer=med["split"] / one, check="exact" if ok and same else "FAIL")
        res.targets.append((f"cosine fp16 Q={Q}: split path no slower than one block per row (time ratio <= 1.0)",
                            med["split"] / one, 1.0, "le"))
    del db
    free_memory(device)


# ----------------------------------------------------------------------------- report
def device_info(device):
    import simcore
    from simcore import dispatch
    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                simcore=simcore.__version__, build_info=dict(dispatch.extension().build_info),
                simcore_cuda_available=simcore.cuda_available(), device=str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", l2_mb=round(getattr(p, "L2_cache_size", 0) / MB, 1),
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    fp16_reduced_precision_reduction=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                    bf16_reduced_precision_reduction=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


COLUMNS = [("impl", 34), ("dtype", 8), ("size", 26), ("ms", 9), ("vs_peer", 8), ("vs_floor", 9),
           ("vs_bytes_floor", 8), ("extra_mb", 9), ("mem_vs_peer", 8), ("check", 13)]
HEAD = {"impl": "impl", "dtype": "dtype", "size": "size", "ms": "median ms", "vs_peer": "x peer",
        "vs_floor": "x floor", "vs_bytes_floor": "x bytes", "extra_mb": "extra MB", "mem_vs_peer": "mem x pr",
        "check": "check"}


def _cell(key, row):
    v = row.get(key)
    if v is None:
        return "-"
    if key == "ms":
        return fmt_ms(v)
    if key in ("vs_peer", "vs_floor", "vs_bytes_floor"):
        return fmt_ratio(v)
    if key == "mem_vs_peer":
        return f"{v:.3f}"
    if key == "extra_mb":
        return f"{v:.1f}"
    return str(v)


def print_table(res, info, seed, elapsed):
    lines = ["", "=== bench_gpu table " + "=" * 60,
             f"{info.get('gpu', info['device'])}; torch {info['torch']} (CUDA {info['torch_cuda']}); simcore build "
             f"{info['build_info']}; seed {seed}; {elapsed:.0f} s"]
    ceil = res.ceilings
    if ceil:
        parts = [f"{k[5:-6]} GEMM {v / 1e12:.3g} TFLOP/s" for k, v in ceil.items() if k.startswith("gemm_")]
        if "copy_bytes_per_s" in ceil:
            parts.append(f"copy {ceil['copy_bytes_per_s'] / 1e9:.4g} GB/s (read + write)")
        lines.append("ceilings: " + ", ".join(parts))
    lines.append("x peer: time / the peer's (arcface: the plain-PyTorch reference; cosine: torch.topk(q @ db.T)); "
                 "x floor: time / the 3 GEMMs (arcface) or / 2QND at the measured GEMM rate (cosine); "
                 "x bytes: / bytes floor; extra MB: peak above inputs and outputs")
    for section in ("arcface", "cosine"):
        rows = [r for r in res.rows if r.get("section") == section]
        if not rows:
            continue
        lines.append(f"[{section}]")
        lines.append("  " + " ".join(f"{HEAD[k]:<{w}}" if k in ("impl", "dtype", "size") else f"{HEAD[k]:>{w}}"
                                     for k, w in COLUMNS))
        for r in rows:
            lines.append("  " + " ".join(f"{_cell(k, r):<{w}.{w}}" if k in ("impl", "dtype", "size")
                                         else f"{_cell(k, r):>{w}}" for k, w in COLUMNS))
    if res.targets:
        lines.append("[targets (issue 5), ratios from this run]")
        for text, value, limit, how in res.targets:
            ok = value <= limit if how == "le" else value >= limit
            shown = f"{value:.3f}" if how == "le" else ("yes" if ok else "no")
            miss = "" if ok or how != "le" else f"  (misses by {value / limit:.2f}x)"
            lines.append(f"  {'MET ' if ok else 'MISS'} {text}: {shown}{miss}")
    failed = [c for c in res.checks if not c["passed"]]
    lines.append(f"[checks] {len(res.checks) - len(failed)}/{len(res.checks)} passed"
                 + "".join(f"\n  FAIL {c['name']}: {c['detail']}" for c in failed))
    for n in res.notes:
        lines.append(f"  note: {n}")
    for e in res.errors:
        lines.append(f"  ERROR {e}")
    log("\n".join(lines))


def write_outputs(res, info, seed, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    data = dict(info=info, seed=seed, ceilings=res.ceilings, rows=res.rows, checks=res.checks,
                targets=[dict(text=t, value=v, limit=lim, how=h) for t, v, lim, h in res.targets],
                notes=res.notes, errors=res.errors)
    with open(os.path.join(out_dir, "bench_gpu.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    keys = sorted({k for r in res.rows for k in r})
    with open(os.path.join(out_dir, "bench_gpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in res.rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (dry run)")
    ap.add_argument("--sections", default="ceilings,arcface,cosine", help="comma-separated subset")
    ap.add_argument("--no-large-k", action="store_true", help="skip the large-k cosine rows")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh random seed (printed)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_gpu.json / .csv (default: $OUT)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("bench_gpu: no CUDA device here; for a dry run use --device cpu --small")
        return 2
    sz = SMALL if args.small else FULL
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    timer = Timer(device)
    res = Results()
    t0 = time.time()
    info = device_info(device)
    log("bench_gpu:", json.dumps(info))
    log(f"bench_gpu: seed {seed}, sizes {'small' if args.small else 'full'}")

    def section(label, fn):
        log(f"--- {label}")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (one section's failure must not hide the others)
            traceback.print_exc()
            res.errors.append(f"{label}: {type(exc).__name__}: {exc}".replace("\n", " ")[:300])
            free_memory(device)

    if "ceilings" in sections or {"arcface", "cosine"} & sections:
        section("ceilings", lambda: measure_ceilings(res, timer, device, gen, sz))
    if "arcface" in sections:
        for name in sz["arc_dtypes"]:
            dt = DTYPES[name]

            def arc(dt=dt):
                errs, tol = check_arcface(res, device, gen, sz, dt)
                time_arcface(res, timer, device, gen, sz, dt, errs, tol)
            section(f"arcface {name}", arc)
    if "cosine" in sections:
        faiss_mod, faiss_line = faiss_gpu() if device.type == "cuda" else (None, "CPU dry run: faiss.knn_gpu not tried")
        res.note(faiss_line)
        for name in sz["cos_dtypes"]:
            dt = DTYPES[name]
            section(f"cosine {name}", lambda dt=dt: time_cosine(res, timer, device, gen, sz, dt, faiss_mod,
                                                                 large=not args.no_large_k and dt == torch.float16))
        section("cosine small batches", lambda: time_cosine_small(res, timer, device, gen, sz))
    if args.out:
        try:
            write_outputs(res, info, seed, args.out)
        except OSError as exc:
            res.errors.append(f"writing {args.out}: {exc}")
    print_table(res, info, seed, time.time() - t0)
    bad = res.errors or any(not c["passed"] for c in res.checks)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
