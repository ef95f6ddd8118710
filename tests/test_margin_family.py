"""The margin family (simcore.margin.family) on the fused kernel against the float64 reference."""
import math

import pytest
import torch

import simcore
from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.margin.engine import EngineOptions, MarginSpec, centre_ids, fused_margin_softmax
from simcore.reference.margin_softmax import (cam_power, cam_target, margin_softmax_loss, margin_target,
                                              negative_logits)
from conftest import BLOCKED, backend, cuda, poisoned, rel_err

F32_TOL = 1e-5


def _variants():
    """name -> (functional, kwargs); every one also runs with sub-centres and filtering below."""
    return {
        "cam": (simcore.cam_softmax_partial, dict(c=math.pi / 3, scale=20.0)),
        "cam_wide": (simcore.cam_softmax_partial, dict(c=2.0, scale=20.0)),  # c > π/2: exponent < 1
        "adaface": (simcore.adaface_partial, dict(norm_mean=15.0, norm_std=6.0, scale=32.0)),
        "magface": (simcore.magface_partial, dict(scale=32.0)),
        "curricular": (simcore.curricularface_partial, dict(t=0.4, scale=32.0)),
        "arcface": (simcore.arcface_partial, dict(margin=0.5, scale=32.0)),
    }


def _run(fn, x, y, w, dtype, reduction="mean", **kw):
    xx = x.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    loss = fn(xx, y, ww, reduction=reduction, generator=torch.Generator().manual_seed(3), **kw)
    g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) if reduction == "none" else None
    gx, gw = torch.autograd.grad(loss, (xx, ww), g)
    return loss, gx, gw


