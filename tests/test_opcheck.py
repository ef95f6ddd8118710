"""The custom ops checked the way PyTorch checks them (torch.library.opcheck: schema,
autograd registration, fake tensors, AOT dispatch with dynamic shapes), and the
float64 references checked by gradcheck."""
import math

import pytest
import torch

import simcore
from conftest import hardware_only
from simcore.margin import ops, sampling
from simcore.margin.engine import MarginSpec, current_engine_options
from simcore.reference.margin_softmax import margin_softmax_loss, theta_star
from simcore.search import cosine_topk as topk_module

pytestmark = pytest.mark.skipif(simcore.get_backend() != "compiled", reason="checks the compiled ops")

B, D, C = 6, 8, 13
ENGINE = current_engine_options().to_op_arg()


def opcheck(op, args):
    """opcheck raises on the first failing test; the dict says which ones ran."""
    result = torch.library.opcheck(op, args)
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor",
                           "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


def margin_inputs(subcenters, per_row_margins, dtype=torch.float32):
    x = torch.randn(B, D, dtype=dtype, requires_grad=True)
    weight = torch.randn(C * subcenters, D, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, C, (B,))
    sampled = torch.unique(torch.cat([labels, torch.tensor([0, 4, 9])]))
    margins = None
    if per_row_margins:  # (m1, m2, m3) per row near ArcFace's (1, 0.5, 0)
        margins = (torch.tensor([1.0, 0.5, 0.0]) + 0.05 * torch.rand(B, 3)).requires_grad_()
    return x, labels, weight, sampled, margins


# Reductions mean/sum failed test_aot_dispatch_dynamic before: backward read the traced
# upstream gradient's value (scaled_by_upstream's .item()).
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("per_row_margins", [False, True])
@pytest.mark.parametrize("gemm_dtype", ["float32", "bfloat16", "float16"])
def test_margin_softmax_fwd(reduction, subcenters, per_row_margins, gemm_dtype, seed):
    x, labels, weight, sampled, margins = margin_inputs(subcenters, per_row_margins)
    spec = MarginSpec(subcenters=subcenters).as_list()
    opcheck(ops._fwd_op, (x, labels, weight, sampled, margins, spec, subcenters, ops.REDUCTION_CODES[reduction],
                          True, True, per_row_margins, gemm_dtype, ENGINE))


@pytest.mark.parametrize("spec", [MarginSpec(m1=1.0, m2=0.0, m3=0.35, scale=30.0),       # CosFace
                                  MarginSpec(cam_power=2.0),                              # Cam-Softmax
                                  MarginSpec(filter_threshold=0.3, curricular_t=0.1)],   # filter + CurricularFace
                         ids=["cosface", "cam", "filter_curricular"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_margin_softmax_fwd_family(spec, reduction, seed):
    x, labels, weight, sampled, _ = margin_inputs(1, False)
    opcheck(ops._fwd_op, (x, labels, weight, sampled, None, spec.as_list(), 1, ops.REDUCTION_CODES[reduction],
                          True, True, False, "float32", ENGINE))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_margin_softmax_fwd_dynamic_scalars(reduction, seed):
    """CurricularFace's t and a scheduled Cam-Softmax exponent as the op's ``dyn`` tensor (issue 14:
    a float in ``spec`` is a graph constant); the op gives what the floats give."""
    x, labels, weight, sampled, _ = margin_inputs(1, False)
    for spec in (MarginSpec(filter_threshold=0.3, curricular_t=torch.tensor(0.1)),
                 MarginSpec(cam_power=torch.tensor(2.0, dtype=torch.float64))):
        static, dyn = ops.split_dynamic(spec)
        args = (x, labels, weight, sampled, None, static.as_list(), 1, ops.REDUCTION_CODES[reduction],
                True, True, False, "float32", ENGINE)
        opcheck(ops._fwd_op, args + (dyn,))
        got = ops._fwd_op(*args, dyn)[0]
        want = ops._fwd_op(*args[:5], ops.host_spec(spec).as_list(), *args[6:])[0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)], ids=["x", "weight", "neither"])
def test_margin_softmax_fwd_half_and_partial_grads(dtype, needs, seed):
    x, labels, weight, sampled, _ = margin_inputs(1, False, dtype)
    x.requires_grad_(needs[0])
    weight.requires_grad_(needs[1])
    opcheck(ops._fwd_op, (x, labels, weight, sampled, None, MarginSpec().as_list(), 1, ops.REDUCTION_CODES["sum"],
                          needs[0], needs[1], False, "float32", ENGINE))


