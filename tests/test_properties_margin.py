"""Property-based tests (hypothesis) of margin-softmax: over shapes, dtypes, strides and
non-contiguous views, sample rates / num_samples, label patterns (duplicates, all-same,
all-distinct), reductions, margins and the class-blocked path, the compiled kernels
agree with the float64 reference or raise the documented error.

Tolerances (relative error in norm, conftest.rel_err) are those of test_margin_softmax.py:
float32 1e-5 (float32 accumulation vs float64); half inputs: loss 1e-5 (float32
accumulation of exactly the half values), gradients 2e-3 (float16) and 1e-2 (bfloat16),
which are rounded to the input dtype. An absolute floor of 4e-6·scale/‖row‖ per element
covers exact zeros (C = 1: softmax of one logit; D = 1: the normalisation Jacobian
projects every gradient away), where float32's ~1e-6 softmax error is all that is left.
"""
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import simcore
from simcore.margin.engine import engine_options
from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.reference.margin_softmax import margin_softmax_loss
from conftest import BLOCKED, backend

EXT = dispatch.extension()
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
GEMM_OPERANDS = [torch.float32, torch.bfloat16]  # the normalised rows the margin-softmax GEMMs read
MARGINS = [(1.0, 0.5, 0.0, 64.0), (1.0, 0.0, 0.35, 64.0), (1.0, 0.3, 0.2, 40.0), (1.35, 0.0, 0.0, 30.0),
           (1.0, 0.0, 0.0, 1.0)]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _close(out, ref, tol, floor):
    """‖out − ref‖ <= tol·‖ref‖ + floor·sqrt(numel), in float64; NaN/Inf never pass."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return False
    return (out - ref).norm().item() <= tol * ref.norm().item() + floor * math.sqrt(max(out.numel(), 1))


def _layout(draw, t, name):
    """t itself, or the same values through a non-contiguous view."""
    how = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"]), label=f"{name} layout")
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "strided":  # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "offset":  # rows of a bigger tensor, row stride > D
        big = torch.zeros(t.shape[0] + 2, t.shape[1] + 3, dtype=t.dtype)
        big[1:-1, 2:-1] = t
        return big[1:-1, 2:-1]
    return t


def _labels(draw, b, c, gen):
    pattern = draw(st.sampled_from(["random", "duplicates", "all-same", "all-distinct"]), label="labels")
    if pattern == "all-distinct":
        assume(b <= c)
        return torch.randperm(c, generator=gen)[:b]
    if pattern == "all-same":
        return torch.full((b,), int(torch.randint(c, (1,), generator=gen)))
    if pattern == "duplicates":
        pool = torch.randint(c, (max(1, b // 3),), generator=gen)
        return pool[torch.randint(len(pool), (b,), generator=gen)]
    return torch.randint(c, (b,), generator=gen)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_compiled_matches_reference(data):
    draw = data.draw
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    b, d, c = draw(st.integers(1, 24), label="B"), draw(st.integers(1, 40), label="D"), draw(st.integers(1, 300),
                                                                                                label="C")
    xdt, wdt = draw(st.sampled_from(FLOATS), label="x dtype"), draw(st.sampled_from(FLOATS), label="w dtype")
    m1, m2, m3, s = draw(st.sampled_from(MARGINS), label="margins")
    reduction = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    blocked = draw(st.booleans(), label="class-blocked")
    x = (torch.randn(b, d, generator=gen) * draw(st.sampled_from([0.05, 1.0, 30.0]))).to(xdt)
    w = torch.randn(c, d, generator=gen).to(wdt)
    y = _labels(draw, b, c, gen)
    if draw(st.booleans(), label="labels strided"):
        y2 = torch.zeros(2 * b, dtype=torch.int64)
        y2[::2] = y
        y = y2[::2]
    x, w = _layout(draw, x, "x"), _layout(draw, w, "w")
    if w.dim() == 2 and w.shape[1] > 1 and w.stride(1) != 1:
        w = w.contiguous()  # weight must have unit stride along D (tested as an error elsewhere)
    if draw(st.booleans(), label="by num_samples"):
        kw = dict(num_samples=draw(st.integers(1, c + 5), label="num_samples"))
    else:
        kw = dict(sample_rate=draw(st.floats(0.001, 1.0), label="sample_rate"))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with engine_options(**BLOCKED) if blocked else contextlib.nullcontext():
        loss, sampled = simcore.margin_softmax_partial(xr, y, wr, m1=m1, m2=m2, m3=m3, scale=s, reduction=reduction,
                                                       return_sampled=True, generator=gen, **kw)
        g = torch.rand(b, generator=gen) if reduction == "none" else torch.tensor(1.0)
        gx, gw = torch.autograd.grad(loss, (xr, wr), g)

    # the sample: sorted unique ids with every label, of the documented size
    num = kw.get("num_samples") or math.ceil(kw["sample_rate"] * c)
    assert sampled.dtype == torch.int64 and (sampled[1:] > sampled[:-1]).all()
    assert sampled.min() >= 0 and sampled.max() < c and torch.isin(y, sampled).all()
    assert len(sampled) == min(c, max(num, len(torch.unique(y))))
    # the values: against the float64 reference on the same (half) input values
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = margin_softmax_loss(xd, y, wd, sampled, m1=m1, m2=m2, m3=m3, scale=s, reduction=reduction)
    rgx, rgw = torch.autograd.grad(ref, (xd, wd), g.double())
    assert loss.dtype == torch.float32 and gx.dtype == xdt and gw.dtype == wdt
    assert loss.shape == ref.shape
    assert _close(loss, ref, 1e-5, 1e-6 * s)
    half = {xdt, wdt} - {torch.float32}
    tol = 1e-2 if torch.bfloat16 in half else 2e-3 if half else 1e-5
    # absolute floor: float32 softmax entries carry ~1e-6 absolute error (log-sum-exp of logits up
    # to s, exp with relative error 2e-7), times s and 1/‖row‖ in the gradient
    floor_x = 4e-6 * s / max(x.double().norm(dim=1).min().item(), 1e-3)
    floor_w = 4e-6 * s / max(w.double().norm(dim=1).min().item(), 1e-3)
    if not half:  # float32 itself may not get closer (scale s amplifies the GEMM's cosine rounding):
        # allow 2x the plain float32 reference's own error on the same inputs
        x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        r32 = margin_softmax_loss(x32, y, w32, sampled, m1=m1, m2=m2, m3=m3, scale=s, reduction=reduction)
        r32x, r32w = torch.autograd.grad(r32, (x32, w32), g)
        floor_x += 2 * (r32x.double() - rgx).norm().item() / math.sqrt(max(rgx.numel(), 1))
        floor_w += 2 * (r32w.double() - rgw).norm().item() / math.sqrt(max(rgw.numel(), 1))
    assert _close(gx, rgx, tol, floor_x), ("x grad", (gx.double() - rgx).norm(), rgx.norm())
    assert _close(gw, rgw, tol, floor_w), ("w grad", (gw.double() - rgw).norm(), rgw.norm())
    mask = torch.ones(c, dtype=torch.bool)
    mask[sampled] = False
    assert (gw[mask] == 0).all()  # no gradient outside the sample


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_invalid_labels_or_rates_raise_the_documented_error(data):
    """Any label outside [0, C), any rate outside (0, 1], any num_samples < 1: ValueError, never a result."""
    draw = data.draw
    b, d, c = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 50))
    x, w = torch.randn(b, d), torch.randn(c, d)
    y = torch.randint(c, (b,))
    what = draw(st.sampled_from(["label", "rate", "num_samples"]))
    kw = {}
    if what == "label":
        y[draw(st.integers(0, b - 1))] = draw(st.one_of(st.integers(c, 2**63 - 1), st.integers(-2**63, -1)))
        message = r"labels must lie in \[0, %d\)" % c
    elif what == "rate":
        kw["sample_rate"] = draw(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                           st.just(float("nan"))))
        message = "sample_rate must lie in"
    else:
        kw["num_samples"] = draw(st.integers(-2**40, 0))
        message = "num_samples must be a positive int"
    with pytest.raises(ValueError, match=message):
        simcore.arcface_partial(x, y, w, **kw)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), backend_name=st.sampled_from(["compiled", "reference"]))
def test_sampler_properties(data, backend_name):
    draw = data.draw
    c = draw(st.integers(1, 3000), label="C")
    b = draw(st.integers(1, 64), label="B")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    y = _labels(draw, b, c, gen)
    num = draw(st.integers(1, c + 10), label="num_samples")
    with backend(backend_name):
        a = simcore.sample_classes(y, c, num, torch.Generator().manual_seed(seed))
        again = simcore.sample_classes(y, c, num, torch.Generator().manual_seed(seed))
    assert torch.equal(a, again)
    assert a.dtype == torch.int64 and (a[1:] > a[:-1]).all() and a.min() >= 0 and a.max() < c
    assert torch.isin(y, a).all()
    assert len(a) == min(c, max(num, len(torch.unique(y))))


@st.composite
def _rows(draw, dtype_choices):
    n, d = draw(st.integers(0, 20)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(dtype_choices))
    pad = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    base = torch.randn(n, d + pad, generator=torch.Generator().manual_seed(seed))
    base *= torch.logspace(-3, 3, n, dtype=torch.float32).unsqueeze(1) if n else 1
    return base.to(dtype)[:, :d]  # row stride d + pad


@settings(max_examples=100, **SETTINGS)
@given(src=_rows(FLOATS), out_dtype=st.sampled_from(GEMM_OPERANDS), data=st.data())
def test_normalize_rows_kernel(src, out_dtype, data):
    n_src, d = src.shape
    use_index = data.draw(st.booleans()) and n_src > 0
    if use_index:
        idx = torch.tensor(data.draw(st.lists(st.integers(0, n_src - 1), max_size=30)), dtype=torch.int64)
        rows = src[idx]
    else:
        idx, rows = None, src
    n = rows.shape[0]
    pad = data.draw(st.integers(0, 3))
    out_big = torch.full((n, d + pad), float("nan"), dtype=out_dtype)
    out = out_big[:, :d]
    norms = torch.full((n,), float("nan"))
    EXT.ms_normalize_rows(tensor_arg(src), None if idx is None else tensor_arg(idx), tensor_arg(out),
                          tensor_arg(norms), 1e-12, data.draw(st.sampled_from([1, 2])))
    ref = torch.nn.functional.normalize(rows.double(), dim=1, eps=1e-12)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert _close(out, ref, tol, 0.0)
    assert _close(norms, rows.double().norm(dim=1), 1e-6, 0.0)
    assert torch.isnan(out_big[:, d:]).all()  # padding between rows untouched


@settings(max_examples=100, **SETTINGS)
@given(data=st.data(), v_dtype=st.sampled_from(GEMM_OPERANDS), out_dtype=st.sampled_from(FLOATS))
def test_project_rows_kernel(data, v_dtype, out_dtype):
    n, d, c = data.draw(st.integers(0, 16)), data.draw(st.integers(1, 50)), data.draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    u = torch.randn(n, d, generator=gen)
    raw = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 10
    if out_dtype != torch.float16:  # u/eps (~1e12) is beyond float16's range
        raw[: n // 4] *= 1e-14  # some rows below eps: the Jacobian is I/eps there
    norms = raw.norm(dim=1)
    v = torch.nn.functional.normalize(raw, dim=1, eps=1e-12).to(v_dtype)
    with_index = data.draw(st.booleans()) and n <= c
    out = torch.full((c if with_index else n, d), float("nan"), dtype=out_dtype)
    idx = torch.randperm(c, generator=gen)[:n] if with_index else None  # unique: rows are written, not summed
    EXT.ms_project_rows(tensor_arg(u), tensor_arg(v), tensor_arg(norms), tensor_arg(out),
                        None if idx is None else tensor_arg(idx), 1e-12, data.draw(st.sampled_from([1, 2])))
    vd, ud, nd = v.double(), u.double(), norms.double().unsqueeze(1)
    ref = torch.where(nd > 1e-12, (ud - (ud * vd).sum(1, keepdim=True) * vd) / nd, ud / 1e-12)
    got = out[idx] if with_index else out
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert _close(got, ref, tol, 0.0)
    if with_index:
        untouched = torch.ones(c, dtype=torch.bool)
        untouched[idx] = False
        assert torch.isnan(out[untouched]).all()


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_targets_kernel(data):
    c = data.draw(st.integers(1, 500))
    sampled = torch.tensor(sorted(data.draw(st.sets(st.integers(0, c - 1), min_size=1, max_size=60))))
    y = sampled[torch.tensor(data.draw(st.lists(st.integers(0, len(sampled) - 1), max_size=40)), dtype=torch.int64)]
    out = torch.full((len(y),), -7, dtype=torch.int64)
    EXT.ms_targets(tensor_arg(y), tensor_arg(sampled), c, tensor_arg(out), 1)
    assert torch.equal(out, torch.searchsorted(sampled, y))