def _inputs(generator, b, d, c, k, norm_scale=20.0):
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=generator), dim=1)
    x = x * (torch.rand(b, 1, generator=generator) * norm_scale + 5.0)  # norms 5..25: AdaFace/MagFace ranges
    w = torch.randn(c * k, d, generator=generator)
    pool = torch.randperm(c, generator=generator)[:max(1, b // 3)]  # duplicate labels
    y = pool[torch.randint(len(pool), (b,), generator=generator)]
    return x, y, w


@pytest.mark.parametrize("name", list(_variants()))
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("filter_threshold", [None, 0.3])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
def test_float32_kernel_matches_float64_reference(name, subcenters, filter_threshold, blocked, generator,
                                                  engine_opts):
    """Loss and both gradients (MagFace's through the margin to the norms too) to 1e-5."""
    if blocked:  # the two-pass class-blocked path
        engine_opts(**BLOCKED)
    fn, kw = _variants()[name]
    for reduction in ("mean", "none"):
        b, d, c = int(torch.randint(8, 40, (1,), generator=generator)), 24, 700
        x, y, w = _inputs(generator, b, d, c, subcenters)
        kw2 = dict(kw, subcenters=subcenters, filter_threshold=filter_threshold, sample_rate=0.6)
        got = _run(fn, x, y, w, torch.float32, reduction, **kw2)
        ref = _run(fn, x, y, w, torch.float64, reduction, **kw2)  # float64 dispatches to the reference
        ref32 = _ref32(fn, x, y, w, reduction, kw2)
        for out, r64, r32 in zip(got, ref, ref32):
            assert out.dtype == torch.float32
            assert rel_err(out, r64) <= max(F32_TOL, 2 * rel_err(r32, r64)), (name, rel_err(out, r64))


def _clear_winners(x, y, w, k, gap=2e-3, dtype=torch.bfloat16):
    """(x, w) rounded to ``dtype`` such that, for every row, each class's best sub-centre leads
    that class's others by more than ``gap``: half operands move cosines by ~1e-4, and a near-tie
    would hand the class's gradient to another centre (the max over sub-centres is
    discontinuous). Target near-ties move the row toward its leading target centre; non-target
    near-ties (about 2 % of (row, class) pairs at gap 2e-3: they gave errors up to 1.5e-2 in 1 of
    150 bfloat16 runs) move that class's leading centre toward the row, a step small enough
    (1 % of its norm) that it rarely makes a new near-tie elsewhere."""
    if k == 1:
        return x.to(dtype), w
    rows = torch.arange(len(y))
    target = torch.zeros(len(y), w.shape[0] // k, dtype=torch.bool)
    target[rows, y] = True
    for _ in range(50):
        xb = x.to(dtype)
        xn = torch.nn.functional.normalize(xb.double(), dim=1)
        wn = torch.nn.functional.normalize(w.double(), dim=1).view(-1, k, w.shape[1])
        top = torch.einsum("ckd,bd->bck", wn, xn).topk(2, dim=2)
        close = top.values[..., 0] - top.values[..., 1] < gap              # (rows, classes)
        if not close.any():
            return xb, w
        lead_t = wn[y, top.indices[rows, y, 0]].float()                       # rows' leading target centres
        x = torch.where(close[rows, y][:, None], x + 0.05 * x.norm(dim=1, keepdim=True) * lead_t, x)
        i, j = (close & ~target).nonzero(as_tuple=True)
        if len(i):
            lead = j * k + top.indices[i, j, 0]
            w32 = w.float()
            w32.index_add_(0, lead, 0.01 * w32[lead].norm(dim=1, keepdim=True) * xn[i].float())
            w = w32.to(w.dtype)
    raise AssertionError("could not separate the sub-centres")


FP16_TOL = 2.5e-3  # tests/test_margin_softmax.py: float16 operands, 3 more significand bits than bfloat16
# (half dtype, tolerance, near-tie gap of _clear_winners). d = 128: bfloat16 operands move cos θ by
# ~2^-9/√d, which scale·(t + 2cos θ) amplifies (d = 64 reached 1.18e-2 for CurricularFace, K = 3,
# seed 1196671057).
HALF_GEMMS = {torch.bfloat16: (1e-2, 2e-3), torch.float16: (FP16_TOL, 5e-4)}


@pytest.mark.parametrize("name", list(_variants()))
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
@pytest.mark.parametrize("half", list(HALF_GEMMS), ids=["bf16", "fp16"])
def test_half_gemms_match_float64_reference(name, subcenters, blocked, half, generator, engine_opts):
    """The CUDA path for half inputs (half GEMM operands; float16's gradient block scaled into its
    range), run on CPU with half embeddings and weight, against float64."""
    tol, gap = HALF_GEMMS[half]
    engine_opts(lowp_gemms="always")
    if blocked:
        engine_opts(**BLOCKED)
    fn, kw = _variants()[name]
    for reduction in ("mean", "none"):
        b, d, c = int(torch.randint(8, 40, (1,), generator=generator)), 128, 700
        x, y, w = _inputs(generator, b, d, c, subcenters)
        x, w = _clear_winners(x, y, w.to(half), subcenters, gap=gap, dtype=half)
        kw2 = dict(kw, subcenters=subcenters, sample_rate=1.0)
        got = _run(fn, x, y, w, half, reduction, **kw2)
        ref = _run(fn, x, y, w, torch.float64, reduction, **kw2)
        for out, r64 in zip(got, ref):
            assert torch.isfinite(out).all() and rel_err(out, r64) <= tol, (name, rel_err(out, r64))


def _ref32(fn, x, y, w, reduction, kw):
    """The plain reference in float32: how close float32 itself can get (scale amplifies rounding)."""
    with backend("reference"):
        return _run(fn, x, y, w, torch.float32, reduction, **kw)


@pytest.mark.parametrize("name", ["cam", "adaface", "magface", "curricular", "arcface"])
def test_gradcheck_reference_float64(name, generator):
    fn, kw = _variants()[name]
    x, y, w = _inputs(generator, 6, 5, 9, 2)
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    kw = dict(kw, subcenters=2, filter_threshold=0.6, sample_rate=1.0)
    if name == "adaface":  # AdaFace detaches its norms by design: check its margins as fixed per-row tensors
        m1, m2, m3 = simcore.margin.family.adaface_margins(x.norm(dim=1), norm_mean=15.0, norm_std=6.0)
        fn, kw = simcore.margin_softmax_partial, dict(m1=m1.double(), m2=m2.double(), m3=m3.double(), scale=32.0,
                                                      subcenters=2, filter_threshold=0.6, sample_rate=1.0)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, y, b, **kw), (x, w), eps=1e-6, atol=1e-5)


def test_gradcheck_reference_margins_float64(generator):
    """Per-row margins are differentiable in the reference (away from the piecewise joints)."""
    c = torch.rand(7, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    m = [torch.rand(7, generator=generator, dtype=torch.float64) * 0.3 + 0.9,
         torch.rand(7, generator=generator, dtype=torch.float64) * 0.5,
         torch.rand(7, generator=generator, dtype=torch.float64) * 0.3]
    m = [v.requires_grad_() for v in m]
    assert torch.autograd.gradcheck(lambda a, b, e: margin_target(c, a, b, e), tuple(m))


def test_cam_softmax_target_properties():
    for c in (math.pi / 4, math.pi / 3, math.pi / 2, 2.0):
        p = cam_power(c)
        x = torch.tensor([-1.0, math.cos(c), 1.0], dtype=torch.float64)
        torch.testing.assert_close(cam_target(x, p), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
        # the paper's form (1 + x)^c′ / 2^(c′−1) − 1
        grid = torch.linspace(-0.99, 0.99, 50, dtype=torch.float64)
        torch.testing.assert_close(cam_target(grid, p), (1 + grid) ** p / 2 ** (p - 1) - 1)
    assert cam_power(math.pi / 2) == pytest.approx(1.0)


def test_cam_pi_over_2_is_the_plain_normalised_softmax(generator):
    x, y, w = _inputs(generator, 16, 12, 50, 1)
    cam = simcore.cam_softmax_partial(x, y, w, c=math.pi / 2, scale=20.0, sample_rate=1.0)
    plain = simcore.cosface_partial(x, y, w, margin=0.0, scale=20.0, sample_rate=1.0)
    assert rel_err(cam, plain) <= 1e-6


def test_cam_schedule_is_linear_then_flat():
    sched = simcore.CamSchedule()
    assert sched(0) == pytest.approx(math.pi / 2)
    assert sched(1000) == pytest.approx(math.pi / 2 - 0.1)
    assert sched(10**6) == pytest.approx(math.pi / 4)
    mod = simcore.CamSoftmax(scale=20.0, schedule=sched)
    x, y, w = torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), torch.randn(10, 8)
    for _ in range(3):
        mod(x, y, w, sample_rate=1.0)
    assert int(mod.step) == 3 and mod.c == pytest.approx(math.pi / 2 - 2e-4)
    mod.eval()
    mod(x, y, w, sample_rate=1.0)
    assert int(mod.step) == 3
    with pytest.raises(ValueError, match="end"):
        simcore.CamSchedule(start=1.0, end=1.2)


def test_adaface_margins_and_ema(generator):
    x = torch.randn(10, 6, generator=generator) * torch.linspace(1, 8, 10)[:, None]
    norms = x.norm(dim=1)
    m1, m2, m3 = simcore.margin.family.adaface_margins(norms, margin=0.4, h=0.333, norm_mean=10.0, norm_std=5.0)
    z = ((norms - 10.0) / (5.0 + 1e-3) * 0.333).clamp(-1, 1)
    torch.testing.assert_close(m2, -0.4 * z)
    torch.testing.assert_close(m3, 0.4 * z + 0.4)
    assert (m1 == 1).all()
    mod = simcore.AdaFace()
    y, w = torch.randint(20, (10,), generator=generator), torch.randn(20, 6, generator=generator)
    mod(x, y, w, sample_rate=1.0)
    torch.testing.assert_close(mod.norm_mean, 0.99 * 20.0 + 0.01 * norms.mean())
    torch.testing.assert_close(mod.norm_std, 0.99 * 100.0 + 0.01 * norms.std())


def test_magface_margin_and_regulariser(generator):
    x = torch.nn.functional.normalize(torch.randn(4, 5, generator=generator), dim=1)
    x = x * torch.tensor([5.0, 10.0, 60.0, 200.0])[:, None]
    m, a = simcore.margin.family.magface_margin(x)
    torch.testing.assert_close(m, torch.tensor([0.45, 0.45, 0.625, 0.8]))
    torch.testing.assert_close(a, torch.tensor([10.0, 10.0, 60.0, 110.0]))
    y, w = torch.tensor([0, 1, 2, 3]), torch.randn(6, 5, generator=generator)
    total = simcore.magface_partial(x, y, w, sample_rate=1.0, reduction="none")
    ce = simcore.margin_softmax_partial(x, y, w, m2=m, scale=64.0, sample_rate=1.0, reduction="none")
    torch.testing.assert_close(total, ce + 35.0 * (a / 110.0 ** 2 + 1 / a))


def test_curricular_hard_negatives_by_hand():
    """One row, three classes: the negative above ψ(target) becomes a·(t + a), the other stays."""
    t, s, m = 0.3, 10.0, 0.5
    cos_t, hard, easy = 0.8, 0.7, 0.1            # ψ = cos(acos 0.8 + 0.5) ≈ 0.3776: 0.7 is hard
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[cos_t, math.sqrt(1 - cos_t ** 2), 0.0], [hard, 0.0, math.sqrt(1 - hard ** 2)],
                      [easy, -math.sqrt(1 - easy ** 2), 0.0]], dtype=torch.float64)
    psi = math.cos(math.acos(cos_t) + m)
    logits = torch.tensor([[s * psi, s * hard * (t + hard), s * easy]], dtype=torch.float64)
    expect = torch.nn.functional.cross_entropy(logits, torch.tensor([0]))
    for dt in (torch.float64, torch.float32):
        got = simcore.curricularface_partial(x.to(dt), torch.tensor([0]), w.to(dt), margin=m, scale=s, t=t,
                                             sample_rate=1.0)
        assert abs(float(got) - float(expect)) <= 1e-6


