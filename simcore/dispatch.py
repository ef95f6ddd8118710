"""The one place that decides which implementation runs an op.

Rule: a tensor on a CUDA device runs the compiled CUDA kernel, a CPU tensor the
compiled C++ kernel; ``set_backend("reference")`` or ``SIMCORE_BACKEND=reference``
forces the plain-PyTorch references (for debugging). If the extension failed to
build, ``"auto"`` falls back to the references with a warning, while
``SIMCORE_BACKEND=compiled`` (what CI sets) turns that into an error.
"""
from __future__ import annotations

import os
import warnings

import torch

_BACKENDS = ("auto", "compiled", "reference")
_backend = os.environ.get("SIMCORE_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"SIMCORE_BACKEND must be one of {_BACKENDS}, got {_backend!r}")

_ext = None
_ext_error: BaseException | None = None
_warned = False


def _load_extension():
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from simcore import _C
            _ext = _C
        except ImportError as exc:  # not built, or built for another Python
            _ext_error = exc
    return _ext


def extension():
    """The compiled module ``simcore._C``; raises ImportError with the cause if it is missing."""
    ext = _load_extension()
    if ext is None:
        package_dir = os.path.dirname(os.path.abspath(__file__))
        hint = "reinstall with `pip install .` and read the build output"
        if os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
            hint = ("simcore was imported from its source folder, which holds no build: run "
                    "`python setup.py build_ext --inplace`, or run from another folder (or `pytest` "
                    "rather than `python -m pytest`) to use the installed package")
        raise ImportError(f"simcore's compiled extension is not available ({_ext_error}); {hint}") from _ext_error
    return ext


def set_backend(name: str) -> None:
    """Choose ``"auto"`` (compiled kernels), ``"compiled"`` (compiled kernels, error if
    missing) or ``"reference"`` (plain-PyTorch references everywhere)."""
    global _backend
    name = str(name).strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def cuda_available() -> bool:
    """True when the extension was built with CUDA and a CUDA device is usable."""
    ext = _load_extension()
    return bool(ext is not None and ext.build_info["cuda"] and ext.cuda_device_count() > 0
                and torch.cuda.is_available())


def use_compiled(device: torch.device) -> bool:
    """Whether an op on ``device`` should run the compiled kernel (else the reference)."""
    global _warned
    if _backend == "reference":
        return False
    ext = _load_extension()
    if ext is None:
        if _backend == "compiled":
            extension()  # raises with the cause
        if not _warned:
            warnings.warn(f"simcore: compiled extension unavailable ({_ext_error}); "
                          "running the slow plain-PyTorch references", RuntimeWarning, stacklevel=3)
            _warned = True
        return False
    if device.type == "cuda":
        if not ext.build_info["cuda"]:
            if _backend == "compiled":
                raise RuntimeError("simcore was built without CUDA; rebuild where nvcc is available")
            return False
        return True
    return device.type == "cpu"


def implementation(device="cpu") -> str:
    """One line naming what simcore's ops run on ``device``, e.g. ``simcore 0.1.0: compiled
    kernels (simcore._C, cpu)`` or ``... plain-PyTorch references (...; slow)``. Asks the same
    rule the ops use, so a missing extension also shows its fallback warning here."""
    from simcore import __version__
    device = torch.device(device)
    head = f"simcore {__version__}"
    if use_compiled(device):
        return f"{head}: compiled kernels (simcore._C, {device.type})"
    reason = "backend 'reference'" if _backend == "reference" else "compiled extension unavailable"
    return f"{head}: plain-PyTorch references ({reason}, {device.type}; slow)"


def num_threads() -> int:
    """CPU kernels use as many threads as torch does."""
    return torch.get_num_threads()


def tensor_arg(t: torch.Tensor):
    """Pack a tensor for the C++ boundary (csrc/bindings/tensor_arg.cpp checks every field)."""
    storage = t.untyped_storage()
    return (t.data_ptr(), storage.data_ptr(), storage.nbytes(), str(t.dtype).replace("torch.", ""),
            t.device.type, t.device.index if t.device.index is not None else -1,
            tuple(t.shape), tuple(t.stride()))


def cuda_stream(device: torch.device) -> int:
    """Handle of torch's current stream on ``device`` (kernels run on it)."""
    return torch.cuda.current_stream(device).cuda_stream
