"""The compiled core is present, shares torch's OpenMP runtime, and checks its boundary."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import simcore
from simcore import dispatch


def test_compiled_extension_loads():
    # No silent fallback: the suite fails when the extension did not build.
    ext = dispatch.extension()
    assert set(ext.build_info) >= {"cuda", "compiler"}


def _nvcc_present():
    return os.environ.get("SIMCORE_CUDA") != "0" and (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


@pytest.mark.skipif(not _nvcc_present(), reason="no nvcc here (or SIMCORE_CUDA=0), so no CUDA build is expected")
def test_cuda_sources_were_compiled():
    # Where nvcc exists (CI), `pip install .` must have compiled csrc/cuda.
    assert dispatch.extension().build_info["cuda"]


def test_version_and_cuda_query():
    assert simcore.__version__ == "0.1.0"
    assert simcore.cuda_available() == (torch.cuda.is_available() and dispatch.extension().build_info["cuda"])


def _env(**updates):
    # Subprocesses import the same simcore as this process, from outside the source folder.
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(simcore.__file__)), **updates)


def test_single_openmp_runtime(tmp_path):
    code = ("import simcore, torch; from simcore import _C;"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l or 'libomp' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=_env()).stdout
    libs = eval(out.strip().splitlines()[-1])
    assert len(libs) <= 1, f"two OpenMP runtimes loaded: {libs}"


def test_backend_switch(monkeypatch):
    assert simcore.get_backend() == "compiled"  # tests/conftest.py
    previous = simcore.get_backend()
    try:
        simcore.set_backend("reference")
        assert not dispatch.use_compiled(torch.device("cpu"))
        simcore.set_backend("auto")
        assert dispatch.use_compiled(torch.device("cpu"))
    finally:
        simcore.set_backend(previous)
    with pytest.raises(ValueError, match="backend must be one of"):
        simcore.set_backend("fast")


def test_backend_env_var(tmp_path):
    code = "import simcore; print(simcore.get_backend())"
    env = _env(SIMCORE_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "reference"


def test_boundary_reads_views():
    ext = dispatch.extension()
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]
    info = ext.inspect_tensor(dispatch.tensor_arg(t))
    assert info == {"dtype": "float32", "shape": (3, 2), "strides": (4, 1), "contiguous": False}


@pytest.mark.parametrize("field,value,message", [
    (2, 8, "past the end of its storage"),          # storage too small for the view
    (0, 0, "null data pointer"),
    (3, "complex64", "unsupported dtype"),
    (4, "mps", "unsupported device"),
])
def test_boundary_rejects_bad_views(field, value, message):
    ext = dispatch.extension()
    packed = list(dispatch.tensor_arg(torch.zeros(4, 4)))
    packed[field] = value
    with pytest.raises((ValueError, TypeError), match=message):
        ext.inspect_tensor(tuple(packed))


def test_boundary_rejects_misaligned_and_outside_pointers():
    ext = dispatch.extension()
    packed = list(dispatch.tensor_arg(torch.zeros(4, 4)))
    misaligned = list(packed)
    misaligned[0] += 2
    with pytest.raises(ValueError, match="aligned"):
        ext.inspect_tensor(tuple(misaligned))
    before = list(packed)
    before[0] -= 4
    with pytest.raises(ValueError, match="outside its storage"):
        ext.inspect_tensor(tuple(before))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_source = pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "setup.py")),
                                  reason="runs setup.py from a source checkout")


def _run_setup(tmp_path, env_updates, prelude=""):
    code = (prelude + "import sys; sys.argv = ['setup.py', 'build_ext', '--build-temp', sys.argv[1]];"
            "import runpy; runpy.run_path('setup.py', run_name='__main__')")
    env = dict(os.environ, SIMCORE_CUDA="0", **env_updates)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@needs_source
def test_build_without_compiler_says_so(tmp_path):
    out = _run_setup(tmp_path, {"CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"})
    assert out.returncode != 0
    assert "simcore build error: no C++ compiler found" in out.stderr
    assert "Traceback" not in out.stderr


@needs_source
def test_build_without_pybind11_says_so(tmp_path):
    out = _run_setup(tmp_path, {}, prelude="import sys; sys.modules['pybind11'] = None;")
    assert out.returncode != 0
    assert "simcore build error: pybind11 is not installed" in out.stderr
    assert "Traceback" not in out.stderr