def test_curricular_module_updates_t_from_target_cosines(generator):
    x, y, w = _inputs(generator, 12, 8, 30, 1)
    mod = simcore.CurricularFace()
    mod(x, y, w, sample_rate=1.0)
    tc = torch.nn.functional.cosine_similarity(x, w[y], dim=1)
    torch.testing.assert_close(mod.t, 0.01 * tc.mean(), rtol=1e-5, atol=1e-7)


def test_filtered_negatives_get_no_gradient(generator):
    x = torch.randn(5, 8, generator=generator)
    w = torch.randn(12, 8, generator=generator)
    w[11] = x[0] * 3  # class 11: cosine 1 with row 0, filtered at 0.4
    y = torch.tensor([0, 1, 2, 3, 4])
    ww = w.clone().requires_grad_()
    simcore.arcface_partial(x[:1], y[:1], ww, sample_rate=1.0, filter_threshold=0.4).backward()
    assert ww.grad[11].abs().max() == 0
    assert ww.grad[:11].abs().sum() > 0
    # and the filtered logit is 0: the same loss as with class 11's centre orthogonal to the row
    got = simcore.arcface_partial(x[:1], y[:1], w, sample_rate=1.0, filter_threshold=0.4)
    w_orth = w.double().clone()
    w_orth[11] = torch.linalg.svd(x[:1].double()).Vh[1]  # a unit vector orthogonal to x[0]
    ref = margin_softmax_loss(x[:1].double(), y[:1], w_orth, torch.arange(12), m2=0.5, filter_threshold=0.4)
    assert abs(float(got) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    torch.testing.assert_close(negative_logits(torch.tensor([0.9, 0.1]), 2.0, filter_threshold=0.4),
                               torch.tensor([0.0, 0.2]))


def test_subcenter_class_cosine_is_the_max_and_gradient_goes_to_the_winner(generator):
    d, k = 6, 3
    x = torch.randn(1, d, generator=generator)
    w = torch.randn(4 * k, d, generator=generator)
    w[1 * k + 2] = x[0] * 2 + 0.3 * torch.randn(d, generator=generator)  # class 1's third centre wins
    ww = w.clone().requires_grad_()
    # scale 8, not 64: at 64 the winner's softmax rounds to 1 in float32 and its true gradient
    # (~1e-8 and below) to 0, so a nonzero gradient there would be rounding noise
    loss = simcore.arcface_partial(x, torch.tensor([1]), ww, sample_rate=1.0, subcenters=k, scale=8.0)
    loss.backward()
    assert ww.grad[1 * k + 2].abs().sum() > 0
    assert ww.grad[[1 * k, 1 * k + 1]].abs().max() == 0  # the losing centres get nothing
    wd = w.double().requires_grad_()
    ref = margin_softmax_loss(x.double(), torch.tensor([1]), wd, torch.arange(4), subcenters=k, scale=8.0)
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    # θ near 0 makes ArcFace's d cos(θ + m) / d cos ill-conditioned: up to 4e-5 over 500 seeds
    assert rel_err(ww.grad, wd.grad) <= 2e-4


def test_subcenter_dominant_drops_outliers(generator):
    d, k, c = 8, 3, 2
    w = torch.nn.functional.normalize(torch.randn(c * k, d, generator=generator), dim=1)
    # class 0: five samples near centre 1, one near centre 0 (minority), one opposite (outlier)
    near = lambda v: v + 0.05 * torch.randn(d, generator=generator)  # noqa: E731
    emb = torch.stack([near(w[1]) for _ in range(5)] + [near(w[0]), -w[1], near(w[4]), near(w[4])])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1])
    centres, keep = simcore.subcenter_dominant(w, k, emb, labels)
    torch.testing.assert_close(centres, torch.stack([w[1], w[4]]))
    assert keep.tolist() == [True] * 5 + [bool(torch.dot(torch.nn.functional.normalize(emb[5], dim=0), w[1])
                                               >= math.cos(math.radians(75)))] + [False, True, True]


