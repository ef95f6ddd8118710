"""Mutation check of the CUDA tests: seeds faults into csrc/cuda, one at a time, in a scratch
copy of the tree, rebuilds the CUDA emulation (simcore._C_emu) and runs the emulated CUDA
tests against each. Every mutant must be caught (a failing test); one that survives means a
missing test.

    python tests/cuda_mutations.py [--only NAME] [--tests FILE ...]

Needs the test extras and simcore._C built in place (or installed), as the tests do. The first
build takes a few minutes; each mutant recompiles one .cu file and relinks, using the commands
setup.py printed for the first build. Prints one line per mutant and exits 1 if any survives.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file under csrc/cuda, original text (exactly once), the fault)
MUTANTS = {
    "block_reduce_without_barrier": (
        "margin_softmax.cu",
        "  if (lane == 0) shared[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) shared[warp] = v;\n"),
    "wrong_warp_count": (
        "margin_softmax.cu",
        "const int warps = (blockDim.x + 31) >> 5;",
        "const int warps = (blockDim.x + 31) >> 6;"),
    "ballot_prefix_lane_mask": (
        "cosine_topk.cu",
        "__popc(ballot & ((1u << lane) - 1u))",
        "__popc(ballot & ((2u << lane) - 1u))"),
    "histogram_not_cleared_between_passes": (
        "cosine_topk.cu",
        "for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;",
        "if (shift == 24) for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;"),
    "tie_rule_reversed": (  # keeps the highest-index entries equal to the k-th score, not the lowest
        "cosine_topk.cu",
        "(eq && sh.eq_seen + eq_rank < keep_eq)",
        "(eq && sh.eq_seen + eq_rank >= static_cast<long long>(sh.hist[T & 255u]) - keep_eq)"),
    "last_row_block_skipped": (
        "row_optimizer.cu",
        "const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;",
        "const int64_t blocks = n / kRowsPerBlock;"),
    "last_column_segment_skipped": (
        "cosine_topk.cu",
        "const int64_t nseg = (nb + kThreads - 1) / kThreads;",
        "const int64_t nseg = nb / kThreads;"),
}

# Fast files first: with -x a caught mutant stops at its first failure.
TESTS = ["tests/test_cuda_emulation.py", "tests/test_row_optimizer.py", "tests/test_margin_softmax.py",
         "tests/test_cosine_topk.py", "tests/test_margin_family.py"]


def _scratch():
    work = tempfile.mkdtemp(prefix="simcore-mutations-")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), work)
    for name in ("csrc", "simcore", "tests"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(work, name),
                        ignore=shutil.ignore_patterns("_C_emu*.so", "__pycache__"))
    if not glob.glob(os.path.join(work, "simcore", "_C.*.so")):
        installed = subprocess.run([sys.executable, "-c", "import simcore._C as m; print(m.__file__)"],
                                   cwd="/", capture_output=True, text=True).stdout.strip()
        if not installed:
            sys.exit("cuda_mutations: simcore._C is neither built in place nor installed")
        shutil.copy(installed, os.path.join(work, "simcore"))
    return work


def _first_build(work):
    """Builds simcore._C_emu in place; returns the compile command of each .cu and the link command."""
    env = dict(os.environ, SIMCORE_CUDA="0", SIMCORE_BUILD_EMULATION="only")
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:] + "\ncuda_mutations: the emulation build failed")
    compiles, link = {}, None
    for line in out.stdout.splitlines():
        words = shlex.split(line) if line.strip() else []
        if "-x" in words and "-include" in words:
            compiles[os.path.basename(words[words.index("-c") + 1])] = words
        elif "-shared" in words and any("_C_emu" in w for w in words):
            link = words
    if link is None or not compiles:
        sys.exit("cuda_mutations: could not find the compile and link commands in the build output")
    return compiles, link


def _object(work, compiles, source):
    cmd = compiles[source]
    return os.path.join(work, cmd[cmd.index("-o") + 1])


def _relink(work, link):
    subprocess.run(link, cwd=work, check=True, capture_output=True)
    built = link[link.index("-o") + 1]
    shutil.copy(os.path.join(work, built), os.path.join(work, "simcore", os.path.basename(built)))


def _mutant_build(work, compiles, link, source):
    """Recompiles `source` (mutated) and relinks; returns a function that restores the clean build."""
    obj = _object(work, compiles, source)
    shutil.copy(obj, obj + ".clean")
    subprocess.run(compiles[source], cwd=work, check=True, capture_output=True)
    _relink(work, link)

    def restore():
        shutil.move(obj + ".clean", obj)
        _relink(work, link)
    return restore


def _run_tests(work, tests):
    """True when the emulated CUDA tests fail (the mutant is caught)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "cuda", *tests]
    try:
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return True, "timeout (a hang is caught too)"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return out.returncode != 0, (lines[0] if lines else out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MUTANTS), action="append", help="run these mutants only")
    parser.add_argument("--tests", nargs="+", default=TESTS, help="test files (default: the kernel tests)")
    args = parser.parse_args()
    work = _scratch()
    try:
        compiles, link = _first_build(work)
        survivors = []
        for name in args.only or MUTANTS:
            source, original, fault = MUTANTS[name]
            path = os.path.join(work, "csrc", "cuda", source)
            with open(path) as f:
                text = f.read()
            if text.count(original) != 1:
                sys.exit(f"cuda_mutations: {name}: the original text is not in {source} exactly once")
            start = time.time()
            with open(path, "w") as f:
                f.write(text.replace(original, fault))
            try:
                restore = _mutant_build(work, compiles, link, source)
                caught, detail = _run_tests(work, args.tests)
                restore()
            finally:
                with open(path, "w") as f:
                    f.write(text)
            print(f"{name:40s} {'caught' if caught else 'SURVIVED'} in {time.time() - start:5.0f} s: {detail}",
                  flush=True)
            if not caught:
                survivors.append(name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
