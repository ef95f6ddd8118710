"""The one place that decides which implementation runs an op.

Rule: a tensor on a CUDA device runs the compiled CUDA kernel, a CPU tensor the
compiled C++ kernel; ``set_backend("reference")`` or ``SIMCORE_BACKEND=reference``
forces the plain-PyTorch references (for debugging). If the extension failed to
build, ``"auto"`` falls back to the references with a warning, while
``SIMCORE_BACKEND=compiled`` (what CI sets) turns that into an error.

CUDA emulation: ``SIMCORE_CUDA_EMULATION=1`` (or ``with cuda_emulation():``) makes CPU
tensors take the CUDA path: the CUDA kernels of ``simcore._C_emu`` (csrc/cuda compiled for
the host, built with ``SIMCORE_BUILD_EMULATION=1``) and the Python orchestration that CUDA
tensors take, which asks :func:`cuda_path`. Only torch's own ops stay CPU ops.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings

import torch

_BACKENDS = ("auto", "compiled", "reference")
_backend = os.environ.get("SIMCORE_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"SIMCORE_BACKEND must be one of {_BACKENDS}, got {_backend!r}")

_emulation_env = os.environ.get("SIMCORE_CUDA_EMULATION", "0").strip() or "0"
if _emulation_env not in ("0", "1"):
    raise ValueError(f"SIMCORE_CUDA_EMULATION must be 0 or 1, got {_emulation_env!r}")
_emulation = _emulation_env == "1"
_SCHEDULES = ("forward", "reverse", "random")

_modules: dict = {}  # module name -> the module, or the ImportError it gave
_ext = None
_ext_error: BaseException | None = None
_warned = False


def _load_extension():
    """simcore._C, or simcore._C_emu while the CUDA emulation is on (each imported once)."""
    global _ext, _ext_error
    name = "_C_emu" if _emulation else "_C"
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"simcore.{name}")
        except ImportError as exc:  # not built, or built for another Python
            _modules[name] = exc
    got = _modules[name]
    ext, error = (None, got) if isinstance(got, ImportError) else (got, None)
    if ext is not _ext or error is not _ext_error:  # no global is written on the cached path, which
        _ext, _ext_error = ext, error               # torch.compile traces (its guards would fail)
    return ext


def extension():
    """The compiled module ``simcore._C``; raises ImportError with the cause if it is missing."""
    ext = _load_extension()
    if ext is None:
        package_dir = os.path.dirname(os.path.abspath(__file__))
        hint = "reinstall with `pip install .` and read the build output"
        if _emulation:
            hint = ("the CUDA emulation is on (SIMCORE_CUDA_EMULATION=1); build it with "
                    "`SIMCORE_BUILD_EMULATION=1 python setup.py build_ext --inplace`")
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


@dataclasses.dataclass(frozen=True)
class CudaStatus:
    """Whether simcore's CUDA kernels can run here, and if not, why (``simcore.cuda_status()``)."""
    built_with_cuda: bool  # the extension was compiled with nvcc
    runtime_version: int   # the CUDA runtime linked into simcore, e.g. 13000 for 13.0 (0: none)
    driver_version: int    # the newest CUDA the installed driver supports (0: no driver)
    device_count: int      # devices that runtime sees
    available: bool        # the CUDA kernels can be used on CUDA tensors
    reason: str            # why not ("" when available)
    emulation: bool = False  # CPU tensors run the CUDA kernels on the host (cuda_emulation())