def test_head_with_each_variant_trains_and_keeps_state(generator):
    for loss in (simcore.CamSoftmax(c=1.2), simcore.AdaFace(), simcore.MagFace(), simcore.CurricularFace(),
                 simcore.ArcFace(0.4, 40.0)):
        head = simcore.PartialMarginHead(50, 8, sample_rate=0.5, loss=loss, subcenters=2, filter_threshold=0.6,
                                         lr=0.5)
        before = head.weight.detach().clone()
        x = (torch.randn(6, 8, generator=generator) * 20).requires_grad_()
        y = torch.randint(50, (6,), generator=generator)
        out, sampled = head(x, y, return_sampled=True, generator=torch.Generator().manual_seed(0))
        out.backward()
        rows = head.step()
        assert torch.equal(rows, centre_ids(sampled, 2))
        moved = (head.weight != before).any(1)
        assert moved.any() and not moved[~torch.isin(torch.arange(100), rows)].any()
        assert set(head.state_dict()) >= {"weight"} | {f"loss.{n}" for n, _ in loss.named_buffers()}
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_poisoned_gradients_fully_written_with_subcenters(generator):
    b, d, c, k = 9, 12, 40, 3
    x, y, w = _inputs(generator, b, d, c, k)
    sampled = simcore.sample_classes(y, c, 20, generator)
    spec = MarginSpec(subcenters=k, filter_threshold=0.5, curricular_t=0.2)
    for options in (EngineOptions(), EngineOptions(block_classes=7)):
        gx, gw = poisoned((b, d)), poisoned((c * k, d))
        loss, _ = fused_margin_softmax(x, y, w, sampled, spec, row_weight=torch.full((b,), 1.0 / b), grad_x=gx,
                                       grad_w=gw, options=options)
        rows = torch.zeros(c * k, dtype=torch.bool)
        rows[centre_ids(sampled, k)] = True
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
        assert torch.isfinite(gw[rows]).all() and torch.isnan(gw[~rows]).all()