@pytest.mark.parametrize("subcenters", [1, 2])
@pytest.mark.parametrize("per_row_margins", [False, True])
@pytest.mark.parametrize("gemm_dtype", ["float32", "bfloat16", "float16"])
def test_margin_softmax_bwd(subcenters, per_row_margins, gemm_dtype, seed):
    # The backward op has no autograd of its own (no double backward): inputs without grad.
    x, labels, weight, sampled, margins = (t.detach() if t is not None else None
                                           for t in margin_inputs(subcenters, per_row_margins))
    grad_rows = torch.randn(B)
    opcheck(ops._bwd_op, (x, labels, weight, sampled, margins, grad_rows, MarginSpec(subcenters=subcenters).as_list(),
                          subcenters, True, True, per_row_margins, gemm_dtype, ENGINE))


def exclusions(q, n):
    return torch.stack([torch.randint(0, q, (7,)), torch.randint(0, n, (7,))], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "k=N", "exclude_pairs", "exclude_self", "normalized_blocked"])
def test_cosine_topk(dtype, case, seed):
    q, n, k = 5, 40, 6
    database = torch.randn(n, D).to(dtype)
    queries = database[:q].clone() if case == "exclude_self" else torch.randn(q, D).to(dtype)
    args = dict(k=n if case == "k=N" else k, normalized=case == "normalized_blocked",
                exclude=exclusions(q, n) if case == "exclude_pairs" else None, exclude_self=case == "exclude_self",
                block_size=16 if case == "normalized_blocked" else 0)
    opcheck(topk_module._cosine_topk_op, (queries, database, *args.values()))


@pytest.mark.parametrize("num_classes, num_samples", [(1000, 200),    # static size: labels <= num_samples
                                                      (1000, 20),     # data-dependent: labels may exceed it
                                                      (50, 60),       # every class
                                                      (64, 64)])
def test_sample_classes_op(num_classes, num_samples, seed):
    labels = torch.randint(0, num_classes, (40,))
    randoms = torch.randint(-2**63, 2**63 - 1, (num_samples,))
    opcheck(sampling._sample_classes_op, (labels, randoms, num_classes, num_samples))


@pytest.mark.parametrize("num_classes, num_samples", [(10**6, 10**5), (1000, 200), (1000, 20), (50, 60)])
def test_sample_classes_op_gives_the_eager_ids(num_classes, num_samples, seed):
    """The op, fed the generator's words, returns what sample_classes returns for that generator state."""
    labels = torch.randint(0, num_classes, (256,))
    eager = simcore.sample_classes(labels, num_classes, num_samples, torch.Generator().manual_seed(seed))
    words = torch.empty(num_samples, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sampling._sample_classes_op(labels, words, num_classes, num_samples), eager)


def test_sample_classes_op_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        sampling._sample_classes_op(torch.tensor([3, 10]), torch.zeros(5, dtype=torch.int64), 10, 5)
    with pytest.raises(ValueError, match="needs 3 random words"):
        sampling._sample_classes_op(torch.tensor([3, 4]), torch.zeros(2, dtype=torch.int64), 10, 5)


def test_sample_classes_compiles_fullgraph(seed):
    """Static and data-dependent output sizes, and num_samples varying between calls (symbolic
    once dynamo marks it dynamic: the fake's size bounds must stay static ints)."""
    labels = torch.randint(0, 1000, (64,))
    sample = torch.compile(lambda y, n: simcore.sample_classes(y, 1000, n), fullgraph=True)
    for num_samples in (200, 20, 30, 300):
        got = sample(labels, num_samples)
        assert torch.equal(got, torch.unique(got))  # sorted, no duplicates
        assert torch.isin(labels, got).all()
        assert got.numel() == max(num_samples, labels.unique().numel())


@hardware_only("torch.library.opcheck of the ops' CUDA registrations, on CUDA tensors")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("gemm_dtype", ["float32", "bfloat16", "float16"])
def test_ops_on_cuda(reduction, gemm_dtype, seed):
    """The same checks with CUDA tensors (fake kernels must give CUDA outputs)."""
    x, labels, weight, sampled, margins = (t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None
                                           for t in margin_inputs(2, True))
    opcheck(ops._fwd_op, (x, labels, weight, sampled, margins, MarginSpec(subcenters=2).as_list(), 2,
                          ops.REDUCTION_CODES[reduction], True, True, True, gemm_dtype, ENGINE))
    opcheck(ops._bwd_op, (x.detach(), labels, weight.detach(), sampled, margins.detach(), torch.randn(B, device="cuda"),
                          MarginSpec(subcenters=2).as_list(), 2, True, True, True, gemm_dtype, ENGINE))
    database = torch.randn(40, D, device="cuda", dtype=torch.float16)
    opcheck(topk_module._cosine_topk_op, (database[:5].clone(), database, 6, False, None, True, 0))
    opcheck(sampling._sample_classes_op, (torch.randint(0, 1000, (40,), device="cuda"),
                                          torch.randint(-2**63, 2**63 - 1, (20,)), 1000, 20))


