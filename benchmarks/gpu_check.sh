#!/usr/bin/env bash
# Issue 5 in one call on a GPU machine: build simcore's extension in place against
# this machine's torch, run the CUDA tests, train two tiny `simcore train` runs on the
# GPU (bf16 and fp16, augmentation on the device), time everything with
# benchmarks/bench_gpu.py, run compute-sanitizer memcheck over a small subset of
# the CUDA tests and racecheck + synccheck over the top-k kernels at small sizes
# (tile scan, radix select, compaction), and print a summary and the benchmark
# table last. Within 6 minutes on an H100/H200 (BUDGET_S), so a 15-minute device
# budget leaves room for a rerun.
#
#   bash benchmarks/gpu_check.sh        # from anywhere; runs in the repository root
#
# Logs and numbers go to $OUT (the device tool's folder; ./gpu_check_out when OUT
# is unset): info.log, build.log, tests.log, bench.log, sanitizer.log (memcheck,
# racecheck, synccheck in turn), bench_gpu.json, bench_gpu.csv (7 files: the
# device tool brings back at most 8).
# Each log is written as it goes (tee), so it survives a timeout.
#
# Environment:
#   BUDGET_S=360     seconds for the whole script; every step is capped by what is left
#   PYTHON=python3   the interpreter that holds torch
#   SKIP_BUILD=1     reuse the extension already built in place (a second call on a warm machine)
#   BUILD_WITHOUT_PYPROJECT=1  go straight to the fallback build (scratch copy of setup.py + csrc/)
#   SKIP_MEMCHECK=1  leave compute-sanitizer out (all three tools)
#   BENCH_ARGS=...   extra arguments for bench_gpu.py (e.g. "--sections cosine --no-large-k")
#   TEST_K=cuda      the pytest -k expression selecting the CUDA tests
#
# Python packages the device image lacks travel as wheels: `bash benchmarks/gpu_wheels.sh` here
# fills .whl/ (kornia, for augmentation on the device), and the device call names .whl in carry;
# this script installs them into a scratch folder on the PYTHONPATH.
#
# Order: the benchmark runs before the sanitizers so that a slow sanitizer can only
# cost its own step its time, and the benchmark stops early enough to leave the
# sanitizers SANITIZE_S; the table is printed again at the very end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-360}"
SANITIZE_S=110  # kept for memcheck (60 s), racecheck and synccheck (25 s each)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, ahead of any installed simcore
export SIMCORE_BACKEND=compiled                       # never fall back to the references silently
WHEELS_SITE=/tmp/simcore-wheels
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WHEELS_SITE" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WHEELS_SITE"
fi
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
  "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("kornia", "kornia_rs", "pillow", "h5py", "tensorboard", "hypothesis", "pytest", "pytest-timeout",
             "setuptools", "pybind11", "faiss-gpu", "faiss-cpu"):
    try:
        print(f"{name} {md.version(name)}", end=" | ")
    except md.PackageNotFoundError:
        print(f"{name} MISSING", end=" | ")
print()
EOF
} 2>&1 | tee "$OUT/info.log"

"$PY" -c "import kornia" 2>/dev/null \
  || fail "kornia does not import: the device-augmentation tests and train runs will fail (carry .whl: gpu_wheels.sh)"

