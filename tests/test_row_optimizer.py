"""The sparse row optimizers (simcore.margin.row_optimizer: ro_sgd / ro_adamw in simcore._C)
against the float64 reference (simcore.reference.row_optimizer) and against torch.optim on a
dense parameter; rows that are not updated stay bit for bit as they were; GradScaler's
grad_scale / found_inf; the boundary's checks."""
import math
import sys

import pytest
import torch

import simcore
from conftest import no_host_syncs, synchronize
from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.margin import row_optimizer
from simcore.reference import row_optimizer as reference

pytestmark = pytest.mark.skipif(simcore.get_backend() != "compiled", reason="checks the compiled kernels")

HALF_EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def make_state(optimizer, c, d, dtype, device="cpu"):
    """Random centres and optimizer state (AdamW: exp_avg_sq > 0, a few steps already taken)."""
    weight = torch.randn(c, d, device=device).to(dtype)
    if optimizer == "sgd":
        return {"weight": weight, "momentum_buffer": torch.randn(c, d, device=device)}
    return {"weight": weight, "exp_avg": 0.1 * torch.randn(c, d, device=device),
            "exp_avg_sq": 0.01 * torch.rand(c, d, device=device), "row_step": torch.randint(0, 6, (c,), device=device)}


def sorted_rows(c, n, device="cpu"):
    """n sorted unique ids of [0, c) that include the first and the last row."""
    inner = torch.randperm(c - 2)[:max(0, n - 2)] + 1
    return torch.unique(torch.cat([torch.tensor([0, c - 1]), inner]))[:n].to(device)


def run(optimizer, state, rows, grad, grad_scale=None, found_inf=None, hyper=None, fn=None):
    """One update of ``state`` (in place) by ``fn`` (the compiled op or the reference)."""
    hyper = hyper or {}
    if optimizer == "sgd":
        fn = fn or row_optimizer.row_sgd_
        fn(state["weight"], rows, grad, state.get("momentum_buffer"), grad_scale, found_inf, **hyper)
    else:
        fn = fn or row_optimizer.row_adamw_
        fn(state["weight"], rows, grad, state["exp_avg"], state["exp_avg_sq"], state["row_step"], grad_scale,
           found_inf, **hyper)


HYPER = {
    "sgd": dict(lr=0.3, momentum=0.9, weight_decay=1e-3),
    "sgd-plain": dict(lr=0.3, momentum=0.0, weight_decay=0.0),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    "adamw-nodecay": dict(lr=3e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.0),
    "adamw-beta0": dict(lr=1e-2, betas=(0.0, 0.0), eps=1e-8, weight_decay=0.05),  # 0**t: log(0) = -inf inside
}


