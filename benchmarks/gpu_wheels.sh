#!/usr/bin/env bash
# The Python packages that simcore's GPU check needs and the device image lacks, as wheels for its
# Python (3.12, manylinux x86-64) in .whl/ at the repository root (ignored by git). Run it here, then
# name .whl in the device call's carry; benchmarks/gpu_check.sh installs them on the PYTHONPATH.
#   kornia (+ kornia_rs): simcore.isc.augment, so tests/test_augment_cuda.py and `--augment-on device`
# faiss-gpu is not here: its wheel (135 MB) is over the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl kornia==0.9.0 kornia_rs==0.2.0
ls -l .whl