def test_bad_family_arguments():
    x, y, w = torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), torch.randn(10, 8)
    with pytest.raises(ValueError, match="multiple of subcenters"):
        simcore.arcface_partial(x, y, w, subcenters=3)
    with pytest.raises(ValueError, match="subcenters"):
        simcore.arcface_partial(x, y, w, subcenters=0)
    with pytest.raises(ValueError, match="labels must lie in"):
        simcore.arcface_partial(x, torch.tensor([0, 1, 2, 5]), w, subcenters=2)
    with pytest.raises(ValueError, match="c must"):
        simcore.cam_softmax_partial(x, y, w, c=0.0)
    with pytest.raises(ValueError, match="filter_threshold"):
        simcore.arcface_partial(x, y, w, filter_threshold=float("nan"))
    with pytest.raises(ValueError, match="m2 must be"):
        simcore.margin_softmax_partial(x, y, w, m2=torch.zeros(3))
    with pytest.raises(ValueError, match="per-row margins"):
        simcore.margin_softmax_partial(x, y, w, m2=torch.full((4,), 4.0))
    with pytest.raises(ValueError, match="per-row margins"):
        simcore.margin_softmax_partial(x, y, w, m1=torch.zeros(4))
    with pytest.raises(TypeError, match="loss must be"):
        simcore.PartialMarginHead(10, 8, loss=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="u_a"):
        simcore.magface_partial(x, y, w, l_a=10.0, u_a=5.0)
    ext, t = dispatch.extension(), tensor_arg
    # named tensors: a packed tuple does not keep its tensor alive
    g, arg, out = torch.zeros(2, 3), torch.full((2, 3), 7, dtype=torch.uint8), torch.zeros(2, 9)
    with pytest.raises(ValueError, match="argmax holds"):
        ext.ms_subcenter_expand(t(g), t(arg), 3, t(out), 1)
    ck, cls, win = torch.zeros(2, 8), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sub-centres"):
        ext.ms_subcenter_max(t(ck), 3, t(cls), t(win), 1)
    cos, tcol, rm = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), torch.tensor([[0.0, 0.5, 0.0],
                                                                                      [1.0, 0.5, 0.0]])
    vecs = [torch.zeros(2) for _ in range(4)]
    with pytest.raises(ValueError, match="row_margins"):
        ext.ms_lse_block(t(cos), t(tcol), 0, MarginSpec().kernel_params(), t(rm), *map(t, vecs), 1)


