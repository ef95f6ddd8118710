#!/usr/bin/env bash
# Issue 5 in one call on a GPU machine: build simcore's extension in place against
# this machine's torch, run the CUDA tests, time everything with
# benchmarks/bench_gpu.py, run compute-sanitizer memcheck over a small subset of
# the CUDA tests, and print a summary and the benchmark table last.
#
#   bash benchmarks/gpu_check.sh        # from anywhere; runs in the repository root
#
# Logs and numbers go to $OUT (the device tool's folder; ./gpu_check_out when OUT
# is unset): info.log, build.log, tests.log, bench.log, memcheck.log,
# bench_gpu.json, bench_gpu.csv (7 files: the device tool brings back at most 8).
# Each log is written as it goes (tee), so it survives a timeout.
#
# Environment:
#   BUDGET_S=540     seconds for the whole script; every step is capped by what is left
#   PYTHON=python3   the interpreter that holds torch
#   SKIP_BUILD=1     reuse the extension already built in place (a second call on a warm machine)
#   BUILD_WITHOUT_PYPROJECT=1  go straight to the fallback build (scratch copy of setup.py + csrc/)
#   SKIP_MEMCHECK=1  leave compute-sanitizer out
#   BENCH_ARGS=...   extra arguments for bench_gpu.py (e.g. "--sections cosine --no-large-k")
#   TEST_K=cuda      the pytest -k expression selecting the CUDA tests
#
# Order: the benchmark runs before memcheck so that a slow sanitizer can only cost
# the memcheck step its time; the table is printed again at the very end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, ahead of any installed simcore
export SIMCORE_BACKEND=compiled                       # never fall back to the references silently
START=$SECONDS
SUMMARY=()
STATUS=0

left() { echo $((BUDGET_S - (SECONDS - START))); }
# cap N: at most N seconds, and never past the budget (5 s kept for the summary)
cap() {
  local want=$1 l
  l=$(($(left) - 5))
  ((l < want)) && want=$l
  ((want < 1)) && want=1
  echo "$want"
}
note() { SUMMARY+=("$1"); echo "== $1"; }
fail() { note "$1"; STATUS=1; }

finish() {
  echo
  echo "=== gpu_check summary ($((SECONDS - START)) s; logs in OUT: $(cd "$OUT" && ls | tr '\n' ' '))"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  if [ -f "$OUT/bench.log" ] && grep -q '^=== bench_gpu table' "$OUT/bench.log"; then
    sed -n '/^=== bench_gpu table/,$p' "$OUT/bench.log"
  else
    echo "  (no benchmark table: see bench.log)"
  fi
  exit "$STATUS"
}

# ---------------------------------------------------------------- 1. machine
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')   kernel: $(uname -r)   cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/info.log"

# ---------------------------------------------------------------- 2. build in place
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  note "build: skipped (SKIP_BUILD=1), using the extension already in simcore/"
else
  t0=$SECONDS
  "$PY" -c "import setuptools, pybind11; print('setuptools', setuptools.__version__, '| pybind11', pybind11.__version__)" \
    2>&1 | tee "$OUT/build.log"
  # sm_90 machine code + sm_90 PTX; --force: never reuse objects from an older tree
  if [ "${BUILD_WITHOUT_PYPROJECT:-0}" != 1 ]; then
    SIMCORE_CUDA=1 SIMCORE_CUDA_ARCHS=90 timeout "$(cap 300)" \
      "$PY" setup.py -q build_ext --inplace --force -j 16 >>"$OUT/build.log" 2>&1
    rc=$?
  else
    rc=1
  fi
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    # A setuptools older than pyproject.toml's metadata needs (license expressions: >= 77)
    # refuses to read it; the extension itself needs only setup.py and csrc/, so build those
    # in a scratch folder and copy the module in.
    echo "build in place failed (rc $rc); retrying in a scratch copy without pyproject.toml" | tee -a "$OUT/build.log"
    scratch=$(mktemp -d)
    cp -r setup.py csrc "$scratch/" && mkdir -p "$scratch/simcore"
    (cd "$scratch" && SIMCORE_CUDA=1 SIMCORE_CUDA_ARCHS=90 timeout "$(cap 300)" \
      "$PY" setup.py -q build_ext --inplace --force -j 16) >>"$OUT/build.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] && { cp "$scratch"/simcore/_C*.so simcore/ || rc=1; }
    rm -rf "$scratch"
  fi
  grep -E "warning|error" "$OUT/build.log" | grep -v "^ *|" | tail -5
  if [ $rc -ne 0 ]; then
    tail -30 "$OUT/build.log"
    fail "build: FAILED (rc $rc after $((SECONDS - t0)) s, build.log)"
    finish
  fi
  note "build: ok in $((SECONDS - t0)) s (SIMCORE_CUDA=1 SIMCORE_CUDA_ARCHS=90)"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/info.log"
