"""PartialMarginHead under PyTorch's training tools: torch.amp.GradScaler (scaled step,
skipped step on inf), gradient clipping and LR schedulers, through ``head.row_optimizer``.

Each AMP run (CPU autocast in float16 or bfloat16 + GradScaler("cpu")) is compared with
an fp32 run without scaling from the same start: the centres, the head's optimizer state
and the backbone must agree within the autocast dtype's tolerance."""
import copy

import pytest
import torch

import simcore
from conftest import rel_err, spawn_ranks

C, D, D_IN, B = 60, 16, 12, 24
TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
OPTIMIZERS = {"sgd": dict(lr=0.5, momentum=0.9, weight_decay=1e-3),
              "adamw": dict(lr=1e-2, weight_decay=1e-2)}
STATE = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "row_step")}


def _setup(optimizer, seed=0):
    torch.manual_seed(seed)
    backbone = torch.nn.Linear(D_IN, D)
    head = simcore.PartialMarginHead(C, D, margin=0.3, scale=16.0, sample_rate=0.25, optimizer=optimizer,
                                     **OPTIMIZERS[optimizer])
    head.weight.mul_(50)  # centres of norm ~2, not ~0.04: gradients well above fp16's subnormals
    return backbone, head


def _batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x, y = torch.randn(B, D_IN, generator=g), torch.randint(C, (B,), generator=g)
        sampled = torch.unique(torch.cat([y, torch.randperm(C, generator=g)[:10]]))
        out.append((x, y, sampled))
    return out


