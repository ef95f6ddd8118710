"""simcore.margin_softmax_partial (ArcFace/CosFace/combined over sampled classes):
compiled kernels against the float64 reference, sampling, the sparse head, bad input."""
import math

import pytest
import torch

import simcore
from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.margin.engine import (EngineOptions, MarginSpec, current_engine_options, engine_options,
                                   fused_margin_softmax, plan_block)
from simcore.margin import engine as engine_module
from simcore.margin.gemm import cpu_fast_bf16, fp16_block_scale, gemm_operand_dtype, onednn_linear
from simcore.reference.margin_softmax import margin_softmax_loss, theta_star
from conftest import BLOCKED, backend, cuda, kernel_params, poisoned, rel_err

MARGINS = {  # (m1, m2, m3, scale)
    "arcface": (1.0, 0.5, 0.0, 64.0),
    "cosface": (1.0, 0.0, 0.35, 64.0),
    "combined": (1.0, 0.3, 0.2, 40.0),
    "sphere": (1.35, 0.0, 0.0, 30.0),
}


def _reference(x, y, w, sampled, margins, reduction, grad_out=None, dtype=torch.float64):
    """Loss and gradients of the reference (float64 by default) on the same (possibly half) input values."""
    m1, m2, m3, s = margins
    xd = x.detach().to(dtype).requires_grad_()
    wd = w.detach().to(dtype).requires_grad_()
    loss = margin_softmax_loss(xd, y, wd, sampled, m1=m1, m2=m2, m3=m3, scale=s, reduction=reduction)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(dtype)
    gx, gw = torch.autograd.grad(loss, (xd, wd), g)
    return loss, gx, gw


def assert_float32_close(got, ref64, ref32):
    """Within 1e-5 relative of the float64 reference, or, where float32 itself cannot get
    that close (scale 64 turns the GEMM's ~1e-7 cosine rounding into ~1e-5 in the softmax),
    within 2x the plain float32 reference's own error."""
    for out, r64, r32 in zip(got, ref64, ref32):
        assert rel_err(out, r64) <= max(1e-5, 2 * rel_err(r32, r64)), (rel_err(out, r64), rel_err(r32, r64))