# ---- gradcheck of the float64 references


def away_from_kinks(x, weight, labels, sampled, m1, m2, filter_threshold, gap=1e-4):
    """True when every target angle keeps ``gap`` from θ* = (π − m2)/m1 and −m2/m1 (per row) and every
    cosine from the filter threshold: there the loss has kinks that gradcheck would trip on."""
    x, weight = x.detach(), weight.detach()
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight[sampled], dim=1).T
    theta = torch.acos(cos[torch.arange(len(labels)), torch.searchsorted(sampled, labels)])
    kinks = [theta_star(m1, m2), -m2 / m1]  # ψ's pieces meet there (the second only for m2 < 0)
    clear = all(((theta - t).abs() > gap).all() for t in kinks)
    return bool(clear and ((cos - filter_threshold).abs() > gap).all())


def double_inputs(subcenters=1, m1=1.0, m2=0.5, filter_threshold=math.inf):
    """float64 (x, labels, weight, sampled), redrawn until away from the kinks (sub-centres: the
    max over centres is checked by the per-centre θ* test of the first centre only)."""
    for _ in range(100):
        x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(C * subcenters, D, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, C, (B,))
        sampled = torch.unique(torch.cat([labels, torch.tensor([0, 4, 9])]))
        if subcenters > 1 or away_from_kinks(x, weight, labels, sampled, m1, m2, filter_threshold):
            return x, labels, weight, sampled
    raise AssertionError("no inputs away from the kinks in 100 draws")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("subcenters", [1, 2])
def test_gradcheck_reference_per_row_margins(reduction, subcenters, seed):
    m1 = (1.0 + 0.1 * torch.rand(B, dtype=torch.float64)).requires_grad_()
    m2 = (0.3 + 0.2 * torch.rand(B, dtype=torch.float64)).requires_grad_()
    m3 = (0.1 * torch.rand(B, dtype=torch.float64)).requires_grad_()
    x, labels, weight, sampled = double_inputs(subcenters, m1.detach(), m2.detach())

    def loss(x, weight, m1, m2, m3):
        return margin_softmax_loss(x, labels, weight, sampled, m1=m1, m2=m2, m3=m3, scale=8.0, reduction=reduction,
                                   subcenters=subcenters)
    assert torch.autograd.gradcheck(loss, (x, weight, m1, m2, m3), fast_mode=True)


@pytest.mark.parametrize("variant", [dict(m1=1.0, m2=0.0, m3=0.35), dict(m1=1.0, m2=-0.3, m3=0.0),  # CosFace, AdaFace
                                     dict(cam=2.0), dict(filter_threshold=0.3), dict(curricular_t=0.2)],
                         ids=["cosface", "negative_m2", "cam", "filter", "curricular"])
def test_gradcheck_reference_family(variant, seed):
    x, labels, weight, sampled = double_inputs(1, variant.get("m1", 1.0), variant.get("m2", 0.5),
                                               variant.get("filter_threshold", math.inf))

    def loss(x, weight):
        return margin_softmax_loss(x, labels, weight, sampled, scale=8.0, reduction="none", **variant)
    assert torch.autograd.gradcheck(loss, (x, weight), fast_mode=True)


def test_gradcheck_float64_public_path_with_row_margins(seed):
    """The float64 inputs of the losses run the reference: their row-margin gradients included."""
    x, labels, weight, sampled = double_inputs()
    margins = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64) + 0.05 * torch.rand(B, 3, dtype=torch.float64)
    margins.requires_grad_()

    def loss(x, weight, margins):
        return ops.sampled_margin_loss(x, labels, weight, sampled, MarginSpec(scale=8.0), "mean", row_margins=margins)
    assert torch.autograd.gradcheck(loss, (x, weight, margins), fast_mode=True)


def test_sample_classes_draws_exactly_the_negatives(seed):
    """Eager sampling consumes k = num_samples − #unique(labels) words of the generator, as before
    the custom op existed: a sequence of steps gives the same ids as it always did."""
    labels = torch.randint(0, 1000, (64,))
    g = torch.Generator().manual_seed(seed)
    simcore.sample_classes(labels, 1000, 200, g)
    expected = torch.Generator().manual_seed(seed)
    torch.empty(200 - labels.unique().numel(), dtype=torch.int64).random_(generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())
