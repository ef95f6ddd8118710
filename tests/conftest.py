"""Shared test fixtures: logged seeds, poisoned outputs, tolerances."""
import contextlib
import importlib
import math
import os
import random

import pytest
import torch

# Tests never fall back to the references silently: a missing or broken
# extension is an error (SIMCORE_BACKEND=reference still forces them).
os.environ.setdefault("SIMCORE_BACKEND", "compiled")


def pytest_configure(config):
    # `pytest -m timm` (the README's timm tests) asks for the timm tests: there, a timm that
    # does not import fails them instead of skipping them (tests/test_timm.py).
    if config.getoption("markexpr", "") == "timm":
        os.environ["SIMCORE_REQUIRE_TIMM"] = "1"


def pytest_collection_modifyitems(config, items):
    # A test that skips without a GPU, or runs on `cuda_device` (a GPU, or the CUDA emulation),
    # also carries the `cuda` marker: `pytest -m cuda` (and `-k cuda`, which
    # benchmarks/gpu_check.sh runs) selects it whatever its name.
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()) or any(
                m.name == "skipif" and "CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed so a failure can be replayed with SIMCORE_TEST_SEED."""
    value = int(os.environ.get("SIMCORE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"\n[seed] {request.node.nodeid}: SIMCORE_TEST_SEED={value}")
    return value


@pytest.fixture
def generator(seed):
    return torch.Generator().manual_seed(seed)


def poisoned(shape, dtype=torch.float32, device="cpu"):
    """An output buffer full of NaN (or the dtype's max for integers), so unwritten elements show."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf, so NaN never passes."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def subprocess_env(**updates):
    """Environment for a child Python that imports the same simcore as this process.
    Run children with ``cwd=TESTS_DIR`` (or a tmp dir), never the repository root,
    whose source folder holds no compiled extension."""
    import simcore
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(simcore.__file__)), **updates)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def hardware_only(why):
    """For a test only a real GPU can answer (the CUDA emulation cannot): skipped without one, saying why."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA device: {why}")


def emulation_built():
    """Whether simcore._C_emu, the CUDA kernels compiled for the host (SIMCORE_BUILD_EMULATION=1), is here."""
    try:
        importlib.import_module("simcore._C_emu")
    except ImportError:
        return False
    return True


# The thread order the emulated blocks run in (forward, reverse, random): CI runs the suite under more than one.
EMULATION_SCHEDULE = os.environ.get("SIMCORE_TEST_EMULATION_SCHEDULE", "forward")


@pytest.fixture
def cuda_device():
    """The device of simcore's CUDA path: the current GPU where there is one, else the CPU
    with the CUDA emulation on (csrc/cuda run by simcore._C_emu), so one test body serves
    both. Within the test, ``simcore.cuda_emulation(False)`` runs the CPU kernels."""
    if torch.cuda.is_available():
        yield torch.device("cuda", torch.cuda.current_device())
        return
    if not emulation_built():
        pytest.skip("needs a CUDA device, or the CUDA emulation build: "
                    "SIMCORE_BUILD_EMULATION=1 python setup.py build_ext --inplace")
    import simcore  # here: SIMCORE_BACKEND is set above before simcore is imported
    with simcore.cuda_emulation(schedule=EMULATION_SCHEDULE, seed=1234):
        yield torch.device("cpu")


@contextlib.contextmanager
def no_host_syncs(device):
    """On a GPU, any host synchronisation inside fails (torch's sync-debug mode); the CPU has none to check."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def synchronize(device):
    """torch.cuda.synchronize on a GPU; nothing on the CPU (the emulation runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_params(m1=1.0, m2=0.5, m3=0.0, s=64.0, e=1e-4, cam_power=0.0, filter_threshold=math.inf, curricular=0,
                  curricular_t=0.0):
    """The 9-tuple ms_lse_block / ms_grad_block take (simcore.margin.engine.MarginSpec.kernel_params)."""
    return (m1, m2, m3, s, e, cam_power, filter_threshold, curricular, curricular_t)


# Engine options that force the class-blocked two-pass path: blocks of 256 classes.
BLOCKED = dict(block_classes=256)


@pytest.fixture
def engine_opts():
    """``engine_opts(**fields)`` runs the rest of the test under
    ``simcore.margin.engine.engine_options(**fields)`` (calls nest; all undone at teardown)."""
    from simcore.margin.engine import engine_options
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(engine_options(**fields))


@contextlib.contextmanager
def backend(name):
    """Run the block with simcore.set_backend(name), then restore the previous backend."""
    import simcore
    previous = simcore.get_backend()
    simcore.set_backend(name)
    try:
        yield
    finally:
        simcore.set_backend(previous)


# --------------------------------------------------------------------------- spawned gloo worlds
def _rank_main(rank, worker, tmp, args):
    """A spawned rank: ``worker(rank, tmp, *args)``, then an exit without interpreter teardown.

    Ranks that had finished their work and saved their results were seen, now and then,
    to die with SIGABRT ("terminate called without an active exception", the message of a
    joinable std::thread being destroyed) while the interpreter shut down. Skipping that
    teardown with ``os._exit(0)`` once the worker returned keeps a finished rank finished;
    faulthandler writes each rank's Python stacks to ``tmp/rank<r>.stacks`` should a signal
    still come, and ``spawn_ranks`` shows them."""
    import faulthandler
    import sys
    with open(os.path.join(tmp, f"rank{rank}.stacks"), "w") as stacks:
        faulthandler.enable(stacks, all_threads=True)
        worker(rank, tmp, *args)  # an exception reaches the parent through torch.multiprocessing
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def spawn_ranks(worker, nprocs, tmp, args=(), deadline_s=240):
    """Run ``worker(rank, tmp, *args)`` on ``nprocs`` spawned processes; fail on an error,
    a signal (with the ranks' Python stacks) or a hang past ``deadline_s``."""
    import time
    import torch.multiprocessing as mp
    tmp = str(tmp)
    ctx = mp.start_processes(_rank_main, args=(worker, tmp, tuple(args)), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=5):  # raises if a rank raised or died
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"{nprocs} ranks still running after {deadline_s} s (hang)")
    except mp.ProcessExitedException as exc:
        stacks = []
        for rank in range(nprocs):
            path = os.path.join(tmp, f"rank{rank}.stacks")
            if os.path.exists(path) and os.path.getsize(path):
                with open(path) as f:
                    stacks.append(f"--- rank {rank}\n{f.read()}")
        raise AssertionError(f"{exc}\n" + "\n".join(stacks)) from exc
