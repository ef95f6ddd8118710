"""Issue 14, item 2: no host synchronisation in a steady-state training step.

A sync cannot be counted on CPU, so the CPU proof is structural: a whole training step
(backbone, PartialMarginHead at sample_rate < 1, backward, head.step()) compiles with
torch.compile(fullgraph=True) into one graph (any .item(), bool() of a tensor, .cpu() of a
traced value or data-dependent shape would break it), and changing CurricularFace's t,
CamSchedule's step or AdaFace's statistics between steps recompiles nothing (they are
tensors, not floats baked into the graph). On CUDA the cuda-marked test runs steady-state
steps under torch.cuda.set_sync_debug_mode("error").
"""
import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

import simcore
from conftest import hardware_only, rel_err
from simcore.margin import checks, sampling

pytestmark = pytest.mark.skipif(simcore.get_backend() != "compiled", reason="checks the compiled ops")

C, D, B, IN = 1000, 8, 32, 16
SAMPLE_RATE = 0.1  # 100 classes per step: static, as B <= 100


def _variant(name):
    return {"arcface": None,
            "curricularface": simcore.CurricularFace(),
            "cam_schedule": simcore.CamSoftmax(schedule=simcore.CamSchedule(rate=0.01)),
            "adaface": simcore.AdaFace(momentum=0.1),
            "magface": simcore.MagFace()}[name]


def _model(name, optimizer="sgd"):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(IN, 32), torch.nn.ReLU(), torch.nn.Linear(32, D))
    head = simcore.PartialMarginHead(C, D, sample_rate=SAMPLE_RATE, loss=_variant(name), lr=0.5, momentum=0.9,
                                     optimizer=optimizer, scale=16.0)
    return backbone, head


def _step_fn(backbone, head):
    def step(x, y, sampled=None):
        loss = head(backbone(x), y, sampled=sampled)
        loss.backward()
        with torch.no_grad():  # plain SGD for the backbone (torch.optim's step breaks the graph itself)
            for p in backbone.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
        head.step()
        return loss.detach()
    return step


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, C, (B,), generator=g)
        negatives = torch.randperm(C, generator=g)[:200]  # the static size: every label plus negatives
        keep = torch.cat([torch.unique(y), negatives[~torch.isin(negatives, y)]])[:math.ceil(SAMPLE_RATE * C)]
        sampled = torch.sort(keep).values
        out.append((torch.randn(B, IN, generator=g), y, sampled))
    return out


def _state(name, head):
    """The value that changes between steps for the variant (recompiling if it were a constant)."""
    loss = head.loss
    if name == "curricularface":
        return loss.t.clone()
    if name == "cam_schedule":
        return loss.step.clone()
    if name == "adaface":
        return torch.stack([loss.norm_mean, loss.norm_std]).clone()
    return None


@pytest.fixture
def dynamo():
    """A fresh dynamo with autograd ops traced (loss.backward() inside the graph), counters cleared."""
    simcore.dispatch.extension()  # loaded before tracing (a first-call side effect of dispatch)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def _graphs():
    return counters["stats"]["unique_graphs"]


# Before issue 14 the step broke the graph at the head's gradient hook (a Python side effect in
# backward), at the sampler's host path and at CurricularFace's float(t) / CamSoftmax's int(step).
@pytest.mark.parametrize("name", ["arcface", "curricularface", "cam_schedule", "adaface", "magface"])
def test_training_step_is_one_graph_without_recompiles(name, dynamo):
    backbone, head = _model(name)
    step = torch.compile(_step_fn(backbone, head), backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, IN, generator=g), torch.randint(0, C, (B,), generator=g)
    before = head.weight.detach().clone()
    step(x, y)
    states = [_state(name, head)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x, y = torch.randn(B, IN, generator=g), torch.randint(0, C, (B,), generator=g)
            loss = step(x, y)
            states.append(_state(name, head))
    assert _graphs() == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert torch.isfinite(loss)
    moved = (head.weight != before).any(1)
    assert 0 < moved.sum() <= 4 * math.ceil(SAMPLE_RATE * C)  # only sampled rows move
    if states[0] is not None:  # the statistic changed at every step without a recompile
        assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))


