"""Benchmark conventions.

Every benchmark group holds simcore, the peer a user would otherwise pick and,
where it applies, the floor (the GEMMs alone at the same sizes), each run in
the same pytest session. Rows carry `role` ("simcore", "peer", "floor") and
peak memory in `extra_info`; the summary printed at the end gives ratios, never
a lone time.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory_bytes(fn):
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what was
    held before (tensors the kernels allocate, workspaces included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@pytest.fixture
def measure(benchmark):
    """measure(fn, impl=..., role=..., items=N) times fn and records its peak memory;
    ``items`` (queries, samples) gives a throughput column."""
    def run(fn, *, impl, role, items=None, rounds=5):
        benchmark.extra_info.update(impl=impl, role=role, peak_bytes=peak_memory_bytes(fn))
        if items is not None:
            benchmark.extra_info["items"] = items
        return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks or session.disabled:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or bench.name, []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("simcore benchmark ratios (median time; ratio < 1 means faster than the peer)")
    for group, rows in groups.items():
        by_role = {}
        for r in rows:
            by_role.setdefault(r.extra_info.get("role"), []).append(r)
        peer = (by_role.get("peer") or [None])[0]
        floor = (by_role.get("floor") or [None])[0]
        write(f"\n[{group}]")
        write(f"  {'impl':<34}{'median ms':>11}{'vs peer':>9}{'vs floor':>10}{'items/s':>12}{'peak MB':>10}{'mem vs peer':>13}")
        for r in sorted(rows, key=lambda r: ("floor", "peer", "simcore").index(r.extra_info.get("role", "simcore"))
                        if r.extra_info.get("role") in ("floor", "peer", "simcore") else 3):
            t = r.stats.median
            info = r.extra_info
            vs_peer = f"{t / peer.stats.median:.2f}x" if peer else "-"
            vs_floor = f"{t / floor.stats.median:.2f}x" if floor else "-"
            rate = f"{info['items'] / t:,.0f}" if info.get("items") else "-"
            mem = info.get("peak_bytes", 0)
            peer_mem = peer.extra_info.get("peak_bytes", 0) if peer else 0
            mem_ratio = f"{mem / peer_mem:.3f}" if peer_mem else "-"
            write(f"  {info.get('impl', r.name):<34}{t * 1e3:>11.2f}{vs_peer:>9}{vs_floor:>10}{rate:>12}"
                  f"{mem / 2**20:>10.1f}{mem_ratio:>13}")