# ---------------------------------------------------------------- 2. build in place
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  note "build: skipped (SKIP_BUILD=1), using the extension already in simcore/"
else
  t0=$SECONDS
  "$PY" -c "import setuptools, pybind11; print('setuptools', setuptools.__version__, '| pybind11', pybind11.__version__)" \
    2>&1 | tee "$OUT/build.log"
  # sm_90 machine code + sm_90 PTX; --force: never reuse objects from an older tree
  if [ "${BUILD_WITHOUT_PYPROJECT:-0}" != 1 ]; then
    SIMCORE_CUDA=1 SIMCORE_CUDA_ARCHS=90 timeout "$(cap 150)" \
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
    (cd "$scratch" && SIMCORE_CUDA=1 SIMCORE_CUDA_ARCHS=90 timeout "$(cap 150)" \
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
print(simcore.cuda_status())
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
# -k cuda over every test file: each test that skips without a GPU (tests/conftest.py gives it the
# cuda marker, which -k matches too), and the CPU tests of the CUDA build and status
TEST_FILES="tests"
TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=120"
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$(cap 150)" "$PY" -m pytest -q -p no:cacheprovider --maxfail=20 $TIMEOUT_OPT $TEST_FILES \
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

# ---------------------------------------------------------------- 3b. simcore train on the GPU
# issue 15's GPU path, which no CPU run covers: the DataLoader's pinned memory, augmentation
# batched on the device, bf16 autocast and fp16 with the GradScaler that also steps the head's
# fused row optimizer, the CUDA class sampler; two drip stages of 10 steps on 48 random PNGs.
t0=$SECONDS
TRAIN_TMP=$(mktemp -d)
{
  "$PY" - "$TRAIN_TMP/images" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
os.makedirs(sys.argv[1])
for i in range(48):
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(os.path.join(sys.argv[1], f"im{i:02d}.png"))
EOF
  for precision in bf16 fp16; do
    timeout "$(cap 60)" "$PY" -m simcore.isc.cli train "$TRAIN_TMP/images" -o "$TRAIN_TMP/run-$precision" \
      --backbone smallcnn --dim 32 --image-size 32 --drip 24,ALL --batch-size 16,16 --steps 10,10 \
      --sample-rate 0.5 --precision "$precision" --augment-on device --device cuda --workers 2 --no-progress \
      || echo "simcore train --precision $precision: FAILED"
  done
} >>"$OUT/tests.log" 2>&1
if grep -q "simcore train --precision .*: FAILED" "$OUT/tests.log"; then
  fail "simcore train on the GPU (bf16, fp16, device augmentation): FAILED (end of tests.log)"
else
  note "simcore train on the GPU (bf16, fp16, device augmentation): ok in $((SECONDS - t0)) s"
fi
rm -rf "$TRAIN_TMP"

# ---------------------------------------------------------------- 4. benchmark
t0=$SECONDS
# shellcheck disable=SC2086
bench_s=$(($(left) - 5 - SANITIZE_S))
((bench_s > 150)) && bench_s=150
((bench_s < 1)) && bench_s=1
timeout "$bench_s" "$PY" benchmarks/bench_gpu.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  note "bench_gpu.py: ok in $((SECONDS - t0)) s (bench.log, bench_gpu.json, bench_gpu.csv)"
elif [ "$rc" -eq 124 ]; then
  fail "bench_gpu.py: TIMEOUT after $((SECONDS - t0)) s (bench.log has the rows measured so far)"
else
  fail "bench_gpu.py: rc $rc after $((SECONDS - t0)) s (a check failed or a section raised: see the table / bench.log)"
fi

# ---------------------------------------------------------------- 5. compute-sanitizer
# memcheck over a subset of the CUDA tests; racecheck (shared-memory hazards) and synccheck
# (barrier misuse) over cosine_topk's update kernels at small sizes: the tile scan, the
# block-wide prefix sums, the warp-per-candidate rescoring, the radix select and the compaction,
# float32 and rescored half; Q = 5 takes the small-tile path (update_kernel_score_segments +
# update_kernel_merge_segments), Q = 80 the one-block-per-row update_kernel.
SAN_TMP=$(mktemp -d)
cat >"$SAN_TMP/topk_small.py" <<'EOF'
import torch, simcore
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for Q, N, k, block in ((5, 3000, 20, 1000), (5, 3000, 600, 1500), (80, 3000, 600, 1500)):  # several compactions per query
        q, db = torch.randn(Q, 40, generator=g), torch.randn(N, 40, generator=g).to(dtype)
        s, i = simcore.cosine_topk(q.cuda(), db.cuda(), k, block_size=block)
        s_cpu, i_cpu = simcore.cosine_topk(q, db, k)
        assert (i.cpu() == i_cpu).float().mean() >= 0.99 and (s.cpu() - s_cpu).abs().max() < 1e-5
print("topk_small: ok")
EOF

# sanitize TOOL SECONDS ARGS...: one compute-sanitizer run, appended to sanitizer.log.
sanitize() {
  local tool=$1 want=$2 log="$SAN_TMP/$1.log" t0=$SECONDS rc summary tests
  shift 2
  if [ "$(left)" -lt 15 ]; then
    note "$tool: skipped, only $(left) s of the budget left"
    return
  fi
  # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
  # accesses past a tensor's end instead of inside a pooled block.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap "$want")" compute-sanitizer --tool "$tool" \
    --error-exitcode 86 --print-limit 40 "$@" >"$log" 2>&1
  rc=$?
  { echo "=== compute-sanitizer --tool $tool (rc $rc)"; cat "$log"; } >>"$OUT/sanitizer.log"
  tail -6 "$log"
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
  tests=$(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran|topk_small: ok" "$log" | tail -1 | tr -d '=')
  if grep -qiE "device not supported|not supported on this|unable to (find|initialize)|error 999" "$log" \
      && ! grep -qE "[0-9]+ passed|topk_small: ok" "$log"; then
    note "$tool: compute-sanitizer REFUSED the device (gVisor machines do; sanitizer.log): not run"
  elif [ "$rc" -eq 86 ]; then
    fail "$tool: ERRORS found: ${summary:-see sanitizer.log} (${tests})"
  elif [ "$rc" -eq 124 ]; then
    fail "$tool: TIMEOUT after $((SECONDS - t0)) s (${tests:-no test summary}; sanitizer.log)"
  elif [ "$rc" -eq 0 ]; then
    note "$tool: clean, ${summary:-no summary line} (${tests}) in $((SECONDS - t0)) s"
  else
    fail "$tool: rc $rc, ${summary:-no summary line} (${tests:-no test summary}; sanitizer.log)"
  fi
}

if [ "${SKIP_MEMCHECK:-0}" = 1 ]; then
  note "sanitizers: skipped (SKIP_MEMCHECK=1)"
elif ! command -v compute-sanitizer >/dev/null; then
  note "sanitizers: compute-sanitizer not on PATH, skipped"
else
  # shellcheck disable=SC2086
  sanitize memcheck 60 "$PY" -m pytest -q -p no:cacheprovider -x $TIMEOUT_OPT \
    tests/test_cosine_topk.py tests/test_margin_softmax.py tests/test_margin_family.py tests/test_row_optimizer.py \
    -k "cuda and not large_k and not half_database and not near_ties and not streaming and (not float64_reference or arcface or magface) and (not matches_reference or 64)"
  # only simcore's update kernel is instrumented (kns: a substring of its mangled name)
  sanitize racecheck 25 --racecheck-report hazard --kernel-name kns=update_kernel "$PY" "$SAN_TMP/topk_small.py"
  sanitize synccheck 25 --kernel-name kns=update_kernel "$PY" "$SAN_TMP/topk_small.py"
fi
rm -rf "$SAN_TMP"

finish