@pytest.mark.parametrize("name", ["arcface", "curricularface", "cam_schedule", "adaface", "magface"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_compiled_step_matches_eager(name, optimizer, dynamo):
    """With the classes given (`sampled=`, the static size), compiled steps update the backbone, the
    centres, the optimizer state and the variant's statistics exactly as eager steps."""
    eager_model = _model(name, optimizer)
    compiled_model = copy.deepcopy(eager_model)
    eager = _step_fn(*eager_model)
    compiled = torch.compile(_step_fn(*compiled_model), backend="aot_eager", fullgraph=True)
    for x, y, sampled in _batches(3):
        le, lc = eager(x, y, sampled), compiled(x, y, sampled)
        assert rel_err(lc, le) < 1e-5
    (eb, eh), (cb, ch) = eager_model, compiled_model
    for a, b in zip(eb.parameters(), cb.parameters()):
        assert rel_err(b, a) < 1e-5
    for (key, a), (_, b) in zip(eh.state_dict().items(), ch.state_dict().items()):
        assert rel_err(b.double(), a.double()) < 1e-5 or torch.equal(a, b), key
    assert _graphs() == 1


def test_training_step_compiles_with_inductor(dynamo):
    """The default backend too (C++ codegen on CPU; ~10 s on the 2-core CI machine)."""
    backbone, head = _model("curricularface")
    step = torch.compile(_step_fn(backbone, head), fullgraph=True)
    ref_model = copy.deepcopy((backbone, head))
    ref = _step_fn(*ref_model)
    for x, y, sampled in _batches(2, seed=3):
        assert rel_err(step(x, y, sampled), ref(x, y, sampled)) < 1e-4
    assert rel_err(head.weight, ref_model[1].weight) < 1e-4
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(*_batches(1, seed=4)[0])
    assert _graphs() == 1 and not counters["graph_break"]


def test_head_step_issues_no_host_read(dynamo):
    """head.step() alone is one graph: it reads nothing on the host (by construction: index_select,
    arithmetic, torch.where on GradScaler's found_inf, index_copy_)."""
    for optimizer in ("sgd", "adamw"):
        torch._dynamo.reset()
        counters.clear()
        backbone, head = _model("arcface", optimizer)
        head(backbone(torch.randn(B, IN)), torch.randint(0, C, (B,))).backward()
        rows = torch.compile(head.step, backend="aot_eager", fullgraph=True)()
        assert rows.numel() == math.ceil(SAMPLE_RATE * C) and _graphs() == 1


# --------------------------------------------------------------------------- validate=
def test_validate_first_checks_host_once_per_signature():
    dev = torch.device("cuda")  # value_check looks at the device type only
    sig = ("test", object())
    assert checks.value_check("first", dev, sig) == "host"
    assert checks.value_check("first", dev, sig) == "device"
    assert checks.value_check("always", dev, sig) == "host"
    assert checks.value_check("never", dev, sig) is None
    assert checks.value_check("first", torch.device("cpu"), sig) == "host"  # no sync on CPU: always
    assert checks.check_validate(True) == "always" and checks.check_validate(False) == "never"
    with pytest.raises(ValueError, match="validate must be"):
        simcore.PartialMarginHead(10, 4, validate="sometimes")


@pytest.mark.parametrize("how", ["host", "device"])
def test_value_checks_raise_either_way(how, monkeypatch):
    """Bad labels, `sampled` ids and per-row margins are caught on the host (ValueError) and by
    the device-side assertions (RuntimeError from torch._assert_async on CPU)."""
    for module in (checks, sampling):
        monkeypatch.setattr(module, "value_check", lambda validate, device, sig: how)
    err = ValueError if how == "host" else RuntimeError
    head = simcore.PartialMarginHead(20, 4, sample_rate=0.5)
    x = torch.randn(3, 4)
    with pytest.raises(err, match="labels must lie in"):
        head(x, torch.tensor([0, 5, 20]))
    for bad in (torch.tensor([0, 5, 3]), torch.tensor([0, 1, 5, 25]), torch.tensor([1, 2, 3, 5])):
        with pytest.raises(err, match="sampled"):
            head(x, torch.tensor([0, 5, 3]), sampled=bad)
    with pytest.raises(err, match="per-row margins"):
        simcore.margin_softmax_partial(x, torch.tensor([0, 5, 3]), torch.randn(20, 4), m2=torch.tensor([0.5, 4.0, 0.5]))
    head(x, torch.tensor([0, 5, 3]), sampled=torch.tensor([0, 1, 3, 5]))  # good input passes


def test_validate_never_skips_value_checks():
    head = simcore.PartialMarginHead(20, 4, sample_rate=1.0, validate="never")
    with pytest.raises(ValueError, match="sampled must be strictly increasing"):  # validate="first"
        simcore.PartialMarginHead(20, 4)(torch.randn(2, 4), torch.tensor([0, 1]), sampled=torch.tensor([1, 0]))
    # unchecked here; the CPU kernel's own label check still raises
    with pytest.raises(Exception):
        head(torch.randn(2, 4), torch.tensor([0, 20]))


def test_labels_checked_under_compile(dynamo):
    """Traced calls check the label range on the device (before issue 14 only the CPU kernel's
    own check raised; on CUDA an out-of-range label gave a NaN loss)."""
    w = torch.randn(50, 8)
    f = torch.compile(lambda x, y: simcore.arcface_partial(x, y, w, sample_rate=1.0), backend="aot_eager",
                      fullgraph=True)
    assert torch.isfinite(f(torch.randn(4, 8), torch.tensor([0, 1, 2, 49])))
    with pytest.raises(RuntimeError, match="labels must lie in"):
        f(torch.randn(4, 8), torch.tensor([0, 1, 2, 50]))


# --------------------------------------------------------------------------- device sampling
def test_sample_on_device_is_uniform_and_contains_the_labels(seed):
    """The sync-free sampler CUDA tensors use, run on CPU tensors."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([3, 3, 17, 42])
    counts = torch.zeros(60)
    for _ in range(3000):
        s = sampling.sample_on_device(labels, 60, 20, g)
        assert s.numel() == 20 and torch.equal(s, torch.unique(s)) and torch.isin(labels, s).all()
        counts += torch.bincount(s, minlength=60)
    assert (counts[[3, 17, 42]] == 3000).all()
    negatives = counts[~torch.isin(torch.arange(60), labels)]
    expect = 3000 * 17 / 57  # 17 negatives of 57
    assert (negatives - expect).abs().max() < 5 * math.sqrt(expect)  # 5 sigma
    a = sampling.sample_on_device(labels, 60, 20, torch.Generator().manual_seed(1))
    assert torch.equal(a, sampling.sample_on_device(labels, 60, 20, torch.Generator().manual_seed(1)))


def test_sample_classes_op_still_used_for_data_dependent_sizes(dynamo):
    """More labels than num_samples: the size is data-dependent; the custom op still serves it."""
    labels = torch.randint(0, 1000, (64,))
    f = torch.compile(lambda y: simcore.sample_classes(y, 1000, 20), fullgraph=True, backend="aot_eager")
    got = f(labels)
    assert torch.isin(labels, got).all() and got.numel() == labels.unique().numel()


# --------------------------------------------------------------------------- CUDA
@hardware_only("host synchronisations are a GPU stream's (torch's sync-debug mode)")
@pytest.mark.parametrize("name", ["arcface", "curricularface", "cam_schedule", "adaface", "magface"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_steady_state_steps_issue_no_sync_on_cuda(name, optimizer):
    """Eager steps after the first (validate="first" reads the labels, and CurricularFace's t or
    the scheduled Cam-Softmax exponent, once per shape) under set_sync_debug_mode("error"): any
    synchronising call raises. The block kernels read t and the exponent from device memory
    (the ops' dyn tensor; docs/margin_softmax.md, "What syncs remain")."""
    backbone, head = _model(name, optimizer)
    backbone, head = backbone.cuda(), head.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        x = torch.randn(B, IN, device="cuda", generator=gen)
        y = torch.randint(0, C, (B,), device="cuda", generator=gen)
        loss = head(backbone(x), y, generator=gen)
        loss.backward()
        with torch.no_grad():
            for p in backbone.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None
        head.step()
        return loss.detach()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(losses)).all()
