"""The compiled core is present, shares torch's OpenMP runtime, and checks its boundary."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import simcore
from simcore import dispatch

from conftest import kernel_params


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


# --------------------------------------------------------------------------- the bindings' dtype and device switch
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _margin_call(kernel, dtypes, device=None):
    """One small call of a margin kernel with some argument dtypes replaced (`dtypes`), the first
    tensor optionally packed as if it lived on `device`; returns the output it wrote."""
    ext, T = dispatch.extension(), dispatch.tensor_arg
    first = T if device is None else (lambda t: T(t)[:4] + (device, 0) + T(t)[6:])
    dt = lambda name: dtypes.get(name, F32)  # noqa: E731
    # every tensor named: a packed tuple does not keep its tensor alive
    tcol, vecs, norms = torch.tensor([0, 1, 4, 9]), [torch.zeros(4) for _ in range(4)], torch.rand(5) + 0.5
    if kernel == "normalize_rows":
        src, out = torch.randn(5, 8).to(dt("src")), torch.full((5, 8), math.nan, dtype=dt("out"))
        ext.ms_normalize_rows(first(src), None, T(out), T(norms), 1e-12, 1)
    elif kernel == "project_rows":
        u, v, out = torch.randn(5, 8), torch.randn(5, 8).to(dt("v")), torch.full((5, 8), math.nan, dtype=dt("out"))
        ext.ms_project_rows(first(u), T(v), T(norms), T(out), None, 1e-12, 1)
    elif kernel == "lse_block":
        cos, out = (torch.rand(4, 5) * 2 - 1).to(dt("cos")), vecs[0]
        ext.ms_lse_block(first(cos), T(tcol), 0, kernel_params(), None, *map(T, vecs), 1)
    else:
        out = (torch.rand(4, 5) * 2 - 1).to(dt("cos"))  # in place
        ext.ms_grad_block(first(out), T(tcol), 0, kernel_params(), None, *map(T, vecs[:3]), 1)
    return out


@pytest.mark.parametrize("kernel,dtypes", [
    ("normalize_rows", dict(src=s, out=o)) for s in (F32, F16, BF16) for o in (F32, F16, BF16)] + [
    ("project_rows", dict(v=v, out=o)) for v in (F32, F16, BF16) for o in (F32, F16, BF16)] + [
    ("lse_block", dict(cos=F32)), ("grad_block", dict(cos=F32))])
def test_margin_kernels_take_the_dtypes_python_passes(kernel, dtypes):
    """Inputs, gradients and GEMM operands float32/float16/bfloat16 (float16 operands since issue 14:
    EngineOptions.lowp_gemms), cosine blocks float32."""
    out = _margin_call(kernel, dtypes)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kernel,dtypes,message", [
    ("normalize_rows", dict(src=F64), "src must be float32, float16 or bfloat16, got float64"),
    ("normalize_rows", dict(out=F64), "out must be float32, bfloat16 or float16 .*, got float64"),
    ("project_rows", dict(v=F64), "v must be float32, bfloat16 or float16 .*, got float64"),
    ("project_rows", dict(out=F64), "out must be float32, float16 or bfloat16, got float64"),
    ("lse_block", dict(cos=F16), "cos must be float32, got float16"),
    ("lse_block", dict(cos=BF16), "cos must be float32, got bfloat16"),
    ("grad_block", dict(cos=BF16), "cos must be float32, got bfloat16"),
    ("grad_block", dict(cos=F64), "cos must be float32, got float64"),
])
def test_margin_kernels_reject_the_dtypes_python_never_passes(kernel, dtypes, message):
    """No kernel is compiled for these: a clear TypeError, not a crash."""
    with pytest.raises(TypeError, match=message):
        _margin_call(kernel, dtypes)


@pytest.mark.skipif(dispatch.extension().build_info["cuda"], reason="this build has the CUDA kernels")
@pytest.mark.parametrize("kernel", ["normalize_rows", "project_rows", "lse_block", "grad_block", "targets",
                                    "subcenter_max", "subcenter_expand", "topk_prepare", "topk_update"])
def test_cuda_tensors_without_cuda_build_say_so(kernel):
    """Every binding goes through the one device switch, which names the missing CUDA build."""
    ext, T = dispatch.extension(), dispatch.tensor_arg
    cuda_arg = lambda t: T(t)[:4] + ("cuda", 0) + T(t)[6:]  # noqa: E731
    z, i = torch.zeros(4, 4), torch.zeros(4, dtype=torch.int64)
    calls = {
        "targets": lambda: ext.ms_targets(cuda_arg(i), T(i), 4, T(i), 1),
        "subcenter_max": lambda: ext.ms_subcenter_max(cuda_arg(z), 1, T(z), T(z), 1),
        "subcenter_expand": lambda: ext.ms_subcenter_expand(cuda_arg(z), T(z), 1, T(z), 1),
        "topk_prepare": lambda: ext.cosine_topk_prepare_block(cuda_arg(z), T(z), T(z), T(i), 0, True, 0.0, 1),
        "topk_update": lambda: ext.cosine_topk_update(cuda_arg(z), *[T(z)] * 10, 0, 0, 1, -1, False, 1),
    }
    with pytest.raises(ValueError, match="simcore was built without CUDA"):
        calls[kernel]() if kernel in calls else _margin_call(kernel, {}, device="cuda")


@pytest.mark.parametrize("threads", [0, -1, 5000])
def test_cosine_topk_checks_the_thread_count(threads):
    ext, T = dispatch.extension(), dispatch.tensor_arg
    z = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="num_threads must be a thread count for CPU tensors"):
        ext.cosine_topk_prepare_block(T(z), T(z), T(z), T(z), 0, True, 0.0, threads)