@pytest.mark.parametrize("variant", list(HYPER))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 7, 128])
@pytest.mark.parametrize("amp", [False, True])
def test_matches_float64_reference_and_leaves_other_rows(variant, dtype, d, amp, seed):
    optimizer = variant.split("-")[0]
    c = 257
    state = make_state(optimizer, c, d, dtype)
    if variant == "sgd-plain":
        del state["momentum_buffer"]
    rows = sorted_rows(c, 1 + int(torch.randint(0, c, ())))
    scale = torch.tensor(2.0 ** 12) if amp else None
    grad = torch.randn(rows.numel(), d) * (2.0 ** 12 if amp else 1.0)
    # float64 reference on the same values; unsampled rows of the compiled run are poisoned
    ref = {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in state.items()}
    run(optimizer, ref, rows, grad.double(), scale, torch.tensor(0.0) if amp else None, HYPER[variant], fn=getattr(
        reference, f"row_{optimizer}_"))
    out = {k: v.clone() for k, v in state.items()}
    others = torch.ones(c, dtype=torch.bool)
    others[rows] = False
    for k, v in out.items():
        v[others] = torch.iinfo(v.dtype).max if not v.is_floating_point() else math.nan
    poisoned_before = {k: v.clone() for k, v in out.items()}
    run(optimizer, out, rows, grad, scale, torch.tensor(0.0) if amp else None, HYPER[variant])
    grad_size = (grad / (scale if amp else 1.0)).abs().max().item()
    for k, v in out.items():
        # rows not listed: bit for bit as they were (the poison is still there, nothing else)
        assert torch.equal(v[others].view(torch.uint8) if v.is_floating_point() else v[others],
                           poisoned_before[k][others].view(torch.uint8) if v.is_floating_point()
                           else poisoned_before[k][others]), k
        if not v.is_floating_point():
            assert torch.equal(v[rows], ref[k][rows]), k
            continue
        got, want = v[rows].double(), ref[k][rows]
        assert torch.isfinite(got).all(), k
        # one rounding of the stored value, plus float32 arithmetic: a few ulps of the largest term
        terms = want.abs().max().item() + state[k][rows].double().abs().max().item() + grad_size
        stored_eps = HALF_EPS[v.dtype] if k == "weight" else 0.0
        tol = stored_eps * want.abs() + 16 * HALF_EPS[torch.float32] * terms
        assert ((got - want).abs() <= tol).all(), (k, (got - want).abs().max().item(), tol.min().item())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_row_every_step_equals_torch_optim(optimizer, seed):
    """With every row sampled at every step the row optimizer is the dense one: torch.optim.SGD
    (momentum, L2 decay) or torch.optim.AdamW (the per-row step counts all equal the global one)."""
    c, d = 50, 16
    w0 = torch.randn(c, d)
    dense = torch.nn.Parameter(w0.clone())
    if optimizer == "sgd":
        opt = torch.optim.SGD([dense], lr=0.2, momentum=0.9, weight_decay=1e-2)
        state = {"weight": w0.clone(), "momentum_buffer": torch.zeros(c, d)}
        hyper = dict(lr=0.2, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW([dense], lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
        state = {"weight": w0.clone(), "exp_avg": torch.zeros(c, d), "exp_avg_sq": torch.zeros(c, d),
                 "row_step": torch.zeros(c, dtype=torch.int64)}
        hyper = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    rows = torch.arange(c)
    for _ in range(4):
        g = torch.randn(c, d)
        dense.grad = g.clone()
        opt.step()
        run(optimizer, state, rows, g, hyper=hyper)
        assert (state["weight"] - dense.detach()).abs().max().item() <= 1e-6 * (1 + dense.abs().max().item())
    if optimizer == "adamw":
        assert torch.equal(state["row_step"], torch.full((c,), 4))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_found_inf_skips_and_grad_scale_unscales(optimizer, seed):
    c, d = 40, 9
    state = make_state(optimizer, c, d, torch.float32)
    rows = sorted_rows(c, 17)
    grad = torch.randn(rows.numel(), d)
    before = {k: v.clone() for k, v in state.items()}
    run(optimizer, state, rows, grad * 1024, torch.tensor(1024.0), torch.tensor(1.0), dict(lr=0.1))
    for k, v in state.items():
        assert torch.equal(v, before[k]), k  # skipped: nothing written, not even the step counts
    unscaled = {k: v.clone() for k, v in before.items()}
    run(optimizer, state, rows, grad * 1024, torch.tensor(1024.0), torch.tensor(0.0), dict(lr=0.1))
    run(optimizer, unscaled, rows, grad, hyper=dict(lr=0.1))
    for k, v in state.items():
        assert torch.equal(v, unscaled[k]), k  # 1024 is a power of two: unscaling is exact


def _vma_flags(address):
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _huge_page_advised(t):
    aligned = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    assert aligned + (2 << 20) <= t.data_ptr() + t.numel() * t.element_size()
    return "hg" in _vma_flags(aligned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_head_tables_are_advised_onto_huge_pages():
    """The head's weight and optimizer state, also after grow(), carry MADV_HUGEPAGE (VmFlags "hg");
    a small table is not advised."""
    head = simcore.PartialMarginHead(40_000, 128, optimizer="adamw")
    for name in ("weight", "exp_avg", "exp_avg_sq"):
        assert _huge_page_advised(getattr(head, name)), name
    head.grow(torch.randn(100, 128))
    for name in ("weight", "exp_avg", "exp_avg_sq"):
        assert _huge_page_advised(getattr(head, name)), f"{name} after grow"
    table = row_optimizer.row_table((4096, 1024))
    assert dispatch.extension().advise_huge_pages(tensor_arg(table)) % (2 << 20) == 0
    assert dispatch.extension().advise_huge_pages(tensor_arg(torch.empty(100))) == 0
    with pytest.raises(ValueError, match="must be contiguous"):
        dispatch.extension().advise_huge_pages(tensor_arg(table[:, ::2]))


def test_empty_rows_change_nothing():
    state = make_state("adamw", 10, 4, torch.float32)
    before = {k: v.clone() for k, v in state.items()}
    run("adamw", state, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), hyper=dict(lr=0.1))
    assert all(torch.equal(v, before[k]) for k, v in state.items())


def _sgd_ext(weight, rows, grad, buf=None, scale=None, found=None, lr=0.1, momentum=0.9, wd=0.0):
    pk = lambda t: None if t is None else tensor_arg(t)  # noqa: E731
    dispatch.extension().ro_sgd(tensor_arg(weight), tensor_arg(rows), tensor_arg(grad), pk(buf), pk(scale), pk(found),
                                lr, momentum, wd, dispatch.executor(weight.device))


def _adamw_ext(weight, rows, grad, m, v, steps, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    dispatch.extension().ro_adamw(tensor_arg(weight), tensor_arg(rows), tensor_arg(grad), tensor_arg(m),
                                  tensor_arg(v), tensor_arg(steps), None, None, lr, b1, b2, eps, wd, 1)


@pytest.mark.parametrize("case,message", [
    ("unsorted", "strictly increasing"),
    ("duplicate", "strictly increasing"),
    ("negative", "outside"),
    ("too_large", "outside"),
    ("too_many", "ids but weight has only"),
    ("grad_rows", "must have size 3 in dimension 0"),
    ("grad_dim", "must have size 4 in dimension 1"),
    ("grad_dtype", "grad must be float32"),
    ("rows_dtype", "rows must be int64"),
    ("weight_dtype", "weight must be float32, float16 or bfloat16"),
    ("weight_layout", "unit stride"),
    ("buffer_shape", "momentum_buffer must have size 10"),
    ("buffer_dtype", "momentum_buffer must be float32"),
    ("aliased", "overlap in memory"),
    ("grad_aliases_weight", "overlap in memory"),
    ("scale_size", "must hold one value"),
    ("lr_nan", "lr must be a finite number"),
    ("momentum_negative", "momentum must be a finite number >= 0"),
])
def test_sgd_boundary_rejects_bad_input(case, message):
    w, buf = torch.randn(10, 4), torch.zeros(10, 4)
    rows, grad = torch.tensor([1, 4, 7]), torch.randn(3, 4)
    kw = {}
    if case == "unsorted":
        rows = torch.tensor([4, 1, 7])
    elif case == "duplicate":
        rows = torch.tensor([1, 4, 4])
    elif case == "negative":
        rows = torch.tensor([-1, 4, 7])
    elif case == "too_large":
        rows = torch.tensor([1, 4, 10])
    elif case == "too_many":
        rows, grad = torch.arange(11), torch.randn(11, 4)
    elif case == "grad_rows":
        grad = torch.randn(2, 4)
    elif case == "grad_dim":
        grad = torch.randn(3, 5)
    elif case == "grad_dtype":
        grad = grad.half()
    elif case == "rows_dtype":
        rows = rows.int()
    elif case == "weight_dtype":
        w = w.double()
    elif case == "weight_layout":
        w = torch.randn(4, 10).t()
    elif case == "buffer_shape":
        buf = torch.zeros(9, 4)
    elif case == "buffer_dtype":
        buf = buf.double()
    elif case == "aliased":
        buf = w
    elif case == "grad_aliases_weight":
        grad = w[:3]
    elif case == "scale_size":
        kw["scale"] = torch.ones(2)
    elif case == "lr_nan":
        kw["lr"] = math.nan
    elif case == "momentum_negative":
        kw["momentum"] = -0.5
    before = w.clone()
    with pytest.raises((ValueError, TypeError), match=message):
        _sgd_ext(w, rows, grad, buf, **kw)
    if case not in ("aliased", "weight_layout", "weight_dtype"):
        assert torch.equal(w, before)  # checked before anything is written


@pytest.mark.parametrize("case,message", [
    ("steps_dtype", "row_step must be int64"),
    ("steps_shape", "row_step must have size 10"),
    ("state_aliased", "overlap in memory"),
    ("beta_one", "beta1 must lie in"),
    ("beta2_nan", "beta2 must lie in"),
    ("eps_negative", "eps must be a finite number"),
    ("unsorted", "strictly increasing"),
])
def test_adamw_boundary_rejects_bad_input(case, message):
    w, m, v = torch.randn(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    steps, rows, grad = torch.zeros(10, dtype=torch.int64), torch.tensor([1, 4, 7]), torch.randn(3, 4)
    kw = {}
    if case == "steps_dtype":
        steps = steps.int()
    elif case == "steps_shape":
        steps = torch.zeros(9, dtype=torch.int64)
    elif case == "state_aliased":
        v = m
    elif case == "beta_one":
        kw["b1"] = 1.0
    elif case == "beta2_nan":
        kw["b2"] = math.nan
    elif case == "eps_negative":
        kw["eps"] = -1e-8
    elif case == "unsorted":
        rows = torch.tensor([7, 4, 1])
    with pytest.raises((ValueError, TypeError), match=message):
        _adamw_ext(w, rows, grad, m, v, steps, **kw)
    assert torch.equal(steps, torch.zeros_like(steps))


def test_ops_pass_opcheck(seed):
    """Schema (what they mutate), fake implementations and AOT dispatch, as torch.compile needs."""
    for optimizer, op in (("sgd", row_optimizer._row_sgd_op), ("adamw", row_optimizer._row_adamw_op)):
        state = make_state(optimizer, 20, 6, torch.float32)
        rows, grad = sorted_rows(20, 7), torch.randn(7, 6)
        if optimizer == "sgd":
            args = (state["weight"], rows, grad, state["momentum_buffer"], torch.tensor(2.0), torch.tensor(0.0),
                    0.1, 0.9, 0.0)
        else:
            args = (state["weight"], rows, grad, state["exp_avg"], state["exp_avg_sq"], state["row_step"], None, None,
                    0.1, 0.9, 0.999, 1e-8, 0.01)
        result = torch.library.opcheck(op, args)
        assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_cpu_kernel_without_syncs(optimizer, dtype, seed, cuda_device):
    c, d = 3001, 96
    state = make_state(optimizer, c, d, dtype)
    rows = sorted_rows(c, 700)
    grad = torch.randn(rows.numel(), d) * 256
    cpu = {k: v.clone() for k, v in state.items()}
    dev = {k: v.to(cuda_device) for k, v in state.items()}
    hyper = HYPER[optimizer]
    with simcore.cuda_emulation(False):
        run(optimizer, cpu, rows, grad, torch.tensor(256.0), torch.tensor(0.0), hyper)
    scale, found = torch.tensor(256.0, device=cuda_device), torch.tensor(0.0, device=cuda_device)
    rows_d, grad_d = rows.to(cuda_device), grad.to(cuda_device)
    with no_host_syncs(cuda_device):
        run(optimizer, dev, rows_d, grad_d, scale, found, hyper)
    for k, v in dev.items():
        got, want = v.cpu(), cpu[k]
        if not want.is_floating_point():
            assert torch.equal(got, want), k
        else:
            tol = 2 * HALF_EPS[want.dtype] * want.abs().double() + 1e-6
            assert ((got.double() - want.double()).abs() <= tol).all(), k


def test_cuda_kernel_skips_bad_ids_and_never_writes_out_of_bounds(seed, cuda_device):
    """ids the Python layer would reject (its device assert is bypassed here) are skipped in the kernel."""
    c, d = 64, 8
    w = torch.randn(c + 2, d, device=cuda_device)  # a guard row on each side of the (c, d) view
    view = w[1:c + 1]
    buf = torch.zeros(c, d, device=cuda_device)
    before = w.clone()
    rows = torch.tensor([-1, 3, 3, 5, c, 2**40], device=cuda_device)
    grad = torch.ones(rows.numel(), d, device=cuda_device)
    _sgd_ext(view, rows, grad, buf, lr=1.0, momentum=0.0)
    synchronize(cuda_device)
    changed = (w != before).any(1).nonzero().flatten().tolist()
    assert changed == [4, 6]  # rows 3 (once, not twice) and 5 of the view; the guard rows are untouched
    assert torch.equal(w[4], before[4] - 1.0) and torch.equal(w[6], before[6] - 1.0)  # w - 1·1: exact
