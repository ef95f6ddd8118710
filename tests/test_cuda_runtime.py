"""simcore.cuda_status() and the device guards: the kernels run on their tensors' device, and
a call whose tensors span two devices, or a machine whose CUDA cannot run simcore's kernels,
gets one clear error."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import simcore
from simcore import dispatch

from conftest import backend, hardware_only

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _built_with_cuda():
    return dispatch.extension().build_info["cuda"]


def test_cuda_status_says_why():
    status = simcore.cuda_status()
    assert isinstance(status, dispatch.CudaStatus) and status is simcore.cuda_status()  # probed once
    assert status.available == simcore.cuda_available() == (status.reason == "")
    assert status.built_with_cuda == _built_with_cuda()
    if status.built_with_cuda:
        assert status.runtime_version == dispatch.extension().build_info["cuda_runtime_version"] > 0
    if not torch.cuda.is_available():  # e.g. this CPU-only CI: built with CUDA or not, a reason
        assert not status.available and status.reason
    if status.available:
        assert status.device_count >= 1 and status.driver_version > 0


def test_cuda_probe_without_a_device():
    probe = dispatch.extension().cuda_probe()
    assert set(probe) == {"runtime_version", "driver_version", "device_count", "error"}
    if not _built_with_cuda():
        assert probe["error"] == "simcore was built without CUDA"
    elif probe["device_count"] == 0:  # no driver or no GPU: the runtime's own words
        assert probe["error"]


def test_ops_on_unusable_cuda_raise_one_clear_error(monkeypatch):
    if not _built_with_cuda():
        pytest.skip("a build without CUDA never runs CUDA kernels (references instead)")
    broken = dataclasses.replace(simcore.cuda_status(), available=False, driver_version=12020,
                                 reason="CUDA driver version is insufficient for CUDA runtime version")
    monkeypatch.setattr(dispatch, "_cuda_status", broken)
    assert not simcore.cuda_available()
    with pytest.raises(RuntimeError, match="cannot run here: CUDA driver version is insufficient.*set_backend"):
        dispatch.use_compiled(torch.device("cuda", 0))
    assert dispatch.use_compiled(torch.device("cpu"))  # CPU kernels are unaffected
    with backend("reference"):
        assert not dispatch.use_compiled(torch.device("cuda", 0))


def test_cuda_stream_is_the_tensors_devices():
    with pytest.raises(ValueError, match="with its index"):
        dispatch.cuda_stream(torch.device("cuda"))  # "the current device" is not a tensor's device
    with pytest.raises(ValueError, match="with its index"):
        dispatch.cuda_stream(torch.device("cpu"))


def _fake_cuda(t, index):
    """t packed as if it lived on cuda:index (the checks reject it before any pointer is read)."""
    packed = list(dispatch.tensor_arg(t))
    packed[4:6] = ["cuda", index]
    return tuple(packed)


def test_boundary_rejects_tensors_on_two_devices():
    ext, A = dispatch.extension(), dispatch.tensor_arg
    labels, sampled, out = torch.tensor([1, 2]), torch.tensor([1, 2, 5]), torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"sampled is on the wrong device \(cuda:1; the call runs on cpu\)"):
        ext.ms_targets(A(labels), _fake_cuda(sampled, 1), 10, A(out), 1)
    with pytest.raises(ValueError, match="needs its device index"):
        ext.inspect_tensor(_fake_cuda(labels, -1))


def test_boundary_refuses_cuda_calls_when_cuda_is_unusable():
    # The C++ checks on its own (the core never trusts Python): with no usable device, a call on
    # CUDA tensors stops at the device guard with the probe's reason, before any pointer is read.
    if not _built_with_cuda() or simcore.cuda_available():
        pytest.skip("needs a CUDA build on a machine where CUDA cannot run")
    ext = dispatch.extension()
    labels, sampled, out = torch.tensor([1, 2]), torch.tensor([1, 2, 5]), torch.empty(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="simcore's CUDA kernels cannot run: .*cuda_status"):
        ext.ms_targets(_fake_cuda(labels, 0), _fake_cuda(sampled, 0), 10, _fake_cuda(out, 0), 0)


# ---- CUDA (skipped without a GPU)
def _loss_and_grads(x, y, w):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = simcore.arcface_partial(x, y, w, sample_rate=1.0)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@hardware_only("device guards across devices (the current device and the tensors' own)")
def test_cuda_runs_on_the_tensors_device_not_the_current_one(generator):
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    x, w = torch.randn(20, 32, generator=generator), torch.randn(300, 32, generator=generator)
    y = torch.randint(300, (20,), generator=generator)
    expect = _loss_and_grads(x, y, w)
    got = _loss_and_grads(x.to(last), y.to(last), w.to(last))
    assert torch.cuda.current_device() == 0  # restored
    for g, e in zip(got, expect):
        assert g.device == last and torch.allclose(g.cpu(), e, rtol=1e-4, atol=1e-6)
    q, db = F.normalize(x, dim=1), w.half()
    s, i = simcore.cosine_topk(q.to(last), db.to(last), 7)
    s_cpu, i_cpu = simcore.cosine_topk(q, db, 7)
    assert torch.cuda.current_device() == 0
    assert s.device == last and torch.equal(i.cpu(), i_cpu) and torch.allclose(s.cpu(), s_cpu, atol=1e-6)
    torch.cuda.synchronize(last)  # no illegal address left behind


@hardware_only("tensors on two GPUs")
@two_gpus
def test_cuda_tensors_on_two_devices_are_rejected(generator):
    ext, A = dispatch.extension(), dispatch.tensor_arg
    labels, sampled = torch.tensor([1, 2], device="cuda:0"), torch.tensor([1, 2, 5], device="cuda:1")
    out = torch.empty(2, dtype=torch.int64, device="cuda:0")
    stream = dispatch.cuda_stream(labels.device)
    with pytest.raises(ValueError, match=r"sampled is on the wrong device \(cuda:1; the call runs on cuda:0\)"):
        ext.ms_targets(A(labels), A(sampled), 10, A(out), stream)
    x, w = torch.randn(8, 16, device="cuda:0"), torch.randn(50, 16, device="cuda:1")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        simcore.arcface_partial(x, torch.arange(8, device="cuda:0"), w)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        simcore.cosine_topk(x, w, 3)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)  # both contexts still healthy