def test_compile_with_per_row_margins(generator):
    x, y, w = _inputs(generator, 8, 16, 40, 1)
    x.requires_grad_()
    fn = torch.compile(lambda a: simcore.adaface_partial(a, y, w, sample_rate=1.0), backend="eager")
    eager = simcore.adaface_partial(x, y, w, sample_rate=1.0)
    got = fn(x)
    torch.testing.assert_close(got, eager)
    (gx,) = torch.autograd.grad(got, x)
    (ex,) = torch.autograd.grad(eager, x)
    torch.testing.assert_close(gx, ex)


# --------------------------------------------------------------------------- dynamic scalars (dyn)
# CurricularFace's t and a scheduled Cam-Softmax exponent reach the block kernels as the float64
# tensor dyn = (cam_power, curricular_t) (engine.split_dynamic), read where it lives: on CUDA from
# device memory, so a step needs no host read.
_DYN_SPECS = {
    "curricular": (MarginSpec(m2=0.5, scale=32.0, curricular_t=0.37), "curricular_t"),
    "curricular_filter": (MarginSpec(m2=0.4, scale=32.0, filter_threshold=0.3, curricular_t=-0.21), "curricular_t"),
    "cam": (MarginSpec(scale=20.0, cam_power=cam_power(math.pi / 3)), "cam_power"),
    "cam_wide": (MarginSpec(scale=20.0, cam_power=cam_power(2.0)), "cam_power"),
}


@pytest.mark.parametrize("name", list(_DYN_SPECS))
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
@pytest.mark.parametrize("how", ["tensor_in_spec", "dyn_argument"])
def test_dynamic_scalars_match_the_float_path_bit_for_bit(name, subcenters, blocked, how, generator):
    """The same loss and gradients, bit for bit, whether t / cam_power is a float in the spec or a
    (float32 or float64) tensor read by the kernels (CPU)."""
    spec, field = _DYN_SPECS[name]
    spec = spec._replace(subcenters=subcenters)
    b, d, c = 23, 16, 300
    x, y, w = _inputs(generator, b, d, c, subcenters)
    sampled = torch.sort(torch.cat([torch.unique(y), torch.randperm(c, generator=generator)[:150]])).values.unique()
    opts = EngineOptions(block_classes=64) if blocked else EngineOptions()
    rw = torch.rand(b, generator=generator)

    def run(sp, dyn=None):
        gx, gw = poisoned((b, d)), torch.zeros(c * subcenters, d)
        loss, tcos = fused_margin_softmax(x, y, w, sampled, sp, row_weight=rw, grad_x=gx, grad_w=gw, options=opts,
                                          dyn=dyn)
        return loss, tcos, gx, gw

    want = run(spec)
    value = getattr(spec, field)
    for dtype in (torch.float64, torch.float32):
        v = torch.tensor(value, dtype=dtype)
        if dtype == torch.float32:  # the float path with the value the tensor holds
            want = run(spec._replace(**{field: float(v)}))
        dyn_spec = spec._replace(**{field: v})
        if how == "tensor_in_spec":
            got = run(dyn_spec)
        else:
            static, dyn = simcore.margin.engine.split_dynamic(dyn_spec)
            assert getattr(static, field) == (1.0 if field == "cam_power" else 0.0)  # the placeholder
            got = run(static, dyn)
        for g, e in zip(got, want):
            assert torch.equal(g, e) or (torch.isnan(g).equal(torch.isnan(e)) and torch.equal(g.nan_to_num(),
                                                                                               e.nan_to_num()))


