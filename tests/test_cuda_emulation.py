"""The CUDA emulation itself (csrc/cuda/emulation, simcore._C_emu): its checks fail kernels that
break CUDA's rules, naming kernel, block and thread; the launch limits of a GPU fail launches; the
kernels give the same bits whatever order a block's threads run in; one switch turns it on."""
import importlib
import re
import subprocess
import sys

import pytest
import torch

import simcore
from conftest import emulation_built
from simcore import dispatch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not emulation_built(), reason="needs the CUDA emulation build: "
                                 "SIMCORE_BUILD_EMULATION=1 python setup.py build_ext --inplace")]


def _emu():
    return importlib.import_module("simcore._C_emu")


def test_a_correct_kernel_runs():
    assert _emu().emulation_selftest("block_sum") == ""  # sums checked in C++


def test_each_block_finds_its_shared_memory_poisoned():
    """A block that reads __shared__ memory it has not written finds 0xff bytes (NaN, -1), not the
    values the previous block left, which are often the right ones."""
    assert _emu().emulation_selftest("stale_shared") == ""  # values checked in C++


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", r"divergent_barrier_kernel, block \(1,0,0\), thread \(5,0,0\): returned while "
                          r"other threads of its block wait at a barrier \(63 of 64"),
    ("mixed_barriers", r"block \(0,0,0\), thread \(32,0,0\): waits at __syncthreads_count while .* __syncthreads_or"),
    ("missing_lane", r"thread \(32,0,0\): __shfl_xor_sync waits for lane 7, which has returned \(deadlock"),
    ("wrong_mask", r"thread \(16,0,0\): __ballot_sync waits for lane 0"),
    ("outside_mask", r"thread \(15,0,0\): __shfl_down_sync reads lane 16, outside its mask 0x0000ffff"),
])
def test_broken_synchronisation_is_an_error_naming_kernel_block_and_thread(case, message):
    with pytest.raises(RuntimeError, match="CUDA emulation: kernel .*" + message):
        _emu().emulation_selftest(case)


def _built_with_asan():
    return emulation_built() and bool(_emu().build_info.get("address_sanitizer"))


@pytest.mark.skipif(not _built_with_asan(), reason="needs the emulation built with ASan and run under it: "
                    "SIMCORE_SANITIZE=address,undefined bash .ci/cuda_emulation")
@pytest.mark.parametrize("case,report", [
    ("global_out_of_bounds", r"AddressSanitizer: heap-buffer-overflow"),
    # UBSan's object-size check sees a declared array first; ASan's redzone would otherwise
    ("shared_out_of_bounds", r"AddressSanitizer: global-buffer-overflow|runtime error: load of address .* "
                             r"with insufficient space for an object of type 'const int'"),
])
def test_the_sanitizers_report_an_out_of_bounds_access_naming_the_kernel(case, report):
    """ASan + UBSan see the emulated kernels' global and __shared__ accesses (in a child process: the
    report ends it). The child loads the module file alone: importing simcore (and torch) under ASan
    would cost CI half a minute per case."""
    load = ("import importlib.util as u, sys; s = u.spec_from_file_location('simcore._C_emu', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.emulation_selftest(sys.argv[2])")
    child = subprocess.run([sys.executable, "-c", load, _emu().__file__, case], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode != 0 and re.search(report, child.stderr), child.stderr[-3000:]
    assert f"in {case}_kernel" in child.stderr, child.stderr[-3000:]


@pytest.mark.parametrize("case,message", [
    ("too_many_threads", r"a block of \(1025,1,1\) threads exceeds a GPU's limits"),
    ("block_z_too_large", r"a block of \(1,1,65\) threads exceeds"),
    ("grid_y_too_large", r"grid \(1,65536,1\) is out of range"),
    ("empty_grid", "an empty grid or block"),
    ("too_much_dynamic_smem", "49153 bytes of dynamic shared memory"),
])
def test_launch_limits_fail_the_launch(case, message):
    """As on a GPU, a bad configuration is a launch error (cudaGetLastError), which the
    launching code turns into an exception (csrc/cuda/runtime.cu: check)."""
    error = _emu().emulation_selftest(case)
    assert error.startswith("CUDA emulation: kernel block_sum_kernel: ") and re.search(message, error), error


def test_one_switch_turns_the_cuda_path_on_and_off():
    cpu = torch.device("cpu")
    assert not dispatch.cuda_path(cpu) and not simcore.cuda_status().emulation
    with simcore.cuda_emulation():
        assert dispatch.cuda_path(cpu) and dispatch.executor(cpu) == 0
        status = simcore.cuda_status()
        assert status.emulation and status.built_with_cuda and "emulation is on" in status.reason
        assert "CUDA kernels emulated on the host (simcore._C_emu, cpu)" in simcore.implementation("cpu")
        with simcore.cuda_emulation(False):
            assert not dispatch.cuda_path(cpu)
    assert not dispatch.cuda_path(cpu) and not simcore.cuda_status().emulation
    with pytest.raises(ValueError, match="schedule must be one of"):
        with simcore.cuda_emulation(schedule="sideways"):
            pass


def test_the_emulated_module_takes_cpu_tensors_only():
    with simcore.cuda_emulation():
        with pytest.raises(ValueError, match="takes CPU tensors, got a cuda tensor"):
            dispatch.extension().inspect_tensor((0, 0, 0, "float32", "cuda", 0, (1,), (1,)))


def _margin_step(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(40, 300, generator=g) * 3).requires_grad_()
    w = torch.randn(520, 300, generator=g).requires_grad_()
    y = torch.randint(0, 520, (40,), generator=g)
    loss = simcore.arcface_partial(x, y, w, sample_rate=1.0, subcenters=1)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _topk(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(9, 40, generator=g)
    db = torch.randn(3000, 40, generator=g).half()
    db[100::300] = db[7]  # ties
    return simcore.cosine_topk(q, db, 700, block_size=1000)


@pytest.mark.parametrize("op", [_margin_step, _topk])
def test_the_result_does_not_depend_on_the_thread_order(op):
    """A shared-memory race whose outcome depends on the order of the racing threads shows as
    different bits under another order (the kernels' only atomics are integer: their results do
    not depend on it). Forward, reverse and two seeded random orders."""
    results = []
    for schedule, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        with simcore.cuda_emulation(schedule=schedule, seed=seed):
            results.append(op(5))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