def _loss(backbone, head, x, y, sampled, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return head(backbone(x), y, sampled=sampled)


def _pair(optimizer):
    """Two identical (backbone, head, backbone optimizer) triples: the AMP run and the fp32 reference."""
    backbone, head = _setup(optimizer)
    runs = []
    for _ in range(2):
        b, h = copy.deepcopy(backbone), copy.deepcopy(head)
        runs.append((b, h, torch.optim.SGD(b.parameters(), lr=0.1)))
    return runs


def _head_grad(head):
    """The recorded centre gradient, as the head's optimizer sees it."""
    (holder,) = head.row_optimizer.param_groups[0]["params"]
    return holder.grad


def _assert_close(amp, ref, optimizer, tol):
    (b, h, _), (rb, rh, _) = amp, ref
    assert rel_err(h.weight, rh.weight) < tol
    assert rel_err(b.weight, rb.weight) < tol
    for name in STATE[optimizer]:
        assert rel_err(getattr(h, name).double(), getattr(rh, name).double()) < tol, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_scaled_step_matches_fp32(optimizer, dtype):
    amp, ref = _pair(optimizer)
    w0 = amp[1].weight.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)  # at the default 65536 the fp16 backbone overflows
    for x, y, sampled in _batches(3):
        b, h, opt = amp
        opt.zero_grad(); h.zero_grad()
        scaler.scale(_loss(b, h, x, y, sampled, dtype)).backward()
        scaler.step(opt); scaler.step(h.row_optimizer)
        scaler.update()
        b, h, opt = ref
        opt.zero_grad(); h.zero_grad()
        _loss(b, h, x, y, sampled, None).backward()
        opt.step(); h.step()
    assert scaler.get_scale() == 4096.0  # no step overflowed
    assert rel_err(amp[1].weight - w0, ref[1].weight - w0) < TOL[dtype]  # the update itself, not only the sum
    _assert_close(amp, ref, optimizer, TOL[dtype])


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_inf_gradient_skips_the_head_step(optimizer, dtype, unscale_first):
    amp, ref = _pair(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    (x, y, sampled), (x2, y2, sampled2) = _batches(2)
    b, h, opt = amp
    scaler.scale(_loss(b, h, x, y, sampled, dtype)).backward()
    _head_grad(h)[1, 2] = float("inf")  # an overflow in the head's gradient only
    before = {k: v.clone() for k, v in h.state_dict().items()}
    if unscale_first:
        scaler.unscale_(opt); scaler.unscale_(h.row_optimizer)
    scaler.step(opt); scaler.step(h.row_optimizer)
    scaler.update()
    for k, v in h.state_dict().items():
        assert torch.equal(v, before[k]), k  # centres and optimizer state untouched
    assert scaler.get_scale() == 2048.0  # the scale backs off as for any optimizer's inf
    assert h.step() is None  # the skipped gradient is gone, as after a step
    # the reference skips its head step; both backbones stepped; then one normal step each
    rb, rh, ropt = ref
    _loss(rb, rh, x, y, sampled, None).backward()
    ropt.step(); rh.zero_grad()
    for (b, h, opt), s in ((amp, scaler), (ref, None)):
        opt.zero_grad(); h.zero_grad()
        loss = _loss(b, h, x2, y2, sampled2, dtype if s else None)
        (s.scale(loss) if s else loss).backward()
        if s:
            s.step(opt); s.step(h.row_optimizer); s.update()
        else:
            opt.step(); h.step()
    _assert_close(amp, ref, optimizer, TOL[dtype])


def _dense_clip(head, max_norm):
    """torch.nn.utils.clip_grad_norm_ on the dense (C, D) equivalent of the recorded gradient;
    writes the clipped rows back and returns the norm."""
    ids, rows = head._pending[0]
    dense = torch.nn.Parameter(torch.zeros(head.weight.shape))
    dense.grad = torch.zeros(head.weight.shape).index_add_(0, ids, rows)
    norm = torch.nn.utils.clip_grad_norm_([dense], max_norm)
    rows.copy_(dense.grad[ids])
    return norm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_clipped_step_matches_dense_clip(optimizer, dtype):
    amp, ref = _pair(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    batches = _batches(2)  # two backward passes before one step: rows sampled twice are summed
    b, h, opt = amp
    for x, y, sampled in batches:
        scaler.scale(_loss(b, h, x, y, sampled, dtype)).backward()
    scaler.unscale_(h.row_optimizer)
    rb, rh, ropt = ref
    for x, y, sampled in batches:
        _loss(rb, rh, x, y, sampled, None).backward()
    ref_norm = _dense_clip(rh, 0.1)
    assert ref_norm > 0.5  # the clip is active
    norm = h.clip_grad_norm_(0.1)
    assert isinstance(norm, torch.Tensor)
    assert rel_err(norm, ref_norm) < TOL[dtype]
    assert rel_err(_head_grad(h).norm(), torch.tensor(0.1)) < 1e-5
    scaler.step(h.row_optimizer); scaler.update()
    rh.step()
    assert rel_err(h.weight, rh.weight) < TOL[dtype]
    for name in STATE[optimizer]:
        assert rel_err(getattr(h, name).double(), getattr(rh, name).double()) < TOL[dtype], name


def test_clip_without_amp_equals_dense_clip_exactly():
    (b, h, _), (rb, rh, _) = _pair("sgd")
    for x, y, sampled in _batches(2):
        _loss(b, h, x, y, sampled, None).backward()
        _loss(rb, rh, x, y, sampled, None).backward()
    for norm_type in (2.0, float("inf")):
        ids, rows = rh._pending[0]
        dense = torch.zeros(C, D).index_add_(0, ids, rows)
        expect = torch.linalg.vector_norm(dense, norm_type)
        assert rel_err(h.clip_grad_norm_(1e6, norm_type), expect) < 1e-6
    _dense_clip(rh, 0.05)
    h.clip_grad_norm_(0.05)
    assert rel_err(_head_grad(h), _head_grad(rh)) < 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_scheduler_drives_the_head(optimizer):
    (b, h, _), (rb, rh, _) = _pair(optimizer)
    lr0 = OPTIMIZERS[optimizer]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(h.row_optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    for i, (x, y, sampled) in enumerate(_batches(3)):
        assert h.lr == pytest.approx(lr0 * 0.5 ** i)
        rh.lr = lr0 * 0.5 ** i  # the reference sets it by hand
        scaler.scale(_loss(b, h, x, y, sampled, torch.bfloat16)).backward()
        scaler.step(h.row_optimizer); scaler.update(); h.zero_grad()
        sched.step()
        _loss(rb, rh, x, y, sampled, None).backward()
        rh.step()
    assert rel_err(h.weight, rh.weight) < TOL[torch.bfloat16]
    h.lr = 0.125  # setting the attribute writes the param group
    assert h.row_optimizer.param_groups[0]["lr"] == 0.125


def test_one_cycle_cycles_the_head_momentum():
    h = _setup("sgd")[1]
    sched = torch.optim.lr_scheduler.OneCycleLR(h.row_optimizer, max_lr=1.0, total_steps=10)
    momenta = []
    for _ in range(5):
        momenta.append(h.momentum)
        h.step(); sched.step()
    assert momenta[0] == pytest.approx(0.95) and momenta[-1] < 0.9  # the head's update reads these values


def test_head_without_gradients_steps_nothing_under_the_scaler():
    backbone, head = _setup("sgd")
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(backbone(torch.randn(4, D_IN)).square().sum()).backward()
    w = head.weight.clone()
    scaler.step(opt); scaler.step(head.row_optimizer); scaler.update()
    assert torch.equal(head.weight, w)


def test_row_optimizer_survives_deepcopy():
    head = _setup("adamw")[1]
    twin = copy.deepcopy(head)
    assert twin.row_optimizer._head is twin
    twin.lr = 0.5
    assert head.lr == OPTIMIZERS["adamw"]["lr"]


# --------------------------------------------------------------------------- the sharded head, 2 ranks (gloo)
SHARD_C, SHARD_B = 30, 10  # two ranks of 5 rows each


def _shard_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(W=torch.randn(SHARD_C, D, generator=g), X=torch.randn(SHARD_B, D, generator=g) * 3,
                Y=torch.randint(SHARD_C, (SHARD_B,), generator=g))


def _shard_head(process_group=None):
    return simcore.PartialMarginHead(SHARD_C, D, margin=0.3, scale=16.0, sample_rate=1.0, lr=0.5, momentum=0.9,
                                     process_group=process_group)


def _shard_worker(rank, tmp):
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        inp, out = _shard_inputs(), {}
        rows = slice(5 * rank, 5 * rank + 5)
        for case in ("clip", "skip"):
            head = _shard_head(dist.group.WORLD)
            s, e = head.shard
            head.weight.data.copy_(inp["W"][s:e])
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            if case == "skip" and rank == 1:  # an overflow in rank 1's rows only, as a kernel would give
                record = head._record
                head._record = lambda ids, g: record(ids, g.index_fill(1, torch.tensor([0]), float("inf")))
            scaler.scale(head(inp["X"][rows], inp["Y"][rows])).backward()
            scaler.unscale_(head.row_optimizer)
            norm = head.clip_grad_norm_(0.05) if case == "clip" else None
            scaler.step(head.row_optimizer)
            scaler.update()
            out[case] = dict(weight=head.weight.clone(), norm=norm, scale=scaler.get_scale())
            out["shard"] = (s, e)
        torch.save(out, f"{tmp}/out{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_head_clips_by_the_global_norm_and_skips_on_every_rank(tmp_path):
    spawn_ranks(_shard_worker, 2, tmp_path)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    inp = _shard_inputs()
    head = _shard_head()
    head.weight.data.copy_(inp["W"])
    head(inp["X"], inp["Y"]).backward()
    norm = _dense_clip(head, 0.05)
    head.step()
    for out in outs:
        s, e = out["shard"]
        assert rel_err(out["clip"]["norm"], norm) < 1e-5  # the norm over both shards, on each rank
        assert rel_err(out["clip"]["weight"], head.weight[s:e]) < 1e-5
        assert torch.equal(out["skip"]["weight"], inp["W"][s:e])  # rank 0's finite rows are not stepped either
        assert out["skip"]["scale"] == 512.0 and out["clip"]["scale"] == 1024.0  # equal scales on both ranks