def test_dynamic_scalars_through_the_modules_match_the_functionals(generator):
    """CurricularFace (t a buffer) and a scheduled CamSoftmax through the head's compiled ops give what
    the functionals give with the same values as floats, for reduction mean and none (the
    recomputing backward reads dyn again)."""
    x, y, w = _inputs(generator, 12, 8, 40, 1)
    mod = simcore.CurricularFace(margin=0.5, scale=16.0).eval()
    mod.t.fill_(0.25)
    cam = simcore.CamSoftmax(scale=16.0, schedule=simcore.CamSchedule(start=2.0, end=1.2, rate=0.1)).eval()
    cam.step.fill_(3)
    c3 = float(simcore.CamSchedule(start=2.0, end=1.2, rate=0.1)(3))
    for module, fn, kw in ((mod, simcore.curricularface_partial, dict(margin=0.5, scale=16.0, t=0.25)),
                           (cam, simcore.cam_softmax_partial, dict(c=c3, scale=16.0))):
        for reduction in ("mean", "none"):
            a = _run(module, x, y, w, torch.float32, reduction, sample_rate=1.0)
            b = _run(fn, x, y, w, torch.float32, reduction, sample_rate=1.0, **kw)
            for g, e in zip(a, b):
                assert torch.equal(g, e)


def test_dyn_boundary_checks():
    """The block kernels check dyn (float64, 2 values, contiguous, on cos's device) and its values."""
    ext, t = dispatch.extension(), tensor_arg
    cos, tcol = torch.rand(2, 3) * 2 - 1, torch.zeros(2, dtype=torch.int64)
    vecs = [torch.zeros(2) for _ in range(4)]
    p = MarginSpec(curricular_t=0.0).kernel_params()
    keep = []

    def calls(dyn):
        g = cos.clone()  # grad_block writes in place
        return (lambda: ext.ms_lse_block(t(cos), t(tcol), 0, p, None, *map(t, vecs), 1, dyn=dyn),
                lambda: ext.ms_grad_block(t(g), t(tcol), 0, p, None, *map(t, vecs[:3]), 1, dyn=dyn))

    def packed(tensor, **changes):  # the tensor kept alive: a packed tensor_arg does not hold it
        keep.append(tensor)
        f = list(t(tensor))
        for k, v in changes.items():
            f[dict(device=4, device_index=5)[k]] = v
        return tuple(f)

    cases = [
        (packed(torch.zeros(2)), TypeError, "dyn must be float64"),
        (packed(torch.zeros(2, dtype=torch.int64)), TypeError, "dyn must be float64"),
        (packed(torch.zeros(3, dtype=torch.float64)), ValueError, "dyn must hold 2 values"),
        (packed(torch.zeros(1, 2, dtype=torch.float64)), ValueError, "dyn must hold 2 values"),
        (packed(torch.zeros((), dtype=torch.float64)), ValueError, "dyn must hold 2 values"),
        (packed(torch.zeros(4, dtype=torch.float64)[::2]), ValueError, "dyn must be contiguous"),
        (packed(torch.zeros(2, dtype=torch.float64), device="cuda", device_index=0), ValueError,
         "dyn is on the wrong device"),
        (packed(torch.tensor([-1.0, math.nan], dtype=torch.float64)), ValueError,
         "cam_power must be a finite number >= 0"),
        (packed(torch.tensor([math.inf, math.nan], dtype=torch.float64)), ValueError, "cam_power must be a finite"),
        (packed(torch.tensor([math.nan, math.inf], dtype=torch.float64)), ValueError, "curricular_t must be finite"),
    ]
    for dyn, err, msg in cases:
        for call in calls(dyn):
            with pytest.raises(err, match=msg):
                call()
    for dyn in (None, packed(torch.tensor([math.nan, math.nan], dtype=torch.float64)),
                packed(torch.tensor([2.0, -0.3], dtype=torch.float64))):  # fine
        for call in calls(dyn):
            call()
    with pytest.raises(ValueError, match="dyn given with tensor fields"):
        x, y, w = torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 4)
        fused_margin_softmax(x, y, w, torch.arange(3), MarginSpec(curricular_t=torch.tensor(0.1)),
                             dyn=torch.tensor([math.nan, 0.1], dtype=torch.float64))


