"""The class-sharded head (simcore.margin.sharded) against the single-process head.

Two spawned worlds (gloo, CPU): world size 2 (local batches 7 + 5) and world size
4 (4 + 0 + 3 + 5: unequal, one rank empty). Each rank runs every scenario and saves
its results; the parent compares them with the single-process head on the global
batch with the same sampled classes (rel. error 1e-5, float32). The world-size-2
run saves a checkpoint that the world-size-4 run and the parent (world size 1)
reload. Growing the sharded head (drip training) moves rows between shards; it is
compared with the single-process head's grow on the same centres and state. Hangs
fail: a 60 s process-group timeout in the workers and a deadline on the spawn in
the parent.
"""
import datetime
import math
import os
import random

import pytest
import torch
import torch.distributed as dist

import simcore
from simcore.margin.sharded import load_resharded, shard_bounds
from conftest import rel_err, spawn_ranks

C, D, DIN = 60, 16, 6
SIZES = {2: [7, 5], 4: [4, 0, 3, 5]}
N = 12
TOL = 1e-5
DEADLINE_S = 240
GROW_N = 7                   # classes appended by grow(): 60 -> 67 moves every shard boundary at world size 4
GROW = ["D", "V_sub"]        # AdamW (exp_avg, exp_avg_sq, row_step); momentum SGD with 3 sub-centres
STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "row_step")


# --------------------------------------------------------------------------- shared helpers
def _dense(pending, rows, d=D):
    g = torch.zeros(rows, d)
    for idx, gr in pending:
        g.index_add_(0, idx, gr.float())
    return g


def _backbone():
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(DIN, 32), torch.nn.Tanh(), torch.nn.Linear(32, D))


def _head_kwargs(name):
    return {"A": dict(margin=0.5, scale=64.0, sample_rate=0.5),
            "A2": dict(m1=1.0, margin=0.3, m3=0.2, scale=32.0, sample_rate=1.0),
            "B": dict(margin=0.4, scale=40.0, sample_rate=0.5),
            "C": dict(margin=0.5, scale=30.0, sample_rate=0.25),
            "D": dict(margin=0.4, scale=40.0, sample_rate=0.3, optimizer="adamw", lr=1e-2, weight_decay=0.1),
            # the margin family (fresh module state on every head: one training-mode update each)
            "V_cam": dict(sample_rate=0.5, loss=simcore.CamSoftmax(c=math.pi / 3, scale=20.0), filter_threshold=0.5),
            "V_ada": dict(sample_rate=0.5, loss=simcore.AdaFace(scale=32.0)),
            "V_mag": dict(sample_rate=0.5, loss=simcore.MagFace(scale=32.0)),
            "V_curr": dict(sample_rate=0.5, loss=simcore.CurricularFace(scale=32.0)),
            "V_sub": dict(margin=0.4, scale=32.0, sample_rate=0.5, subcenters=3, filter_threshold=0.3)}[name]


VARIANTS = ["V_cam", "V_ada", "V_mag", "V_curr", "V_sub"]
X_SCALE = 6.0  # variant runs: feature norms ~24, inside MagFace's [10, 110] so its margin has a gradient


def _k(name):
    return _head_kwargs(name).get("subcenters", 1)


def _weight(inp, name):
    return inp["W3"] if _k(name) == 3 else inp["W"]


def _set_state(head, inp, name, lo, hi):
    """Centres and non-zero optimizer state: rows [lo, hi) of the global ones in ``inp``."""
    head.weight.data.copy_(_weight(inp, name)[lo:hi])
    for key in STATE:
        buf = getattr(head, key, None)
        if buf is not None:
            buf.copy_((inp["RS"] if key == "row_step" else inp["ST_" + key])[lo:hi])


def _grow_and_step(head, inp, name, x, y):
    """grow() by GROW_N classes, then one training step over classes old and new: the state
    right after grow, the loss and the state after the step."""
    ids = head.grow(inp["G"][:GROW_N * _k(name)])
    after = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    loss = head(x, y, sampled=inp["SG"])
    head.zero_grad()
    loss.backward()
    head.step()
    stepped = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    return dict(ids=ids, grown=after, loss=loss.detach(), stepped=stepped, num_classes=head.num_classes)