import json, torch, simcore
from simcore import dispatch
ext = dispatch.extension()
print("simcore", simcore.__version__, "from", simcore.__file__)
print("build_info", json.dumps(dict(ext.build_info)), "| cuda_available", simcore.cuda_available(),
      "| cuda_device_count (extension)", ext.cuda_device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    m = torch.backends.cuda.matmul
    print("matmul: allow_tf32", m.allow_tf32, "| fp16 reduced-precision reduction",
          m.allow_fp16_reduced_precision_reduction, "| bf16 reduced-precision reduction",
          m.allow_bf16_reduced_precision_reduction)
if not (ext.build_info["cuda"] and simcore.cuda_available()):
    raise SystemExit("simcore's CUDA kernels are not usable here (build_info or device)")
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  fail "import: simcore's CUDA kernels are not usable (info.log)"
fi

# ---------------------------------------------------------------- 3. CUDA tests
TEST_FILES="tests/test_build.py tests/test_cosine_topk.py tests/test_margin_softmax.py tests/test_margin_family.py"
TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=120"
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$(cap 180)" "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 $TIMEOUT_OPT $TEST_FILES \
  -k "${TEST_K:-cuda}" 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|error|FAILED|ERROR|Timeout" | tail -25
rc=${PIPESTATUS[0]}
line=$(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran" "$OUT/tests.log" | tail -1 | tr -d '=')
if [ "$rc" -eq 0 ]; then
  note "tests (-k ${TEST_K:-cuda}): ok: ${line# } in $((SECONDS - t0)) s"
  if grep -qE "[0-9]+ skipped" <<<"$line"; then note "tests: some CUDA tests SKIPPED on a GPU machine (tests.log, -ra lists why)"; fi
elif [ "$rc" -eq 124 ]; then
  fail "tests: TIMEOUT after $((SECONDS - t0)) s (tests.log)"
else
  fail "tests: FAILED (rc $rc): ${line# } (tests.log)"
fi

# ---------------------------------------------------------------- 4. benchmark
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$(cap 300)" "$PY" benchmarks/bench_gpu.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  note "bench_gpu.py: ok in $((SECONDS - t0)) s (bench.log, bench_gpu.json, bench_gpu.csv)"
elif [ "$rc" -eq 124 ]; then
  fail "bench_gpu.py: TIMEOUT after $((SECONDS - t0)) s (bench.log has the rows measured so far)"
else
  fail "bench_gpu.py: rc $rc after $((SECONDS - t0)) s (a check failed or a section raised: see the table / bench.log)"
fi

# ---------------------------------------------------------------- 5. compute-sanitizer memcheck
if [ "${SKIP_MEMCHECK:-0}" = 1 ]; then
  note "memcheck: skipped (SKIP_MEMCHECK=1)"
elif ! command -v compute-sanitizer >/dev/null; then
  note "memcheck: compute-sanitizer not on PATH, skipped"
elif [ "$(left)" -lt 60 ]; then
  note "memcheck: skipped, only $(left) s of the budget left"
else
  t0=$SECONDS
  # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
  # accesses past a tensor's end instead of inside a pooled block.
  # shellcheck disable=SC2086
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 240)" compute-sanitizer --tool memcheck --error-exitcode 86 \
    --print-limit 40 "$PY" -m pytest -q -p no:cacheprovider -x $TIMEOUT_OPT \
    tests/test_cosine_topk.py tests/test_margin_softmax.py tests/test_margin_family.py \
    -k "cuda and not large_k and (not float64_reference or arcface or magface)" 2>&1 | tee "$OUT/memcheck.log" | tail -15
  rc=${PIPESTATUS[0]}
  summary=$(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1 | sed 's/^=* *//')
  tests=$(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran" "$OUT/memcheck.log" | tail -1 | tr -d '=')
  if grep -qiE "device not supported|not supported on this|unable to (find|initialize)|error 999" "$OUT/memcheck.log" \
      && ! grep -qE "[0-9]+ passed" "$OUT/memcheck.log"; then
    note "memcheck: compute-sanitizer REFUSED the device (gVisor machines do; memcheck.log): not run"
  elif [ "$rc" -eq 86 ]; then
    fail "memcheck: ERRORS found: ${summary:-see memcheck.log} (${tests})"
  elif [ "$rc" -eq 124 ]; then
    fail "memcheck: TIMEOUT after $((SECONDS - t0)) s (${tests:-no test summary}; memcheck.log)"
  elif [ "$rc" -eq 0 ]; then
    note "memcheck: clean, ${summary:-no summary line} (${tests}) in $((SECONDS - t0)) s"
  else
    fail "memcheck: rc $rc, ${summary:-no summary line} (${tests:-no test summary}; memcheck.log)"
  fi
fi

finish