def test_bad_dynamic_values_are_caught(monkeypatch):
    """A module's t / exponent out of range: ValueError on the host check, RuntimeError from the
    device-side assertion (torch._assert_async on CPU), and with validate="never" the CPU kernel's
    own check (a NaN state reaches it as +inf: never silently the placeholder)."""
    from simcore.margin import checks
    x, y = torch.randn(6, 8), torch.tensor([0, 3, 3, 7, 9, 1])
    for bad in (math.nan, math.inf):
        for how, err in (("host", ValueError), ("device", RuntimeError)):
            with monkeypatch.context() as m:
                m.setattr(checks, "value_check", lambda validate, device, sig, how=how: how)
                head = simcore.PartialMarginHead(10, 8, sample_rate=1.0, loss=simcore.CurricularFace())
                head.loss.t.fill_(bad)
                with pytest.raises(err, match="curricular_t must be a finite number"):
                    head(x, y)
                head = simcore.PartialMarginHead(10, 8, sample_rate=1.0,
                                                 loss=simcore.CamSoftmax(schedule=simcore.CamSchedule()))
                monkeypatch.setattr(head.loss.schedule, "power_at",
                                    lambda step, bad=bad: torch.tensor(-bad if bad == math.inf else bad,
                                                                       dtype=torch.float64))
                with pytest.raises(err, match="cam_power must be a finite number >= 0"):
                    head(x, y)
        head = simcore.PartialMarginHead(10, 8, sample_rate=1.0, loss=simcore.CurricularFace(), validate="never")
        head.loss.t.fill_(bad)
        with pytest.raises(ValueError, match="curricular_t must be finite, got inf"):
            head(x, y)


# ------------------------------------------------- CUDA path (a GPU, or the CUDA emulation on the CPU)
@pytest.mark.parametrize("name", list(_DYN_SPECS))
def test_cuda_kernels_read_dyn_from_device_memory(name, generator, cuda_device):
    """CUDA: dyn read by the kernels gives what the floats give (same kernels, so bit for bit), and a
    bad value that validate="never" lets through gives NaN (never undefined behaviour)."""
    spec, field = _DYN_SPECS[name]
    b, d, c = 19, 16, 300
    dev = cuda_device
    x, y, w = (t.to(dev) for t in _inputs(generator, b, d, c, 1))
    sampled = torch.arange(c, device=dev)
    rw = torch.full((b,), 1.0 / b, device=dev)

    def run(sp):
        gx, gw = torch.empty(b, d, device=dev), torch.empty(c, d, device=dev)
        loss, _ = fused_margin_softmax(x, y, w, sampled, sp, row_weight=rw, grad_x=gx, grad_w=gw,
                                       options=EngineOptions(block_classes=128))
        return loss, gx, gw

    want = run(spec)
    got = run(spec._replace(**{field: torch.tensor(getattr(spec, field), dtype=torch.float64, device=dev)}))
    for g, e in zip(got, want):
        assert torch.equal(g, e)
    for bad in (math.nan, math.inf, -1.0):
        if bad == -1.0 and field == "curricular_t":
            continue  # any finite t is valid
        got = run(spec._replace(**{field: torch.tensor(bad, device=dev)}))
        for g in got:
            assert torch.isnan(g).all()


@pytest.mark.parametrize("name", list(_variants()))
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "class-blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [512, 1024])  # above the kernels' 256-thread blocks
def test_cuda_matches_float64_reference(name, blocked, dtype, D, generator, engine_opts, cuda_device):
    """Every classes sampled (sample_rate=1), so the CPU float64 reference sees the same problem.
    float32 as on CPU; the half dtypes at half tolerance, on inputs exact in them (bfloat16 runs
    its GEMMs on bfloat16 operands). float16 adds rows whose squared norms overflow float16."""
    if blocked:  # the class-blocked two-pass path
        engine_opts(**BLOCKED)
    fn, kw = _variants()[name]
    x, y, w = _inputs(generator, 33, D, 300, 3)
    half = dtype != torch.float32
    if dtype == torch.float16:  # norms up to ~5000 and ~2400: ‖·‖² far beyond 65504
        x[:4] *= 200.0
        w[:6] *= 300.0
    w = w.to(dtype)
    x, w = _clear_winners(x, y, w, 3) if half else (x, w)  # bfloat16 values: exact in float16 as well
    kw = dict(kw, subcenters=3, sample_rate=1.0)
    kw = kw if half else dict(kw, filter_threshold=0.3)  # a discontinuity half operands may cross
    xc, wc = x.to(cuda_device, dtype).requires_grad_(), w.to(cuda_device).requires_grad_()
    loss = fn(xc, y.to(cuda_device), wc, **kw)
    loss.backward()
    with simcore.cuda_emulation(False):
        ref = _run(fn, x, y, w, torch.float64, **kw)
        ref32 = _ref32(fn, x, y, w, "mean", kw)
    for out, r64, r32 in zip((loss, xc.grad, wc.grad), ref, ref32):
        tol = 1e-2 if half else max(F32_TOL, 2 * rel_err(r32, r64))
        assert rel_err(out.cpu(), r64) <= tol, (name, rel_err(out.cpu(), r64))
