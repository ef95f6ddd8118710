"""`simcore train --grad-accum N`: N micro-batches of --batch-size per optimizer step.

- A run with --grad-accum 2 and --batch-size 3 takes the steps of a run with batch 6 (the same
  samples, augmentations and sampled classes; BatchNorm replaced by identities, since it sees
  micro-batch statistics): losses, backbone and centres within float32 rounding, in fp32 and under
  fp16 autocast with its GradScaler. The micro-batches are seen to happen.
- Interrupted and resumed, it is bit for bit the uninterrupted run; a resume with another N is refused.
- On 2 gloo ranks (DDP with no_sync, the class-sharded head, sample rate 0.5 so that each shard
  samples): --grad-accum 2 gives the steps of the 2-rank run with the doubled batch.
- The command line takes the flag (and refuses bad values: tests/test_train_config.py).
Float64 exactness of the accumulation itself: tests/test_accumulate.py.
"""
import datetime
import json
import os

import pytest
import torch
from conftest import rel_err, spawn_ranks  # noqa: E402
from test_cli import run_inproc  # noqa: F401  (the fixture: simcore.isc.cli.main in-process)
from test_train_ddp import _no_batchnorm  # noqa: E402
from train_helpers import photo_folder, step_losses, tiny_config  # noqa: E402

from simcore.isc import train as T  # noqa: E402
from simcore.isc.embed import load_checkpoint  # noqa: E402

RUN = dict(sample_rate=0.5, drip=(6, "ALL"), steps=(3, 3), checkpoint_every=2)
# another summation order through 6 Adam steps (measured: 1.1e-6 in fp32, 7e-8 under the CPU's fp16 autocast)
TOL = {"fp32": 1e-5, "fp16": 1e-4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 12)


def _compare_runs(a, b, tol):
    """Largest relative difference of the losses, then the final backbone and centres within ``tol``."""
    la, lb = step_losses(a), step_losses(b)
    assert len(la) == len(lb) == 6
    worst = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    assert worst <= tol, (la, lb)
    ca, cb = load_checkpoint(os.path.join(a, "final.pt")), load_checkpoint(os.path.join(b, "final.pt"))
    for k, v in cb["model"].items():
        if v.is_floating_point():
            assert rel_err(ca["model"][k], v) <= tol, k
    assert rel_err(ca["head"]["weight"], cb["head"]["weight"]) <= tol
    return worst


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_micro_batches_step_as_one_double_batch(folder, tmp_path, monkeypatch, precision):
    monkeypatch.setattr(T, "build_backbone", _no_batchnorm)
    seen = []

    def spy(embed, head, micro_batches, **kw):
        seen.append([y.numel() for _, y in micro_batches])
        return accumulate(embed, head, micro_batches, **kw)
    accumulate = T.accumulate_gradients
    monkeypatch.setattr(T, "accumulate_gradients", spy)
    T.train(tiny_config(folder, tmp_path / "accum", RUN, batch_size=3, grad_accum=2, precision=precision),
            log_fn=lambda m: None)
    assert seen == [[3, 3]] * 6
    seen.clear()
    T.train(tiny_config(folder, tmp_path / "big", RUN, batch_size=6, precision=precision), log_fn=lambda m: None)
    assert seen == [[6]] * 6
    worst = _compare_runs(tmp_path / "accum", tmp_path / "big", TOL[precision])
    print(f"{precision}: --grad-accum 2 vs one batch of 6: largest relative loss difference {worst:.2e}")


def test_an_interrupted_accumulating_run_resumes_bit_for_bit(folder, tmp_path, monkeypatch):
    kw = dict(batch_size=(2, 3), grad_accum=2, warmup=2)
    T.train(tiny_config(folder, tmp_path / "a", RUN, **kw), log_fn=lambda m: None)
    monkeypatch.setenv(T.FAIL_AFTER_STEP_ENV, "5")        # stage 2, step 2; the last checkpoint: global step 4
    with pytest.raises(RuntimeError, match="simulated failure after step 5"):
        T.train(tiny_config(folder, tmp_path / "b", RUN, **kw), log_fn=lambda m: None)
    monkeypatch.delenv(T.FAIL_AFTER_STEP_ENV)
    resume = str(tmp_path / "b" / "last.pt")
    assert load_checkpoint(resume)["global_step"] == 4
    with pytest.raises(ValueError, match=r"grad_accum \(2 -> 3\)"):
        T.train(tiny_config(folder, tmp_path / "b", RUN, resume=resume, **dict(kw, grad_accum=3)),
                log_fn=lambda m: None)
    resumed = T.train(tiny_config(folder, tmp_path / "b", RUN, resume=resume, workers=1, **kw), log_fn=lambda m: None)
    assert len(resumed.losses) == 2
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    ca, cb = load_checkpoint(tmp_path / "a" / "final.pt"), load_checkpoint(tmp_path / "b" / "final.pt")
    for part in ("model", "head"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)


def _ddp_worker(rank, tmp, folder):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        T.build_backbone = _no_batchnorm
        for name, kw in (("accum", dict(batch_size=4, grad_accum=2)), ("big", dict(batch_size=8))):
            T.train(tiny_config(folder, os.path.join(tmp, name), RUN, **kw), log_fn=lambda m: None)
    finally:
        dist.destroy_process_group()


def test_two_ranks_accumulate_as_they_step_the_double_batch(folder, tmp_path):
    spawn_ranks(_ddp_worker, 2, tmp_path, args=(str(folder),), deadline_s=240)
    la, lb = step_losses(tmp_path / "accum"), step_losses(tmp_path / "big")
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) / abs(y) for x, y in zip(la, lb)) <= TOL["fp32"], (la, lb)
    ca, cb = (load_checkpoint(tmp_path / name / "final.pt") for name in ("accum", "big"))
    assert ca["world_size"] == 2
    for k, v in cb["model"].items():
        if v.is_floating_point():
            assert rel_err(ca["model"][k], v) <= TOL["fp32"], k
    for r in range(2):   # each rank's head shard: the same rows stepped (the same classes sampled)
        sa, sb = (torch.load(tmp_path / name / c["head_shards"][r], weights_only=False)["head"]
                  for name, c in (("accum", ca), ("big", cb)))
        assert torch.equal(sa["row_step"], sb["row_step"])
        assert rel_err(sa["weight"], sb["weight"]) <= TOL["fp32"]


def test_the_command_takes_the_flag(folder, tmp_path, run_inproc):  # noqa: F811
    r = run_inproc("train", folder, "-o", tmp_path / "run", "--grad-accum", "2", "--batch-size", "3", "--steps", "2",
                   "--dim", "16", "--image-size", "32", "--views", "1", "--no-progress", "--json",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "batch 6 (2 micro-batches a step)" in r.stderr
    assert json.loads(r.stdout)["steps"] == 2
    start = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert start["config"]["grad_accum"] == 2 and start["config"]["batch_size"] == [3]