_cuda_status: CudaStatus | None = None


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _probe_cuda() -> CudaStatus:
    if _emulation:
        ok = _load_extension() is not None
        why = ("the CUDA emulation is on: CPU tensors run the CUDA kernels on the host (simcore._C_emu)" if ok
               else f"the CUDA emulation is on but simcore._C_emu is unavailable ({_ext_error})")
        return CudaStatus(ok, 0, 0, 0, False, why, emulation=True)
    ext = _load_extension()
    if ext is None:
        return CudaStatus(False, 0, 0, 0, False, f"simcore's compiled extension is unavailable ({_ext_error})")
    p = ext.cuda_probe()
    built = bool(ext.build_info["cuda"])
    reason = ""
    if not built:
        reason = "simcore was built without CUDA (rebuild where nvcc is available)"
    elif p["error"] and not p["driver_version"]:
        reason = f"no NVIDIA driver was found (the CUDA runtime says: {p['error']})"
    elif p["error"]:
        reason = (f"{p['error']} (simcore's CUDA runtime {_version(p['runtime_version'])}, "
                  f"the driver supports CUDA {_version(p['driver_version'])})")
        if p["driver_version"] < p["runtime_version"]:
            reason += ("; update the NVIDIA driver, or rebuild simcore with an nvcc no newer than "
                       "the driver (python setup.py build_ext, or pip install .)")
    elif not torch.cuda.is_available():
        reason = "torch sees no CUDA device (a CPU build of torch?)"
    return CudaStatus(built, p["runtime_version"], p["driver_version"], p["device_count"], not reason, reason)


def cuda_status() -> CudaStatus:
    """What simcore's CUDA kernels found on this machine: probed once (the driver and device
    count, no CUDA context is created); ``reason`` says why they cannot run when they cannot.
    Whether each device also holds a kernel image is checked at the first op on it."""
    global _cuda_status
    if _cuda_status is None or _cuda_status.emulation != _emulation:
        _cuda_status = _probe_cuda()
    return _cuda_status


def cuda_available() -> bool:
    """True when the extension was built with CUDA and a CUDA device is usable
    (``cuda_status().reason`` says why not)."""
    return cuda_status().available


def cuda_emulation_enabled() -> bool:
    """Whether CPU tensors take the CUDA path (:func:`cuda_emulation`, ``SIMCORE_CUDA_EMULATION=1``)."""
    return _emulation


@contextlib.contextmanager
def cuda_emulation(enabled: bool = True, schedule: str = "forward", seed: int = 0):
    """Within the block, CPU tensors take the CUDA path (emulated kernels, CUDA orchestration).
    ``schedule`` orders a block's threads between synchronisations ("forward", "reverse", or
    "random" drawn from ``seed``): a result that changes with it is a race."""
    global _emulation
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    previous = _emulation
    _emulation = bool(enabled)
    try:
        if _emulation:
            extension().emulation_schedule(schedule, int(seed))
        yield
    finally:
        if _emulation:
            extension().emulation_schedule("forward", 0)
        _emulation = previous
        _load_extension()


def cuda_path(device) -> bool:
    """Whether tensors on ``device`` take the CUDA path: CUDA devices, and CPU tensors while
    the CUDA emulation is on. The one predicate the Python orchestration asks."""
    device = torch.device(device)
    return device.type == "cuda" or (_emulation and device.type == "cpu")


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
        status = cuda_status()
        if not status.available:  # one clear error before any launch can corrupt the CUDA context
            raise RuntimeError(f"simcore's CUDA kernels cannot run here: {status.reason}. "
                               "simcore.set_backend('reference') runs the plain-PyTorch references instead")
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
        if _emulation and device.type == "cpu":
            return f"{head}: CUDA kernels emulated on the host (simcore._C_emu, cpu)"
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
    """Handle of torch's current stream on ``device``, the tensors' device (kernels run on it;
    the C++ makes that device current for the launch). Not the current device's stream: a
    stream of another device would order nothing."""
    device = torch.device(device)
    if _emulation and device.type == "cpu":
        return 0  # the emulated kernels run synchronously, in order: the null stream
    if device.type != "cuda" or device.index is None:
        raise ValueError(f"cuda_stream needs a CUDA device with its index (a tensor's .device), got {device}")
    return torch.cuda.current_stream(device).cuda_stream


def executor(device: torch.device) -> int:
    """The ``exec`` argument of the kernels that take one: the CPU thread count
    (:func:`num_threads`) for CPU tensors, torch's current stream (:func:`cuda_stream`) for CUDA."""
    device = torch.device(device)
    return cuda_stream(device) if cuda_path(device) else num_threads()


# Imported here, not on first use: a first use inside torch.compile would trace the import.
_load_extension()