def _kernel(x, y, w, margins, reduction, grad_out=None, **kw):
    m1, m2, m3, s = margins
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss, sampled = simcore.margin_softmax_partial(x, y, w, m1=m1, m2=m2, m3=m3, scale=s, reduction=reduction,
                                                   return_sampled=True, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out
    gx, gw = torch.autograd.grad(loss, (x, w), g)
    return loss, sampled, gx, gw


def _labels(b, c, gen, duplicates=False):
    if duplicates:  # a few classes, many repeats
        pool = torch.randperm(c, generator=gen)[: max(1, min(c, b // 4))]
        return pool[torch.randint(len(pool), (b,), generator=gen)]
    return torch.randint(c, (b,), generator=gen)


@pytest.mark.parametrize("variant", list(MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
def test_float32_matches_reference(variant, reduction, blocked, generator, engine_opts):
    if blocked:  # force the two-pass class-blocked path (256-class blocks)
        engine_opts(**BLOCKED)
    for _ in range(3):
        b = int(torch.randint(1, 40, (1,), generator=generator))
        d = int(torch.randint(2, 70, (1,), generator=generator))
        c = int(torch.randint(2, 900, (1,), generator=generator))
        x = torch.randn(b, d, generator=generator) * 3
        w = torch.randn(c, d, generator=generator) * 0.1
        y = _labels(b, c, generator, duplicates=bool(torch.rand(1, generator=generator) < 0.5))
        rate = float(torch.rand(1, generator=generator) * 0.9 + 0.1)
        g = torch.rand(b, generator=generator) if reduction == "none" else None
        loss, sampled, gx, gw = _kernel(x, y, w, MARGINS[variant], reduction, g, sample_rate=rate,
                                        generator=torch.Generator().manual_seed(1))
        ref64 = _reference(x, y, w, sampled, MARGINS[variant], reduction, g)
        ref32 = _reference(x, y, w, sampled, MARGINS[variant], reduction, g, dtype=torch.float32)
        assert loss.dtype == torch.float32
        assert_float32_close((loss, gx, gw), ref64, ref32)


@pytest.mark.parametrize("variant", list(MARGINS))
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
def test_a_lone_target_class_has_exactly_zero_loss_and_gradient(variant, blocked, generator, engine_opts):
    """Every row's only sampled class is its label (one label, a tiny sample rate): softmax = 1
    exactly, so the loss and both gradients are exactly 0, as in float64. The target's probability
    is taken from the float32 logit the exp-sum used (a float64 logit left ~1e-5 gradients)."""
    if blocked:
        engine_opts(**BLOCKED)
    x = torch.randn(3, 37, generator=generator) * 3
    w = torch.randn(5, 37, generator=generator) * 0.1
    y = torch.full((3,), int(torch.randint(5, (1,), generator=generator)))
    loss, sampled, gx, gw = _kernel(x, y, w, MARGINS[variant], "none", torch.rand(3, generator=generator),
                                    sample_rate=0.01)
    assert sampled.tolist() == y[:1].tolist()
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(gx, torch.zeros_like(gx))
    assert torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_half_inputs_against_float64(xdtype, wdtype, generator):
    b, d, c = 37, 48, 500
    x = (torch.randn(b, d, generator=generator) * 2).to(xdtype)
    w = torch.randn(c, d, generator=generator).to(wdtype)
    y = _labels(b, c, generator, duplicates=True)
    loss, sampled, gx, gw = _kernel(x, y, w, MARGINS["arcface"], "mean", sample_rate=0.5)
    rl, rgx, rgw = _reference(x, y, w, sampled, MARGINS["arcface"], "mean")
    assert loss.dtype == torch.float32 and gx.dtype == xdtype and gw.dtype == wdtype
    assert rel_err(loss, rl) <= 1e-5  # float32 accumulation of exactly the half values
    tol = 1e-2 if torch.bfloat16 in (xdtype, wdtype) else 2e-3  # gradients are rounded to the input dtype
    assert rel_err(gx, rgx) <= tol
    assert rel_err(gw, rgw) <= tol


# --------------------------------------------------------------------------- half (bfloat16, float16) GEMM operands
@pytest.fixture
def lowp_gemms(engine_opts):
    """The CUDA path for bfloat16/float16 inputs, on CPU: operands rounded to the half dtype,
    products formed in float32 (exact for half values), so only the summation order differs."""
    engine_opts(lowp_gemms="always")


# The CUDA path for float16 inputs (docs/margin_softmax.md, "fp16 and bf16 numerics"): the normalised
# rows in float16 (11-bit significands, values in [-1, 1]), the gradient block G scaled by a power of
# two into float16's range (fp16_block_scale) and scaled back exactly after each GEMM. On CPU
# (lowp_gemms="always") the products of float16 values are formed exactly in float32, so only the
# summation order differs from cuBLAS. Tolerance: float16 operands move cos θ by ~2^-12·√2/√d
# (4e-5 at d = 64), which the scale 64 amplifies in the softmax; over 1,200 runs of
# test_half_gemms_match_float64's float16 shapes the worst was 8.9e-4 (float16 gradients, rounded by 2^-11
# on output too), against ~6e-3 for bfloat16 operands and 1e-6 for float32
# (benchmarks/lowp_gemm_accuracy.py).
FP16_TOL = 2.5e-3
# (half dtype, smallest d, tolerance): bfloat16 operands move cos θ by ~2^-9/√d and the scale (64)
# amplifies that (d from 64 reached 1.02e-2 on gw, seed 18399520), hence d >= 128; float16 from d = 64.
HALF_GEMMS = {torch.bfloat16: (128, 1e-2), torch.float16: (64, FP16_TOL)}


@pytest.mark.parametrize("variant", list(MARGINS))
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
@pytest.mark.parametrize("half", list(HALF_GEMMS), ids=["bf16", "fp16"])
@pytest.mark.parametrize("mix", ["both", "x", "w"])
def test_half_gemms_match_float64(variant, blocked, half, mix, lowp_gemms, generator, engine_opts):
    """Half inputs (both, only x, only w): half GEMM operands, against float64 on the same sample."""
    xdtype = half if mix in ("both", "x") else torch.float32
    wdtype = half if mix in ("both", "w") else torch.float32
    d_min, tol = HALF_GEMMS[half]
    if blocked:
        engine_opts(**BLOCKED)
    for reduction in ("mean", "none"):
        b = int(torch.randint(8, 60, (1,), generator=generator))
        d = int(torch.randint(d_min, 256, (1,), generator=generator))
        c = int(torch.randint(300, 2000, (1,), generator=generator))
        x = (torch.randn(b, d, generator=generator) * 2).to(xdtype)
        w = torch.randn(c, d, generator=generator).to(wdtype)
        y = _labels(b, c, generator, duplicates=True)
        g = torch.rand(b, generator=generator) if reduction == "none" else None
        run = lambda: _kernel(x, y, w, MARGINS[variant], reduction, g, sample_rate=0.5,  # noqa: E731
                              generator=torch.Generator().manual_seed(5))
        loss, sampled, gx, gw = run()
        assert loss.dtype == torch.float32 and gx.dtype == xdtype and gw.dtype == wdtype
        for out, ref in zip((loss, gx, gw), _reference(x, y, w, sampled, MARGINS[variant], reduction, g)):
            assert torch.isfinite(out).all() and rel_err(out, ref) <= tol, rel_err(out, ref)
        with engine_options(lowp_gemms="never"):  # float32 operands: the same sample, other rounding
            gx32 = run()[2]
        # the gradient, not the loss: a mean loss near 44 can round to the same float32 (seed 104)
        assert not torch.equal(gx.float(), gx32.float())


# bfloat16 operands move cos θ by ~2^-9/√d, so θ is resolved only away from 0 and π, and a row's
# gradient (dominated by its target) is within 1e-2 from d ≈ 256 on at scale 64. float16 operands
# move it by ~2^-12·√2/√d: resolved closer to 0 and π, where dψ/dcos θ (up to ~5e3 at θ = SIN_EPS)
# makes G span the widest range; its upstream gradient is GradScaler-sized (s·dψ·g overflows
# unscaled float16).
_WELL_RESOLVED = {torch.bfloat16: [0.3, 1.0, -0.1, 0.1, math.pi - 0.3],
                  torch.float16: [0.1, 0.3, 1.0, -0.05, 0.05, math.pi - 0.1]}  # ±: offsets from θ*


@pytest.mark.parametrize("dtype,upstream,tol", [(torch.bfloat16, 1.0, 1e-2), (torch.float16, 1024.0, FP16_TOL)])
def test_half_gemms_extreme_angles(dtype, upstream, tol, lowp_gemms, generator):
    m1, m2, m3, s = MARGINS["arcface"]
    ts = theta_star(m1, m2)
    well = [ts + t if abs(t) < 0.2 else t for t in _WELL_RESOLVED[dtype]]
    edge = [0.0, 1e-6, 1e-2, math.pi - 1e-3, math.pi]
    x, y, w = _at_angles(well + edge, 256, 50, generator)
    x, w = x.to(dtype), w.to(dtype)
    g = torch.ones(len(y)) * upstream
    loss, sampled, gx, gw = _kernel(x, y, w, MARGINS["arcface"], "none", g, sample_rate=1.0)
    rl, rgx, rgw = _reference(x, y, w, sampled, MARGINS["arcface"], "none", g)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert rel_err(loss, rl) <= tol
    n = len(well)
    assert rel_err(gx[:n], rgx[:n]) <= tol
    bound = upstream * s * m1 * 1.01 / x.float().norm(dim=1, keepdim=True)
    assert (gx[n:].float().norm(dim=1, keepdim=True) <= bound[n:] * 2).all()


@pytest.mark.parametrize("dtype,dim,tol", [(torch.bfloat16, 32, 1e-2), (torch.float16, 64, FP16_TOL)])
def test_half_gemms_under_compile_and_autocast(dtype, dim, tol, lowp_gemms, generator, monkeypatch):
    """bf16 and fp16 autocast (fp16: InsightFace's default) take the GEMM path of their dtype,
    traced or eager."""
    seen = []
    real = engine_module._BlockEngine.__init__

    def spy(self, *args):
        real(self, *args)
        seen.append(self.operand_dtype)

    monkeypatch.setattr(engine_module._BlockEngine, "__init__", spy)
    lin = torch.nn.Linear(16, dim)
    w = torch.randn(300, dim, generator=generator, requires_grad=True)
    inp = torch.randn(12, 16, generator=generator)
    y = torch.randint(300, (12,), generator=generator)

    def f(inp, y, w):
        with torch.autocast("cpu", dtype=dtype):
            return simcore.arcface_partial(lin(inp), y, w, sample_rate=1.0)

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(inp, y, w)
    loss.backward()
    gw = w.grad.clone()
    w.grad = None
    eager = f(inp, y, w)
    eager.backward()
    assert seen and set(seen) == {dtype}
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(gw, w.grad)
    emb = lin(inp).to(dtype).detach()  # what autocast fed the loss
    assert rel_err(eager, margin_softmax_loss(emb.double(), y, w.detach().double(), torch.arange(300))) <= tol


# --------------------------------------------------------------------------- float16 GEMM operands


def _engine_grads(x, y, w, row_weight, gemm_dtype, options=EngineOptions()):
    """Engine-level loss and float32 gradients of Σ row_weight·loss (every class sampled)."""
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    loss, _ = fused_margin_softmax(x, y, w, torch.arange(len(w)), MarginSpec(), row_weight=row_weight, grad_x=gx,
                                   grad_w=gw, gemm_dtype=gemm_dtype, options=options)
    return loss, gx, gw


def _engine_reference(x, y, w, row_weight):
    m1, m2, m3, s = MarginSpec()[:4]
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    loss = margin_softmax_loss(xd, y, wd, torch.arange(len(w)), m1=m1, m2=m2, m3=m3, scale=s, reduction="none")
    return (loss.detach(),) + torch.autograd.grad(loss, (xd, wd), row_weight.double())


# Row weights that put G outside float16's range without the block scale: 2^16 (GradScaler's
# initial scale reaching reduction="none" as upstream gradients) overflows s·(softmax − one-hot)
# past 65504; 1e-7 (a mean over a very large global batch) leaves all of G subnormal (< 6.1e-5).
ROW_WEIGHTS = {"gradscaler": 65536.0, "tiny": 1e-7, "mean": 1.0 / 40}


@pytest.mark.parametrize("weight_name", list(ROW_WEIGHTS))
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
def test_fp16_gradient_block_scaling(weight_name, blocked, generator, monkeypatch):
    """G far outside float16's range still gives float16-accurate gradients; with the block scale
    disabled (the mutation: scale 1) the same inputs overflow to inf or underflow to garbage."""
    b, d, c = 40, 128, 900
    x = (torch.randn(b, d, generator=generator) * 4).half().float()
    w = torch.randn(c, d, generator=generator).half().float()
    y = _labels(b, c, generator)
    rw = torch.full((b,), ROW_WEIGHTS[weight_name]) * (0.5 + torch.rand(b, generator=generator))
    options = EngineOptions(**BLOCKED) if blocked else EngineOptions()
    ref = _engine_reference(x, y, w, rw)
    got = _engine_grads(x, y, w, rw, torch.float16, options)
    for out, r in zip(got, ref):
        assert rel_err(out, r) <= FP16_TOL, rel_err(out, r)
    one = torch.ones(())
    monkeypatch.setattr(engine_module, "fp16_block_scale", lambda g: (one, one))
    broken = _engine_grads(x, y, w, rw, torch.float16, options)
    errs = [rel_err(out, r) for out, r in zip(broken[1:], ref[1:])]
    if weight_name == "mean":  # inside float16's range: the scale changes nothing material
        assert max(errs) <= FP16_TOL
    elif weight_name == "tiny":  # G ~ 6e-6 and below: a few subnormal ulps each (measured ~1e-2)
        assert min(errs) > 2 * FP16_TOL, errs
    else:  # overflow to inf
        assert min(errs) == math.inf, errs


def test_fp16_block_scale():
    """Powers of two with scale·max|G| in [2^14, 2^15) and scale·inverse == 1 exactly."""
    for top in (0.0, 1e-30, 3e-9, 1.0, 16384.0, 32767.0, 65504.0, 1e6, 1e30):
        block = torch.tensor([[top, -0.5 * top], [0.25 * top, 0.0]])
        scale, inverse = fp16_block_scale(block)
        assert scale.dtype == inverse.dtype == torch.float32 and scale.dim() == 0
        assert torch.frexp(scale).mantissa.item() == 0.5 and scale.item() * inverse.item() == 1.0
        if top > 0:
            assert 2.0 ** 14 <= top * scale.item() < 2.0 ** 15
            assert torch.isfinite((block * scale).half()).all()
    for bad in (math.inf, math.nan):  # propagate: inf or NaN gradients, as for float32 operands
        scale, _ = fp16_block_scale(torch.tensor([1.0, bad]))
        assert torch.isfinite(scale) and not torch.isfinite((torch.tensor([bad]) * scale).half()).any()


def test_fp16_large_and_small_norm_rows(lowp_gemms, generator):
    """float16 rows whose squares overflow float16 (elements ~300) or underflow it (~2e-4): the
    norms are accumulated in double, so the normalised float16 operands are as for norm-1 rows."""
    b, d, c = 24, 128, 400
    x = torch.randn(b, d, generator=generator)
    x = (x / x.norm(dim=1, keepdim=True) * math.sqrt(d) * torch.tensor([300.0, 2e-4, 3.0]).repeat(8)[:, None]).half()
    # squared in float16: the large rows' squares overflow, most of the small rows' flush to zero
    assert torch.isinf(x[0::3] ** 2).any(1).all() and ((x[1::3] ** 2) == 0).float().mean() > 0.5
    w = (torch.randn(c, d, generator=generator) * 500).half()
    y = _labels(b, c, generator)
    # "sum": the 300-element rows' gradients (∝ 1/‖x‖) stay normal float16 numbers
    loss, sampled, gx, gw = _kernel(x, y, w, MARGINS["arcface"], "sum", sample_rate=1.0)
    rl, rgx, rgw = _reference(x, y, w, sampled, MARGINS["arcface"], "sum")
    assert rel_err(loss, rl) <= FP16_TOL and rel_err(gw, rgw) <= FP16_TOL
    for group in range(3):  # each norm group on its own: their gradients differ by 1e6 in size
        assert rel_err(gx[group::3], rgx[group::3]) <= FP16_TOL, group


def test_lowp_gemm_policy():
    x32, w32 = torch.randn(4, 8), torch.randn(10, 8)
    xb, wb, xh, wh = x32.bfloat16(), w32.bfloat16(), x32.half(), w32.half()
    assert current_engine_options().lowp_gemms == "auto"  # the default: CPU bfloat16 only with fast bf16 GEMMs
    for policy in ("cuda", "never"):  # CPU tensors: float32 unless "always"
        assert all(gemm_operand_dtype(a, b, policy) == torch.float32 for a in (x32, xb, xh) for b in (w32, wb, wh))
    assert all(gemm_operand_dtype(a, b, "auto", cpu_bf16=False) == torch.float32
               for a in (x32, xb, xh) for b in (w32, wb, wh))
    auto = lambda a, b: gemm_operand_dtype(a, b, "auto", cpu_bf16=True)  # noqa: E731
    assert auto(xb, w32) == auto(x32, wb) == auto(xb, wh) == torch.bfloat16
    assert auto(x32, w32) == auto(xh, wh) == auto(xh, w32) == torch.float32  # float16: no fast CPU GEMM
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto(x32, w32) == torch.bfloat16 and gemm_operand_dtype(x32, w32, "auto", False) == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert auto(x32, w32) == torch.float32
    # the detection: AVX512-BF16 (cpuid, once) and oneDNN; None in the options means "detect"
    assert cpu_fast_bf16() == (dispatch.extension().cpu_has_fast_bf16() and torch.backends.mkldnn.is_available())
    assert gemm_operand_dtype(xb, wb, "auto") == (torch.bfloat16 if cpu_fast_bf16() else torch.float32)
    f = lambda a, b: gemm_operand_dtype(a, b, "always")  # noqa: E731
    assert f(xh, wh) == f(xh, w32) == f(x32, wh) == torch.float16
    assert f(xb, wh) == f(xh, wb) == f(xb, w32) == torch.bfloat16  # mixed: bfloat16's range wins
    assert f(x32, w32) == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert f(x32, w32) == torch.float16 and f(x32, wb) == torch.bfloat16
        assert gemm_operand_dtype(x32, w32, "never") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(x32, w32) == torch.bfloat16 and f(xh, w32) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16, enabled=False):
        assert f(x32, w32) == torch.float32
    opts = EngineOptions(lowp_gemms="always")
    with engine_options(lowp_gemms="never"):
        assert current_engine_options().lowp_gemms == "never"
        with engine_options(lowp_gemms="always"):
            assert current_engine_options().lowp_gemms == "always"
    assert EngineOptions.from_op_arg(opts.to_op_arg()) == opts
    assert EngineOptions.from_op_arg(EngineOptions(cpu_bf16=True).to_op_arg()).cpu_bf16 is True


@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_bf16_policy_takes_the_bf16_gemm_path(autocast, generator):
    """With the CPU's fast-bfloat16 detection overridden (EngineOptions.cpu_bf16), the default policy
    gives bfloat16 inputs, or bfloat16 autocast, exactly the numerics of lowp_gemms="always" (bfloat16
    operands, float32 accumulation); without fast bfloat16, exactly those of float32 operands."""
    x = torch.randn(24, 64, generator=generator)
    w = torch.randn(500, 64, generator=generator)
    y = torch.randint(500, (24,), generator=generator)
    if not autocast:
        x, w = x.bfloat16(), w.bfloat16()

    def run(**opts):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with engine_options(**opts), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = simcore.arcface_partial(xx, y, ww, sample_rate=1.0)
        loss.backward()
        return loss, xx.grad, ww.grad

    for got, want in ((run(cpu_bf16=True), run(lowp_gemms="always")), (run(cpu_bf16=False), run(lowp_gemms="never"))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(run(cpu_bf16=True)[1], run(cpu_bf16=False)[1])  # the two paths differ
    rl, rgx, rgw = _reference(x, y, w, torch.arange(500), MARGINS["arcface"], "mean")
    loss, gx, gw = run(cpu_bf16=True)
    assert rel_err(loss, rl) <= 1e-2 and rel_err(gx, rgx) <= 1e-2 and rel_err(gw, rgw) <= 1e-2


def _at_angles(thetas, d, c, gen):
    """Embeddings at exactly the given angles to their (random) class centre."""
    w = torch.nn.functional.normalize(torch.randn(c, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(c, (len(thetas),), generator=gen)
    u = w[y]
    v = torch.randn(len(thetas), d, generator=gen, dtype=torch.float64)
    v = torch.nn.functional.normalize(v - (v * u).sum(1, keepdim=True) * u, dim=1)
    t = torch.tensor(thetas, dtype=torch.float64).unsqueeze(1)
    x = (torch.cos(t) * u + torch.sin(t) * v) * 2.5
    return x, y, w * 0.7


@pytest.mark.parametrize("variant", ["arcface", "combined", "sphere"])
def test_extreme_angles(variant, generator):
    m1, m2, m3, s = MARGINS[variant]
    ts = theta_star(m1, m2)
    well = [1e-2, 0.3, ts - 1e-2, ts + 1e-2, min(ts + 0.3, math.pi - 1e-2)]
    edge = [0.0, 1e-6, 1e-3, ts - 1e-5, ts, ts + 1e-5, math.pi - 1e-4, math.pi]
    x, y, w = _at_angles(well + edge, 32, 50, generator)
    g = torch.ones(len(y))
    loss, sampled, gx, gw = _kernel(x.float(), y, w.float(), MARGINS[variant], "none", g, sample_rate=1.0)
    rl, rgx, rgw = _reference(x.float(), y, w.float(), sampled, MARGINS[variant], "none", g)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert rel_err(loss, rl) <= 1e-5
    n = len(well)  # well-conditioned angles: gradients to float32 accuracy
    assert rel_err(gx[:n], rgx[:n]) <= 1e-5
    # θ within float32 resolution of 0 or π: acos is ill-conditioned there, so only
    # bounded gradients are promised (|dψ/dθ| <= m1 and ‖∂cos/∂x‖ <= 1/‖x‖).
    bound = s * m1 * 1.01 / x.norm(dim=1).float().unsqueeze(1)
    assert (gx[n:].norm(dim=1, keepdim=True) <= bound[n:] * 2).all()


def test_fallback_is_continuous_and_decreasing():
    from simcore.reference.margin_softmax import margin_target
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0)]:
        ts = theta_star(m1, m2)
        t = torch.tensor([ts - 1e-9, ts + 1e-9], dtype=torch.float64)
        psi = margin_target(torch.cos(t), m1, m2, m3)
        assert abs(psi[0] - psi[1]) < 1e-8
        grid = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
        p = margin_target(torch.cos(grid), m1, m2, m3)
        assert (p[1:] <= p[:-1] + 1e-12).all()


def test_gradcheck_reference_float64(generator):
    b, d, c = 5, 6, 9
    x, y, w = _at_angles([0.2, 1.0, 2.0, 2.9, 3.0], d, c, generator)  # two targets beyond θ* = π − 0.5
    x.requires_grad_()
    w.requires_grad_()
    sampled = torch.arange(c)
    for m in MARGINS.values():
        fn = lambda x, w: margin_softmax_loss(x, y, w, sampled, m1=m[0], m2=m[1], m3=m[2], scale=m[3] / 8)  # noqa
        assert torch.autograd.gradcheck(fn, (x, w))


def test_float64_inputs_stay_float64(generator):
    x = torch.randn(6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    loss = simcore.arcface_partial(x, torch.arange(6), w, sample_rate=1.0)
    assert loss.dtype == torch.float64
    loss.backward()
    assert x.grad.dtype == torch.float64


def test_weight_gradient_only_on_sampled_rows(generator):
    b, d, c = 16, 24, 400
    x = torch.randn(b, d, generator=generator, requires_grad=True)
    w = torch.randn(c, d, generator=generator, requires_grad=True)
    y = _labels(b, c, generator)
    loss, sampled = simcore.arcface_partial(x, y, w, sample_rate=0.2, return_sampled=True, generator=generator)
    loss.backward()
    mask = torch.zeros(c, dtype=torch.bool)
    mask[sampled] = True
    assert (w.grad[~mask] == 0).all()
    assert (w.grad[mask].norm(dim=1) > 0).all()
    assert len(sampled) == math.ceil(0.2 * c)


def test_outputs_fully_written_poisoned(generator):
    """Engine-level: every gradient row the routine owns is written, and only those; the
    weight gradient written in place (every class sampled: the heads' gathered rows) equals
    the scattered one."""
    b, d, c = 9, 16, 300
    x = torch.randn(b, d, generator=generator)
    w = torch.randn(c, d, generator=generator)
    y = _labels(b, c, generator)
    sampled = simcore.sample_classes(y, c, 120, generator)
    for options, gemm_dtype in ((o, t) for o in (EngineOptions(), EngineOptions(**BLOCKED))
                                for t in (torch.float32, torch.bfloat16, torch.float16)):
        gx = poisoned((b, d))
        gw = poisoned((c, d))
        g_rows = poisoned((len(sampled), d))
        rw = torch.full((b,), 1.0 / b)
        loss, _ = fused_margin_softmax(x, y, w, sampled, MarginSpec(), row_weight=rw, grad_x=gx, grad_w=gw,
                                       gemm_dtype=gemm_dtype, options=options)
        fused_margin_softmax(x, torch.searchsorted(sampled, y), w[sampled], torch.arange(len(sampled)), MarginSpec(),
                             row_weight=rw, grad_w=g_rows, gemm_dtype=gemm_dtype, options=options)
        mask = torch.zeros(c, dtype=torch.bool)
        mask[sampled] = True
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
        assert torch.isfinite(gw[mask]).all() and torch.isnan(gw[~mask]).all()
        assert torch.equal(g_rows, gw[sampled])


# --------------------------------------------------------------------------- sampling
@pytest.fixture(params=["compiled", "reference"])
def sampler_backend(request):
    """Both samplers: Floyd's algorithm in C++ and the torch rejection sampler."""
    with backend(request.param):
        yield request.param


def test_sampling_semantics_and_determinism(seed, sampler_backend):
    c = 5000
    y = torch.randint(c, (300,))
    for num in (10, 400, 1200, 4000, 4999):  # positives only / rejection path / permutation path
        a = simcore.sample_classes(y, c, num, torch.Generator().manual_seed(seed))
        b = simcore.sample_classes(y, c, num, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b) and a.dtype == torch.int64
        assert (a[1:] > a[:-1]).all() and a.min() >= 0 and a.max() < c
        assert torch.isin(y, a).all()
        assert len(a) == max(num, len(torch.unique(y)))


@pytest.mark.parametrize("num", [8, 17, 50])  # torch sampler: rejection (k < n/4) and permutation paths
def test_negatives_are_uniform(num, seed, sampler_backend):
    c, trials = 60, 3000
    y = torch.tensor([3, 3, 7, 59])
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(c)
    for _ in range(trials):
        counts[simcore.sample_classes(y, c, num, gen)] += 1
    neg = torch.ones(c, dtype=torch.bool)
    neg[y] = False
    p = (num - 3) / (c - 3)
    expected, sd = trials * p, math.sqrt(trials * p * (1 - p))
    assert (counts[~neg] == trials).all()
    assert ((counts[neg] - expected).abs() <= 5 * sd).all()


def test_sampling_pairs_are_uniform(seed):
    """Without replacement means pairwise inclusion probabilities k(k−1)/(n(n−1)), too."""
    c, num, trials = 12, 4, 6000
    y = torch.tensor([0])
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.zeros(c, c)
    for _ in range(trials):
        s = simcore.sample_classes(y, c, num, gen)[1:]
        pairs[s.unsqueeze(1), s.unsqueeze(0)] += 1
    n, k = c - 1, num - 1
    p = k * (k - 1) / (n * (n - 1))
    off = pairs[1:, 1:][~torch.eye(n, dtype=torch.bool)]
    assert ((off - trials * p).abs() <= 5 * math.sqrt(trials * p * (1 - p))).all()


def test_cpp_sampler_rejects_bad_arguments():
    ext = dispatch.extension()
    pos, rnd, bm, out = torch.tensor([3, 1]), torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), \
        torch.empty(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="sorted"):
        ext.ms_sample_classes(tensor_arg(pos), tensor_arg(rnd), 10, tensor_arg(bm), tensor_arg(out))
    pos2, rnd2 = torch.tensor([1, 3]), torch.zeros(9, dtype=torch.int64)
    with pytest.raises(ValueError, match="negatives"):
        ext.ms_sample_classes(tensor_arg(pos2), tensor_arg(rnd2), 10, tensor_arg(bm), tensor_arg(out))


def test_sampling_millions_of_classes(generator):
    y = torch.randint(3_000_000, (256,), generator=generator)
    s = simcore.sample_classes(y, 3_000_000, 300_000, generator)
    assert len(s) == 300_000 and torch.isin(y, s).all() and (s[1:] > s[:-1]).all()


def test_full_rate_uses_every_class(generator):
    y = torch.randint(50, (8,), generator=generator)
    _, s = simcore.arcface_partial(torch.randn(8, 4), y, torch.randn(50, 4), sample_rate=1.0, return_sampled=True)
    assert torch.equal(s, torch.arange(50))


# --------------------------------------------------------------------------- bad input
def _args(b=4, d=8, c=20):
    return torch.randn(b, d), torch.randint(c, (b,)), torch.randn(c, d)


@pytest.mark.parametrize("case,exc", [
    ("label_too_big", ValueError), ("label_negative", ValueError), ("int32_labels", TypeError),
    ("float_labels", TypeError), ("dim_mismatch", ValueError), ("batch_mismatch", ValueError),
    ("empty_batch", ValueError), ("mixed_device", ValueError), ("rate_zero", ValueError),
    ("rate_above_one", ValueError), ("bad_reduction", ValueError), ("int_embeddings", TypeError),
    ("weight_transposed", ValueError), ("embeddings_3d", ValueError), ("num_samples_zero", ValueError),
    ("negative_scale", ValueError), ("not_tensor", TypeError),
])
def test_bad_input(case, exc):
    x, y, w = _args()
    kw = {}
    if case == "label_too_big":
        y[1] = 20
    elif case == "label_negative":
        y[0] = -1
    elif case == "int32_labels":
        y = y.int()
    elif case == "float_labels":
        y = y.float()
    elif case == "dim_mismatch":
        w = torch.randn(20, 9)
    elif case == "batch_mismatch":
        y = y[:3]
    elif case == "empty_batch":
        x, y = x[:0], y[:0]
    elif case == "mixed_device":
        y = y.to("meta")
    elif case == "rate_zero":
        kw["sample_rate"] = 0.0
    elif case == "rate_above_one":
        kw["sample_rate"] = 1.5
    elif case == "bad_reduction":
        kw["reduction"] = "avg"
    elif case == "int_embeddings":
        x = x.long()
    elif case == "weight_transposed":
        w = torch.randn(8, 20).t()
    elif case == "embeddings_3d":
        x = x.unsqueeze(0)
    elif case == "num_samples_zero":
        kw["num_samples"] = 0
    elif case == "negative_scale":
        kw["scale"] = -1.0
    elif case == "not_tensor":
        x = x.tolist()
    with pytest.raises(exc):
        simcore.arcface_partial(x, y, w, **kw)


def test_non_contiguous_embeddings_and_labels_are_accepted(generator):
    x = torch.randn(12, 8, generator=generator).t()  # column-major
    y = torch.randint(30, (16,), generator=generator)[::2]
    w = torch.randn(60, 12, generator=generator)[::2]  # strided rows are fine
    loss, s = simcore.arcface_partial(x, y, w, sample_rate=1.0, return_sampled=True)
    ref = margin_softmax_loss(x, y, w, s)
    assert rel_err(loss, ref) <= 1e-5


def test_cpp_rechecks_arguments():
    ext = dispatch.extension()
    y = torch.tensor([0, 5, 21])
    s = torch.arange(20)
    out = torch.empty(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="outside"):
        ext.ms_targets(tensor_arg(y), tensor_arg(s), 20, tensor_arg(out), 1)
    y32, s_desc = y.int(), s.flip(0).contiguous()  # keep the tensors alive while their pointers are used
    with pytest.raises(TypeError, match="int64"):
        ext.ms_targets(tensor_arg(y32), tensor_arg(s), 30, tensor_arg(out), 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        ext.ms_targets(tensor_arg(y), tensor_arg(s_desc), 30, tensor_arg(out), 1)
    cos = torch.zeros(3, 4)
    v, v2 = torch.zeros(3), torch.zeros(2)
    with pytest.raises(ValueError, match="size"):
        ext.ms_lse_block(tensor_arg(cos), tensor_arg(out), 0, kernel_params(), None, tensor_arg(v),
                         tensor_arg(v2), tensor_arg(v), tensor_arg(v), 1)
    with pytest.raises(ValueError, match="m2"):
        ext.ms_grad_block(tensor_arg(cos), tensor_arg(out), 0, kernel_params(m2=4.0), None, tensor_arg(v),
                          tensor_arg(v), tensor_arg(v), 1)
    src, idx, dst, norms = torch.zeros(5, 4), torch.tensor([0, 5]), torch.zeros(2, 4), torch.zeros(2)
    with pytest.raises(ValueError, match="index"):
        ext.ms_normalize_rows(tensor_arg(src), tensor_arg(idx), tensor_arg(dst), tensor_arg(norms), 1e-12, 1)


def test_nan_and_inf_give_nan_loss_for_the_rows_they_reach(generator):
    x, y, w = _args(6, 8, 30)
    x[2, 3] = float("nan")
    loss = simcore.arcface_partial(x, y, w, sample_rate=1.0, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(6) != 2]).all()
    x, y, w = _args(6, 8, 30)
    w[y[0] if y[0] != 7 else 8, 1] = float("inf")  # a sampled centre: reaches every row
    loss = simcore.arcface_partial(x, y, w, sample_rate=1.0, reduction="none")
    assert torch.isnan(loss).all()


# --------------------------------------------------------------------------- torch.compile, autocast
def test_torch_compile_fullgraph(generator):
    x, y, w = _args(16, 32, 100)
    x.requires_grad_()
    w.requires_grad_()

    def f(x, y, w):
        return simcore.arcface_partial(x, y, w, sample_rate=1.0, margin=0.4, scale=40.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y, w)
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = f(x, y, w)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-6 and rel_err(gx, x.grad) <= 1e-6 and rel_err(gw, w.grad) <= 1e-6


def test_autocast_returns_float32(generator):
    lin = torch.nn.Linear(16, 8)
    w = torch.randn(40, 8, generator=generator, requires_grad=True)
    inp = torch.randn(6, 16, generator=generator)
    y = torch.randint(40, (6,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = lin(inp)
        loss, s = simcore.arcface_partial(emb, y, w, sample_rate=1.0, return_sampled=True)
    assert emb.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref = margin_softmax_loss(emb.detach().double(), y, w.detach().double(), s)
    assert rel_err(loss, ref) <= 1e-5
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------- the head
def test_head_sgd_sparse_matches_dense_sgd_on_sampled_rows(generator):
    c, d, b = 200, 16, 12
    head = simcore.PartialMarginHead(c, d, sample_rate=0.25, lr=0.5, momentum=0.9, weight_decay=1e-3)
    dense = head.weight.detach().clone().requires_grad_()
    opt = torch.optim.SGD([dense], lr=0.5, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        x = torch.randn(b, d, generator=generator, requires_grad=True)
        y = torch.randint(c, (b,), generator=generator)
        before = head.weight.clone()
        loss, s = head(x, y, generator=torch.Generator().manual_seed(step), return_sampled=True)
        head.zero_grad()
        loss.backward()
        assert x.grad is not None
        head.step()
        changed = (head.weight != before).any(1)
        mask = torch.zeros(c, dtype=torch.bool)
        mask[s] = True
        assert not changed[~mask].any()  # untouched rows: weight, and momentum below
        assert (head.momentum_buffer[~mask] == 0).all() if step == 0 else True
        if step == 0:  # one step from zero state: equals dense SGD on the sampled rows
            ref = simcore.arcface_partial(x.detach(), y, dense, num_samples=len(s),
                                          generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            ref.backward()
            opt.step()
            assert rel_err(head.weight[s], dense.detach()[s]) <= 1e-6


def test_head_adamw_first_step_matches_torch(generator):
    c, d, b = 100, 8, 10
    head = simcore.PartialMarginHead(c, d, sample_rate=1.0, optimizer="adamw", lr=1e-2, weight_decay=0.0)
    dense = head.weight.detach().clone().requires_grad_()
    x = torch.randn(b, d, generator=generator)
    y = torch.randint(c, (b,), generator=generator)
    head(x, y).backward()
    idx = head.step()
    simcore.arcface_partial(x, y, dense, sample_rate=1.0).backward()
    opt = torch.optim.AdamW([dense], lr=1e-2, weight_decay=0.0)
    opt.step()
    assert torch.equal(idx, torch.arange(c))
    # Adam's first step is ≈ lr·sign(g): float32 differences in tiny gradient entries show, hence 1e-5
    assert rel_err(head.weight, dense.detach()) <= 1e-5
    assert (head.row_step == 1).all()


def test_head_adamw_touches_only_sampled_rows(generator):
    c, d = 300, 8
    head = simcore.PartialMarginHead(c, d, sample_rate=0.1, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    before = head.weight.clone()
    loss, s = head(torch.randn(6, d, generator=generator), torch.randint(c, (6,), generator=generator),
                   generator=generator, return_sampled=True)
    loss.backward()
    head.step()
    mask = torch.zeros(c, dtype=torch.bool)
    mask[s] = True
    assert torch.equal(head.weight[~mask], before[~mask])  # weight decay too moves sampled rows only
    assert (head.exp_avg[~mask] == 0).all() and (head.row_step[~mask] == 0).all()
    assert (head.row_step[mask] == 1).all() and (head.weight[mask] != before[mask]).any(1).all()


@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_head_reads_centres_in_place_as_the_gathered_path_does(subcenters, optimizer, generator):
    """The compiled head reads the sampled centres from ``weight`` and writes their gradient into
    its sink (no gathered copy); the gathered rows with a hook give the same loss, embedding
    gradient and step (the path of a non-static sample size and of the sharded head)."""
    c, d, b = 400, 24, 16
    heads = [simcore.PartialMarginHead(c, d, sample_rate=0.1, optimizer=optimizer, lr=0.05, subcenters=subcenters)
             for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    heads[1]._records_with_hook = True  # the gathered path
    x = torch.randn(b, d, generator=generator)
    y = torch.randint(c, (b,), generator=generator)
    out = []
    for head in heads:
        xi = x.clone().requires_grad_()
        loss = head(xi, y, generator=torch.Generator().manual_seed(3))
        loss.backward()
        ids = head.step()
        out.append((loss.detach(), xi.grad, ids, head.weight.detach().clone()))
    (l0, g0, i0, w0), (l1, g1, i1, w1) = out
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(i0, i1)
    assert torch.equal(w0, w1)


def test_head_grow_and_centres(generator):
    head = simcore.PartialMarginHead(10, 6, sample_rate=0.5)
    emb = torch.randn(15, 6, generator=generator)
    groups = torch.arange(3).repeat_interleave(5)
    centres = simcore.PartialMarginHead.centres_from_embeddings(emb, groups)
    assert centres.shape == (3, 6)
    ids = head.grow(centres)
    assert torch.equal(ids, torch.arange(10, 13)) and head.num_classes == 13
    assert head.momentum_buffer.shape == (13, 6)
    assert torch.allclose(head.weight[12], torch.nn.functional.normalize(emb[10:], dim=1).mean(0))
    loss = head(torch.randn(4, 6, requires_grad=True), torch.tensor([0, 10, 11, 12]))
    loss.backward()
    assert head.step() is not None


def test_head_eval_records_nothing(generator):
    head = simcore.PartialMarginHead(30, 4).eval()
    head(torch.randn(5, 4, requires_grad=True), torch.arange(5)).backward()
    assert head.step() is None


# ------------------------------------------------- CUDA path (a GPU, or the CUDA emulation on the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
@pytest.mark.parametrize("D", [64, 512, 1024])  # 512, 1024: loops over D strided by the 256-thread block
def test_cuda_matches_reference(dtype, blocked, D, generator, engine_opts, cuda_device):
    if blocked:
        engine_opts(**BLOCKED)
    x = (torch.randn(33, D, generator=generator) * 2).to(dtype)
    w = torch.randn(700, D, generator=generator).to(dtype)
    y = _labels(33, 700, generator, duplicates=True)
    xc, wc = x.to(cuda_device).requires_grad_(), w.to(cuda_device).requires_grad_()
    loss, s = simcore.arcface_partial(xc, y.to(cuda_device), wc, sample_rate=0.5, return_sampled=True)
    loss.backward()
    with simcore.cuda_emulation(False):
        rl, rgx, rgw = _reference(x, y, w, s.cpu(), MARGINS["arcface"], "mean")
    # half inputs run their GEMMs on half operands (EngineOptions.lowp_gemms): bfloat16 on bfloat16,
    # float16 on float16 with the gradient block scaled into its range
    tol = 1e-2 if dtype == torch.bfloat16 else FP16_TOL if dtype == torch.float16 else 1e-5
    assert rel_err(loss.cpu(), rl) <= (1e-5 if dtype == torch.float32 else tol)
    assert rel_err(xc.grad.cpu(), rgx) <= tol and rel_err(wc.grad.cpu(), rgw) <= tol


def test_non_unit_upstream_gradient_and_second_backward(generator):
    x, y, w = _args(10, 16, 40)
    x.requires_grad_()
    w.requires_grad_()
    loss, s = simcore.arcface_partial(x, y, w, sample_rate=0.5, return_sampled=True, generator=generator)
    (2.5 * loss).backward(retain_graph=True)
    rl, rgx, rgw = _reference(x, y, w, s, MARGINS["arcface"], "mean", torch.tensor(2.5))
    assert rel_err(x.grad, rgx) <= 1e-5 and rel_err(w.grad, rgw) <= 1e-5
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # reduction='none' recomputes in backward, so retained graphs work
    x.grad = w.grad = None
    rows = simcore.arcface_partial(x, y, w, sample_rate=1.0, reduction="none")
    rows.sum().backward(retain_graph=True)
    first = x.grad.clone()
    rows.sum().backward()
    assert rel_err(x.grad, 2 * first) <= 1e-6


def test_no_grad_and_frozen_weight(generator):
    x, y, w = _args(6, 8, 30)
    with torch.no_grad():
        l0 = simcore.arcface_partial(x, y, w, sample_rate=1.0)
    x.requires_grad_()
    l1 = simcore.arcface_partial(x, y, w, sample_rate=1.0)  # weight frozen: only x gets a gradient
    l1.backward()
    assert rel_err(l0, l1.detach()) <= 1e-7 and x.grad is not None and w.grad is None


# --------------------------------------------------------------------------- CPU GEMM engine
@pytest.mark.parametrize("engine", ["auto", "torch"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
def test_cpu_gemm_engines_match_reference(engine, blocked, generator, engine_opts):
    """oneDNN ("auto" where the probe passes) and the torch.mm fallback give the same losses and
    gradients within float32 tolerance, for the resident and the class-blocked schedule."""
    engine_opts(cpu_gemm=engine)
    if blocked:
        engine_opts(**BLOCKED)
    if engine == "torch":
        assert onednn_linear(torch.device("cpu"), "torch") is None
    b, d, c = 29, 67, 1100
    x = torch.randn(b, d, generator=generator) * 2
    w = torch.randn(c, d, generator=generator) * 0.1
    y = _labels(b, c, generator, duplicates=True)
    for rate in (1.0, 0.45):
        for reduction, g in (("mean", None), ("none", torch.rand(b, generator=generator))):
            loss, sampled, gx, gw = _kernel(x, y, w, MARGINS["arcface"], reduction, g, sample_rate=rate,
                                            generator=torch.Generator().manual_seed(2))
            rl, rgx, rgw = _reference(x, y, w, sampled, MARGINS["arcface"], reduction, g)
            assert rel_err(loss, rl) <= 1e-5 and rel_err(gx, rgx) <= 1e-5 and rel_err(gw, rgw) <= 1e-5


# --------------------------------------------------------------------------- engine options and the block plan
MiB = 1 << 20


@pytest.mark.parametrize("subcenters", [1, 3])
def test_block_plan_uses_each_devices_cap(subcenters):
    """Streamed blocks hold the device's documented bytes of float32 cosines: 24 MiB on CPU
    (below glibc's mmap threshold), 64 MiB on CUDA; one block while B·S·K·4 fits 32 MiB."""
    opts = EngineOptions()
    b, s, k = 1024, 200_000, subcenters

    def fills(block, cap):  # the largest block whose float32 cosines fit cap
        return block * b * k * 4 <= cap < (block + 1) * b * k * 4

    assert fills(plan_block(b, s, k, "cpu", opts), 24 * MiB)
    assert fills(plan_block(b, s, k, "cuda", opts), 64 * MiB)
    assert fills(plan_block(b, s, k, "cuda", EngineOptions(cuda_block_bytes=128 * MiB)), 128 * MiB)
    assert plan_block(256, 10_000, k, "cpu", opts) == 10_000  # 10 MB·K: one block, pass 1's cosines reused
    s48 = 48 * MiB // (4 * b * k)  # past the 32 MiB workspace: streamed on CPU, still one block on CUDA
    assert fills(plan_block(b, s48, k, "cpu", opts), 24 * MiB)
    assert plan_block(b, s48, k, "cuda", opts) == s48
    assert plan_block(100_000, 1_000, k, "cpu", opts) == 256  # never under MIN_BLOCK_CLASSES
    assert plan_block(b, s, k, "cpu", EngineOptions(block_classes=300)) == 300
    assert plan_block(b, 100, k, "cpu", EngineOptions(block_classes=300)) == 100


def test_engine_options_are_scoped_per_thread():
    import threading
    default = current_engine_options()
    assert default == EngineOptions()
    seen = {}
    with engine_options(cpu_gemm="torch", workspace_bytes=0) as outer:
        assert current_engine_options() is outer and outer.cpu_gemm == "torch"
        with engine_options(block_classes=256) as inner:
            assert (inner.cpu_gemm, inner.workspace_bytes, inner.block_classes) == ("torch", 0, 256)
            worker = threading.Thread(target=lambda: seen.setdefault("other", current_engine_options()))
            worker.start()
            worker.join()
        assert current_engine_options() is outer
    assert current_engine_options() == default and seen["other"] == default
    for bad in (dict(lowp_gemms="sometimes"), dict(cpu_gemm="mkl"), dict(workspace_bytes=-1),
                dict(block_classes=0), dict(cuda_block_bytes=1.5), dict(cpu_bf16="yes"), dict(cpu_bf16=1)):
        with pytest.raises(ValueError):
            EngineOptions(**bad)
    with pytest.raises(TypeError):
        engine_options(no_such_option=1).__enter__()


def test_options_reach_the_recomputing_backward(generator, monkeypatch):
    """reduction='none' recomputes in backward, possibly outside the ``with`` block and on
    another thread: it runs with the options in force when the loss was called."""
    import threading
    import simcore.margin.engine as engine
    plans = []
    real_plan = engine.plan_block
    monkeypatch.setattr(engine, "plan_block", lambda *a: plans.append(a[-1].block_classes) or real_plan(*a))
    x, y, w = _args(12, 16, 600)
    x.requires_grad_()
    with engine_options(block_classes=256):
        rows = simcore.arcface_partial(x, y, w, sample_rate=1.0, reduction="none")
    worker = threading.Thread(target=lambda: rows.sum().backward())
    worker.start()
    worker.join()
    assert plans == [256, 256] and x.grad is not None
