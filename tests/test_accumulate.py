"""simcore.isc.accumulate: N micro-batches give the step of one batch N times larger (float64: the loss
and the backbone's gradients to 1e-12, the head's rows to float32 rounding; float32: within
tolerance), duplicate labels across micro-batches included."""
import copy
import math

import pytest
import torch

import simcore
from simcore.isc.accumulate import accumulate_gradients


def setup(dtype, seed, optimizer):
    g = torch.Generator().manual_seed(seed)
    backbone = torch.nn.Linear(20, 8, dtype=dtype)
    head = simcore.PartialMarginHead(40, 8, margin=0.5, scale=16.0, sample_rate=0.3, optimizer=optimizer, lr=0.1,
                                     momentum=0.9, weight_decay=5e-4, dtype=dtype)
    x = torch.randn(22, 20, generator=g, dtype=dtype)
    y = torch.randint(0, 40, (22,), generator=g)
    y[7] = y[1]                                          # the same class in two micro-batches
    return backbone, head, x, y


# AdamW in float32 is left out: Adam divides by sqrt(v), so a row whose gradient is near zero moves by
# about ±lr whatever its size, and float32 rounding may flip that sign
@pytest.mark.parametrize("dtype, tol, optimizer", [(torch.float64, 1e-12, "sgd"), (torch.float64, 1e-12, "adamw"),
                                                   (torch.float32, 2e-5, "sgd")])
def test_accumulation_equals_one_big_step(seed, dtype, tol, optimizer):
    backbone, head, x, y = setup(dtype, seed, optimizer)
    backbone2, head2 = copy.deepcopy(backbone), copy.deepcopy(head)
    for step in range(2):                                # two steps: the optimizer state is used too
        # after step 1 the heads differ by the float32 rounding of their recorded gradients (below)
        tol = tol if step == 0 else max(tol, 1e-6)
        g1, g2 = (torch.Generator().manual_seed(seed + step) for _ in range(2))
        sampled = simcore.sample_classes(y, 40, math.ceil(0.3 * 40), g1)
        big = head(backbone(x), y, sampled=sampled)
        big.backward()
        # uneven micro-batches: 6 + 6 + 6 + 4
        micro = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 22, 6)]
        loss, sampled2 = accumulate_gradients(backbone2, head2, micro, generator=g2)
        assert torch.equal(sampled, sampled2)
        assert abs(loss.item() - big.item()) <= tol * abs(big.item())
        for p, q in zip(backbone.parameters(), backbone2.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=tol, atol=tol * p.grad.abs().max().item())
        for h, bb in ((head, backbone), (head2, backbone2)):
            h.step()
            with torch.no_grad():
                for p in bb.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            h.zero_grad()
        # the head records row gradients in float32 whatever its dtype (simcore.margin.head's gradient
        # sink), so its rows agree to float32 rounding of the gradient, not to float64's
        scale = head.weight.abs().max().item()
        assert (head.weight - head2.weight).abs().max().item() <= max(tol, 1e-6) * scale
    assert not torch.equal(head.weight, copy.deepcopy(setup(dtype, seed, optimizer)[1]).weight)   # it trained


def test_no_micro_batches():
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulate_gradients(lambda x: x, None, [])