def _grab_error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (recorded for the parent to check)
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- the worker (one rank)
def _worker(rank, tmp, ws):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store{ws}", rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=60))
    try:
        inp = torch.load(os.path.join(tmp, "inputs.pt"))
        sizes = SIZES[ws]
        off = sum(sizes[:rank])
        sl = slice(off, off + sizes[rank])
        grp = dist.group.WORLD
        out = {}

        def run(name, labels, sampled=None, grad_reduction="sum", generator=None, x_scale=1.0):
            head = simcore.PartialMarginHead(C, D, process_group=grp, grad_reduction=grad_reduction,
                                             **_head_kwargs(name))
            s, e = head.shard
            k = _k(name)
            head.weight.data.copy_(_weight(inp, name)[s * k:e * k])
            x = (inp["X"][sl] * x_scale).requires_grad_(True)
            loss, local = head(x, labels[sl], sampled=sampled, generator=generator, return_sampled=True)
            loss.backward()
            out[name] = dict(loss=loss.detach(), gx=x.grad.clone(), gw=_dense(head._pending, (e - s) * k),
                             shard=(s, e), local=local)
            return head

        run("A", inp["Y"], inp["SA"])
        run("A2", inp["Y"], None, grad_reduction="mean")
        run("B", inp["YB"], inp["SB"])
        run("C", inp["Y"], None, generator=torch.Generator().manual_seed(100 + rank))
        for name in VARIANTS:
            run(name, inp["Y"], inp["SA"], x_scale=X_SCALE)

        # D: a DDP backbone + an AdamW head, two steps
        bb = torch.nn.parallel.DistributedDataParallel(_backbone())
        opt = torch.optim.SGD(bb.parameters(), lr=0.1)
        head = simcore.PartialMarginHead(C, D, process_group=grp, **_head_kwargs("D"))
        s, e = head.shard
        head.weight.data.copy_(inp["W"][s:e])
        d = {"loss": []}
        for step, key in enumerate(("SD1", "SD2")):
            loss = head(bb(inp["Z"][sl]), inp["Y"][sl], sampled=inp[key])
            opt.zero_grad()
            head.zero_grad()
            loss.backward()
            if step == 0:
                d["bb_grad"] = [p.grad.clone() for p in bb.module.parameters()]
            opt.step()
            head.step()
            d["loss"].append(loss.detach())
        d["state"] = {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
        d["bb_final"] = [p.detach().clone() for p in bb.module.parameters()]
        out["D"] = d
        if ws == 2:
            torch.save(head.state_dict(), os.path.join(tmp, f"ckpt{rank}.pt"))
        else:  # E: reload the world-size-2 checkpoint at world size 4
            new = simcore.PartialMarginHead(C, D, process_group=grp, **_head_kwargs("D"))
            paths = [os.path.join(tmp, f"ckpt{r}.pt") for r in range(2)]
            out["E_plain_load"] = _grab_error(lambda: new.load_state_dict(torch.load(paths[rank % 2])))
            out["E_missing_shard"] = _grab_error(lambda: load_resharded(new, paths[:1]))
            load_resharded(new, paths)
            out["E"] = {k: v.clone() for k, v in new.state_dict().items() if isinstance(v, torch.Tensor)}
            # a same-world-size round trip through load_state_dict works
            again = simcore.PartialMarginHead(C, D, process_group=grp, **_head_kwargs("D"))
            again.load_state_dict(new.state_dict())
            out["E_roundtrip"] = again.weight.detach().clone()

        # G: grow (a collective): the rows move to their new shards, the new rows' state is zero
        for name in GROW:
            k = _k(name)
            head = simcore.PartialMarginHead(C, D, process_group=grp, **_head_kwargs(name))
            s, e = head.shard
            _set_state(head, inp, name, s * k, e * k)
            out["G_" + name] = dict(_grow_and_step(head, inp, name, inp["X"][sl], inp["YG"][sl]), shard=head.shard)

        # F: bad input raises on every rank, and the group stays usable afterwards
        head = simcore.PartialMarginHead(C, D, process_group=grp, **_head_kwargs("A"))
        head.weight.data.copy_(inp["W"][slice(*head.shard)])
        x, y = inp["X"][sl], inp["Y"][sl]
        bad_y = y.clone()
        if rank == ws - 1:
            bad_y[0] = C  # out of the global range, on the last rank only
        out["F_label"] = _grab_error(lambda: head(x, bad_y, sampled=inp["SA"]))
        bad_x = torch.randn(sizes[rank], D + 1) if rank == 1 else x
        out["F_dim"] = _grab_error(lambda: head(bad_x, y, sampled=inp["SA"]))
        out["F_dtype"] = _grab_error(lambda: head(x, y.int() if rank == 0 else y, sampled=inp["SA"]))
        out["F_sampled"] = _grab_error(lambda: head(x, y, sampled=inp["SA"][1:] if rank == 0 else inp["SA"]))
        out["F_missing"] = _grab_error(lambda: head(x, y, sampled=inp["SB"]))  # lacks some labels
        other = simcore.PartialMarginHead(C, D, process_group=grp, **dict(_head_kwargs("A"), scale=10.0))
        out["F_config"] = _grab_error(lambda: (other if rank == 0 else head)(x, y, sampled=inp["SA"]))
        out["F_grad"] = _grab_error(lambda: head(x if rank == 0 else x.clone().requires_grad_(True), y,
                                                 sampled=inp["SA"]))
        out["F_f64"] = _grab_error(lambda: head(x.double() if rank == 0 else x, y, sampled=inp["SA"]))
        out["F_empty"] = _grab_error(lambda: head(x[:0], y[:0]))
        out["F_grow"] = _grab_error(lambda: head.grow(torch.zeros(1 if rank == 0 else 2, D)))
        out["F_grow_values"] = _grab_error(lambda: head.grow(torch.full((2, D), float(rank == 1))))
        out["F_grow_nan"] = _grab_error(lambda: head.grow(torch.full((2, D), math.nan if rank == ws - 1 else 0.0)))
        out["F_grow_classes"] = head.num_classes
        out["F_small"] = _grab_error(lambda: simcore.PartialMarginHead(ws - 1, D, process_group=grp))
        out["F_after"] = head(x, y, sampled=inp["SA"]).detach()
        torch.save(out, os.path.join(tmp, f"out{ws}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(ws, tmp):
    spawn_ranks(_worker, ws, tmp, args=(ws,), deadline_s=DEADLINE_S)
    return [torch.load(os.path.join(tmp, f"out{ws}_{r}.pt")) for r in range(ws)]


# --------------------------------------------------------------------------- the single-process side
def _with_positives(labels, extra, gen):
    extra_ids = torch.randperm(C, generator=gen)[:extra]
    return torch.unique(torch.cat([labels, extra_ids]))


def _single(name, inp, labels, sampled, x_scale=1.0):
    head = simcore.PartialMarginHead(C, D, **_head_kwargs(name))
    head.weight.data.copy_(_weight(inp, name))
    x = (inp["X"] * x_scale).requires_grad_(True)
    loss = head(x, labels, sampled=sampled)
    loss.backward()
    return dict(loss=loss.detach(), gx=x.grad, gw=_dense(head._pending, C * _k(name)))


def _single_ddp_run(inp):
    bb = _backbone()
    opt = torch.optim.SGD(bb.parameters(), lr=0.1)
    head = simcore.PartialMarginHead(C, D, **_head_kwargs("D"))
    head.weight.data.copy_(inp["W"])
    res = {"loss": []}
    for step, key in enumerate(("SD1", "SD2")):
        loss = head(bb(inp["Z"]), inp["Y"], sampled=inp[key])
        opt.zero_grad()
        head.zero_grad()
        loss.backward()
        if step == 0:
            res["bb_grad"] = [p.grad.clone() for p in bb.parameters()]
        opt.step()
        head.step()
        res["loss"].append(loss.detach())
    res["state"] = {k: v.clone() for k, v in head.state_dict().items()}
    res["bb_final"] = [p.detach().clone() for p in bb.parameters()]
    return res


def _single_grow(inp, name):
    k = _k(name)
    head = simcore.PartialMarginHead(C, D, **_head_kwargs(name))
    _set_state(head, inp, name, 0, C * k)
    return _grow_and_step(head, inp, name, inp["X"], inp["YG"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    seed = int(os.environ.get("SIMCORE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\n[seed] test_distributed: SIMCORE_TEST_SEED={seed}")
    gen = torch.Generator().manual_seed(seed)
    tmp = tmp_path_factory.mktemp("dist")
    y = torch.randint(C, (N,), generator=gen)
    yb = torch.randint(C // 2, (N,), generator=gen)
    inp = {"X": torch.randn(N, D, generator=gen), "W": torch.randn(C, D, generator=gen), "Y": y, "YB": yb,
           "W3": torch.randn(3 * C, D, generator=gen),
           "Z": torch.randn(N, DIN, generator=gen),
           "SA": _with_positives(y, 15, gen),
           "SB": torch.unique(torch.cat([yb, torch.randperm(C // 2, generator=gen)[:5]])),  # classes < C/2 only
           "SD1": _with_positives(y, 10, gen), "SD2": _with_positives(y, 20, gen),
           "G": torch.randn(3 * GROW_N, D, generator=gen), "RS": torch.randint(1, 9, (3 * C,), generator=gen),
           **{"ST_" + k: torch.rand(3 * C, D, generator=gen) for k in STATE[:3]}}
    inp["YG"] = torch.cat([torch.randint(C + GROW_N, (N - 3,), generator=gen), torch.arange(C, C + 3)])
    g_extra = torch.randperm(C + GROW_N, generator=gen)[:12]
    inp["SG"] = torch.unique(torch.cat([inp["YG"], g_extra]))
    assert not bool(torch.isin(inp["Y"], inp["SB"]).all())  # SB lacks labels of Y (for F_missing)
    torch.save(inp, tmp / "inputs.pt")
    expect = {"A": _single("A", inp, y, inp["SA"]), "A2": _single("A2", inp, y, None),
              "B": _single("B", inp, yb, inp["SB"]), "D": _single_ddp_run(inp),
              **{"G_" + name: _single_grow(inp, name) for name in GROW},
              **{name: _single(name, inp, y, inp["SA"], X_SCALE) for name in VARIANTS}}
    outs = {ws: _spawn(ws, tmp) for ws in (2, 4)}  # 4 after 2: it loads 2's checkpoint
    return inp, expect, outs, tmp


WS = pytest.mark.parametrize("ws", [2, 4])


def _check_equivalent(res, exp, sizes, ws, gx_scale=1.0, k=1):
    for rank, r in enumerate(res):
        assert rel_err(r["loss"], exp["loss"]) <= TOL  # the same global loss on every rank
        off = sum(sizes[:rank])
        if sizes[rank]:
            assert rel_err(r["gx"], gx_scale * exp["gx"][off:off + sizes[rank]]) <= TOL
        else:
            assert r["gx"].shape == (0, D)
        s, e = r["shard"]
        assert (s, e) == shard_bounds(C, ws, rank)
        s, e = s * k, e * k  # rows of the shard's sub-centres
        if exp["gw"][s:e].abs().sum() > 0:
            assert rel_err(r["gw"], exp["gw"][s:e]) <= TOL
        else:
            assert r["gw"].abs().sum() == 0


@WS
def test_same_loss_and_gradients_as_single_process(world, ws):
    """Explicit sampled set; grad_reduction='sum': each rank gets exactly its rows of ∂L/∂X."""
    inp, expect, outs, _ = world
    _check_equivalent([o["A"] for o in outs[ws]], expect["A"], SIZES[ws], ws)


@WS
@pytest.mark.parametrize("name", VARIANTS)
def test_margin_family_matches_single_process(world, ws, name):
    """Cam-Softmax (+filtering), AdaFace and MagFace (per-row margins; MagFace's flow to the
    norms, plus its regulariser), CurricularFace (global target cosines) and sub-centres
    (+filtering) on the sharded head: the same loss and gradients as one process."""
    inp, expect, outs, _ = world
    _check_equivalent([o[name] for o in outs[ws]], expect[name], SIZES[ws], ws, k=_k(name))


@WS
def test_full_softmax_and_ddp_mean_scaling(world, ws):
    """sample_rate=1.0, combined margin; grad_reduction='mean' multiplies ∂L/∂x by the world size."""
    inp, expect, outs, _ = world
    _check_equivalent([o["A2"] for o in outs[ws]], expect["A2"], SIZES[ws], ws, gx_scale=float(ws))


@WS
def test_shards_with_nothing_sampled(world, ws):
    """Labels and sampled classes all in the first half: the last shard(s) sample nothing."""
    inp, expect, outs, _ = world
    res = [o["B"] for o in outs[ws]]
    assert res[-1]["local"].numel() == 0
    _check_equivalent(res, expect["B"], SIZES[ws], ws)


@WS
def test_per_shard_sampling(world, ws):
    """Each shard keeps the global batch's positives it owns and draws uniform negatives
    from itself up to ceil(rate·C_r); the union over ranks run single-process matches."""
    inp, expect, outs, _ = world
    res = [o["C"] for o in outs[ws]]
    y = inp["Y"]
    for r in res:
        s, e = r["shard"]
        local = r["local"]
        assert bool(((local >= s) & (local < e)).all()) and bool((local[1:] > local[:-1]).all())
        pos = torch.unique(y[(y >= s) & (y < e)])
        assert bool(torch.isin(pos, local).all())
        assert local.numel() == max(pos.numel(), -(-(e - s) // 4))
    union = torch.cat([r["local"] for r in res])
    _check_equivalent(res, _single("C", inp, y, union), SIZES[ws], ws)


@WS
def test_ddp_backbone_and_head_steps_match_single_process(world, ws):
    """DDP averages backbone gradients; with grad_reduction='mean' the result is the
    single-process gradient on the global batch. Two AdamW head steps + SGD backbone steps."""
    inp, expect, outs, _ = world
    exp = expect["D"]
    for rank, o in enumerate(outs[ws]):
        d = o["D"]
        for a, b in zip(d["bb_grad"], exp["bb_grad"]):
            assert rel_err(a, b) <= TOL
        for a, b in zip(d["bb_final"], exp["bb_final"]):
            assert rel_err(a, b) <= TOL
        for a, b in zip(d["loss"], exp["loss"]):
            assert rel_err(a, b) <= TOL
        s, e = shard_bounds(C, ws, rank)
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            assert rel_err(d["state"][key], exp["state"][key][s:e]) <= TOL
        assert torch.equal(d["state"]["row_step"], exp["state"]["row_step"][s:e])


@WS
@pytest.mark.parametrize("name", GROW)
def test_grow_moves_rows_like_the_single_process_grow(world, ws, name):
    """grow() on every rank with the same centres: each rank's centres and optimizer state are
    exactly the single-process grown head's rows of its new shard (the new rows' state zero),
    and one step over old and new classes afterwards matches the single process to 1e-5."""
    inp, expect, outs, _ = world
    exp, k = expect["G_" + name], _k(name)
    for rank, o in enumerate(outs[ws]):
        g = o["G_" + name]
        s, e = shard_bounds(C + GROW_N, ws, rank)
        assert g["shard"] == (s, e) and g["num_classes"] == C + GROW_N
        assert torch.equal(g["ids"], exp["ids"]) and g["ids"].tolist() == list(range(C, C + GROW_N))
        for key, v in exp["grown"].items():
            if not key.startswith("loss."):
                assert torch.equal(g["grown"][key], v[s * k:e * k]), key
        assert rel_err(g["loss"], exp["loss"]) <= TOL
        for key, v in exp["stepped"].items():
            if key == "row_step":
                assert torch.equal(g["stepped"][key], v[s * k:e * k])
            elif not key.startswith("loss."):
                assert rel_err(g["stepped"][key], v[s * k:e * k]) <= TOL, key


def test_checkpoint_reshards_from_2_to_4_and_1(world):
    inp, expect, outs, tmp = world
    saved = [torch.load(tmp / f"ckpt{r}.pt") for r in range(2)]
    full = {k: torch.cat([sd[k] for sd in saved]) for k in ("weight", "exp_avg", "exp_avg_sq", "row_step")}
    assert rel_err(full["weight"], expect["D"]["state"]["weight"]) <= TOL
    for rank, o in enumerate(outs[4]):  # world size 4 loaded world size 2's files
        s, e = shard_bounds(C, 4, rank)
        for k, v in full.items():
            assert torch.equal(o["E"][k], v[s:e]), k
        assert torch.equal(o["E_roundtrip"], full["weight"][s:e])
    one = simcore.PartialMarginHead(C, D, **_head_kwargs("D"))  # world size 1
    load_resharded(one, [tmp / "ckpt1.pt", tmp / "ckpt0.pt"])  # any order, paths
    for k, v in full.items():
        assert torch.equal(getattr(one, k), v), k
    # and back: a single-process state dict loads into a sharded layout's rows
    other = simcore.PartialMarginHead(C, D, **_head_kwargs("D"))
    load_resharded(other, [one.state_dict()])
    assert torch.equal(other.weight, one.weight)


def test_checkpoint_errors(world):
    inp, expect, outs, tmp = world
    for o in outs[4]:
        assert o["E_plain_load"].startswith("ValueError") and "world size 2" in o["E_plain_load"] \
            and "load_resharded" in o["E_plain_load"]
        assert o["E_missing_shard"].startswith("ValueError") and "world size 2" in o["E_missing_shard"]
    one = simcore.PartialMarginHead(C + 1, D, **_head_kwargs("D"))
    with pytest.raises(ValueError, match="60 classes"):
        load_resharded(one, [tmp / "ckpt0.pt", tmp / "ckpt1.pt"])
    sgd = simcore.PartialMarginHead(C, D, **dict(_head_kwargs("D"), optimizer="sgd"))
    with pytest.raises(ValueError, match="optimizer"):
        load_resharded(sgd, [tmp / "ckpt0.pt", tmp / "ckpt1.pt"])


@WS
def test_bad_input_raises_on_every_rank(world, ws):
    inp, expect, outs, _ = world
    for rank, o in enumerate(outs[ws]):
        assert o["F_label"].startswith("ValueError") and "outside the global class range [0, 60)" in o["F_label"]
        assert f"rank {ws - 1}" in o["F_label"]
        assert o["F_dim"].startswith("ValueError") and "embedding dim per rank" in o["F_dim"]
        if rank == 0:
            assert o["F_dtype"].startswith("TypeError") and "int64" in o["F_dtype"]
        else:
            assert o["F_dtype"].startswith("ValueError") and "rank(s) [0]" in o["F_dtype"]
        assert o["F_sampled"].startswith("ValueError") and "same tensor" in o["F_sampled"]
        assert o["F_missing"].startswith("ValueError") and "contain every label" in o["F_missing"]
        assert o["F_config"].startswith("ValueError") and "identical arguments" in o["F_config"]
        assert o["F_grad"].startswith("ValueError") and "require grad on ranks" in o["F_grad"]
        if rank == 0:
            assert o["F_f64"].startswith("TypeError") and "float64 is not supported" in o["F_f64"]
        else:
            assert o["F_f64"].startswith("ValueError") and "rank(s) [0]" in o["F_f64"]
        assert o["F_empty"].startswith("ValueError") and "empty global batch" in o["F_empty"]
        assert o["F_grow"].startswith("ValueError") and "different numbers of new centre rows [1" in o["F_grow"]
        assert o["F_grow_values"].startswith("ValueError") and "differ across ranks" in o["F_grow_values"]
        if rank == ws - 1:
            assert o["F_grow_nan"].startswith("ValueError") and "NaN or Inf" in o["F_grow_nan"]
        else:
            assert o["F_grow_nan"].startswith("ValueError") and f"rank(s) [{ws - 1}]" in o["F_grow_nan"]
        assert o["F_grow_classes"] == C                    # nothing grew
        assert o["F_small"].startswith("ValueError") and "at least the world size" in o["F_small"]
        # the group is still in step after the errors
        assert rel_err(o["F_after"], expect["A"]["loss"]) <= TOL


def test_single_process_head_takes_sampled(generator):
    head = simcore.PartialMarginHead(20, 4, sample_rate=0.5)
    y = torch.tensor([3, 7, 7])
    with pytest.raises(ValueError, match="every label"):
        head(torch.randn(3, 4), y, sampled=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="strictly increasing"):
        head(torch.randn(3, 4), y, sampled=torch.tensor([7, 3]))
    loss, s = head(torch.randn(3, 4, generator=generator), y, sampled=torch.tensor([1, 3, 7]), return_sampled=True)
    assert s.tolist() == [1, 3, 7] and torch.isfinite(loss)


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        simcore.PartialMarginHead(10, 4, process_group=object())


def test_subclass_with_process_group_is_refused():
    class Mine(simcore.PartialMarginHead):
        pass
    with pytest.raises(ValueError, match="does not shard"):
        Mine(10, 4, process_group=object())
