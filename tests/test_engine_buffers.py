"""The CPU engine's kept buffers (simcore.margin.engine: the normalised-row scratch and the
recycled row gradient) change no result, and a gradient is never recycled while anything holds
it: a Python name, a view, autograd's .grad, a piece of an accumulation."""
import math

import pytest
import torch

import simcore
from simcore.margin import engine
from simcore.reference.margin_softmax import margin_softmax_loss


@pytest.fixture
def recycle_small(monkeypatch):
    """Recycle gradients of any size, so that small heads exercise it."""
    monkeypatch.setattr(engine._CpuGradients, "MIN_BYTES", 0)


def make_head(seed, optimizer="sgd"):
    torch.manual_seed(seed)
    head = simcore.PartialMarginHead(300, 16, margin=0.5, scale=16.0, sample_rate=0.4, optimizer=optimizer, lr=0.1,
                                     momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 16, generator=g), torch.randint(0, 300, (12,), generator=g)
    y[3] = y[0]
    return head, x, y


def forward_backward(head, x, y, seed):
    loss = head(x.clone().requires_grad_(True), y, sampled=simcore.sample_classes(
        y, 300, math.ceil(0.4 * 300), torch.Generator().manual_seed(seed)))
    loss.backward()
    (ids, rows), = head._pending
    return ids, rows


def test_recycled_gradient_is_reused_only_when_free(recycle_small, seed):
    head, x, y = make_head(seed)
    _, rows = forward_backward(head, x, y, seed)
    first = rows.data_ptr()
    del rows
    head.step()
    head.zero_grad()
    _, rows = forward_backward(head, x, y, seed + 1)
    assert rows.data_ptr() == first                      # nothing held it: made from the last one
    kept, copy = rows, rows.clone()                      # a Python name holds it now
    view = rows[1:]
    del rows
    head.step()
    head.zero_grad()
    _, rows = forward_backward(head, x, y, seed + 2)
    assert rows.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, copy) and view.data_ptr() == kept[1:].data_ptr()


def test_view_alone_keeps_the_gradient(recycle_small, seed):
    head, x, y = make_head(seed)
    _, rows = forward_backward(head, x, y, seed)
    view, copy = rows[2:5], rows[2:5].clone()
    del rows
    head.step()
    head.zero_grad()
    _, rows = forward_backward(head, x, y, seed + 1)
    assert torch.equal(view, copy)
    assert rows.data_ptr() != view.data_ptr() - 2 * view.stride(0) * view.element_size()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_recycling_changes_no_result(monkeypatch, seed, optimizer):
    """Three steps with one accumulation of two passes, recycled and not: bit-identical heads."""
    heads = []
    for min_bytes in (0, 1 << 62):
        monkeypatch.setattr(engine._CpuGradients, "MIN_BYTES", min_bytes)
        head, x, y = make_head(seed, optimizer)
        for step in range(3):
            forward_backward(head, x, y, seed + step)
            if step == 1:                                # a second pass: its piece joins the first
                forward_backward(head, x.flip(0), y.flip(0), seed + step)
            head.step()
            head.zero_grad()
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_normalised_row_scratch_grows_and_changes_no_result(seed):
    """Calls of growing then shrinking sizes through the kept scratch equal the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    for classes in (50, 400, 120):
        x = torch.randn(8, 24, generator=g, dtype=torch.float64)
        w = torch.randn(classes, 24, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (8,), generator=g)
        x64 = x.clone().requires_grad_(True)
        expected = margin_softmax_loss(x64, y, w, torch.arange(classes), m2=0.5, scale=16.0)
        expected.backward()
        x32 = x.float().requires_grad_(True)
        got = simcore.arcface_partial(x32, y, w.float(), margin=0.5, scale=16.0, sample_rate=1.0)
        got.backward()
        assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
        assert torch.allclose(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * x64.grad.abs().max().item())
