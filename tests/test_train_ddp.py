"""`simcore train` on several ranks: a 2-rank gloo world on the CPU.

- In spawned ranks (tests/conftest.py's spawn_ranks, a file:// process group that ``train`` then
  uses): a 2-rank run matches a 1-process run with the same global batches (sample_rate 1.0, so
  no class sampling; BatchNorm replaced by identities, since DDP's BatchNorm normalises each rank's
  half of the batch), an interrupted 2-rank run resumes bit for bit, and its checkpoints resume in
  one process.
- The command of docs/train.md ("Several GPUs") as written, through the real torchrun (a
  ``simcore`` shim on PATH stands for the installed console script), then ``simcore embed`` on
  its checkpoint.
"""
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TESTS_DIR, rel_err, spawn_ranks, subprocess_env  # noqa: E402
from train_helpers import photo_folder, step_losses, tiny_config  # noqa: E402

from simcore.isc import train as T  # noqa: E402
from simcore.isc.embed import load_checkpoint  # noqa: E402

RUN = dict(drip=(4, "ALL"), batch_size=(4, 6), steps=(3, 3), checkpoint_every=2)
FAIL_AT = 5        # stage 2, step 2; the last checkpoint before it: global step 4 (stage 2, step 1)
TOL = 1e-5         # float rounding of another summation order, through 6 Adam steps
DOC = os.path.join(os.path.dirname(TESTS_DIR), "docs", "train.md")


def _no_batchnorm(spec, pretrained=None):
    """The run's backbone with every BatchNorm an identity: per-rank batch statistics would make
    the 2-rank run differ from the 1-process one by construction."""
    from simcore.isc.backbones import build_backbone

    def strip(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, name, torch.nn.Identity())
            else:
                strip(child)
    model = build_backbone(spec, pretrained=pretrained)
    strip(model)
    return model


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank, tmp, folder):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        T.build_backbone = _no_batchnorm
        out = {"few_classes": _error(lambda: T.train(tiny_config(folder, os.path.join(tmp, "x"), RUN,
                                                                 drip=(1, "ALL")))),
               "rank1_bad": _error(lambda: T.train(tiny_config(folder if rank == 0 else os.path.join(tmp, "nope"),
                                                               os.path.join(tmp, "y"), RUN), log_fn=lambda m: None))}
        out["a"] = T.train(tiny_config(folder, os.path.join(tmp, "a"), RUN), log_fn=lambda m: None).losses
        os.environ[T.FAIL_AFTER_STEP_ENV] = str(FAIL_AT)
        try:
            T.train(tiny_config(folder, os.path.join(tmp, "b"), RUN), log_fn=lambda m: None)
        except T.SimulatedFailure as e:
            out["b_failed"] = str(e)
        del os.environ[T.FAIL_AFTER_STEP_ENV]
        out["b"] = T.train(tiny_config(folder, os.path.join(tmp, "b"), RUN, resume=os.path.join(tmp, "b", "last.pt")),
                           log_fn=lambda m: None).losses
        out["group_kept"] = dist.is_initialized()      # train leaves a group it did not create
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 12)


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, 2, tmp, args=(str(folder),), deadline_s=240)
    outs = [torch.load(tmp / f"out{r}.pt") for r in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "build_backbone", _no_batchnorm)
        one = T.train(tiny_config(folder, tmp / "one", RUN), log_fn=lambda m: None)
    return tmp, outs, one


def _full_head(run_dir, ckpt_name="final.pt"):
    ck = load_checkpoint(os.path.join(run_dir, ckpt_name))
    if ck["head_shards"] is None:
        return ck["head"]
    shards = [torch.load(os.path.join(run_dir, n), weights_only=False)["head"] for n in ck["head_shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in ("weight", "exp_avg", "exp_avg_sq", "row_step")}


def test_two_ranks_match_one_process_on_the_same_global_batches(runs):
    tmp, outs, one = runs
    a0, a1 = outs[0]["a"], outs[1]["a"]
    assert a0 == a1 and len(a0) == 6                    # the global batch's loss, on every rank
    assert step_losses(tmp / "a") == a0                     # rank 0's log
    worst = max(abs(x - y) / abs(y) for x, y in zip(a0, one.losses))
    print(f"2 ranks vs 1 process: losses {a0} vs {one.losses}, largest relative difference {worst:.2e}")
    assert worst <= TOL, (a0, one.losses)
    ca, c1 = load_checkpoint(tmp / "a" / "final.pt"), load_checkpoint(tmp / "one" / "final.pt")
    assert ca["world_size"] == 2 and ca["head"] is None and ca["head_classes"] == 12
    for k in c1["model"]:
        if c1["model"][k].is_floating_point():
            assert rel_err(ca["model"][k], c1["model"][k]) <= TOL, k
    ha, h1 = _full_head(tmp / "a"), _full_head(tmp / "one")
    assert rel_err(ha["weight"], h1["weight"]) <= TOL
    assert torch.equal(ha["row_step"], h1["row_step"])  # every row stepped as often (grown at stage 2)
    assert outs[0]["group_kept"]


def test_setup_errors_raise_on_every_rank(runs):
    """A setting that cannot work, and an error on one rank only: every rank raises (none waits
    for the others in a collective), and the same world trains afterwards."""
    _, outs, _ = runs
    for o in outs:
        assert o["few_classes"].startswith("TrainSetupError") and "at least 2 classes, got 1" in o["few_classes"]
    assert outs[1]["rank1_bad"].startswith("NoImagesError") and "nope" in outs[1]["rank1_bad"]
    assert outs[0]["rank1_bad"] == "TrainSetupError: rank(s) [1] failed to set up the run (see the error on those ranks)"


def test_checkpoint_files_per_rank(runs):
    tmp, _, _ = runs
    names = sorted(os.listdir(tmp / "a"))
    # stage-end shards stay (stage<k>.pt and final.pt name them); superseded mid-stage ones are removed
    assert names == ["final.pt", "head-stage1-step0.rank0-of-2.pt", "head-stage1-step0.rank1-of-2.pt",
                     "head-stage2-step0.rank0-of-2.pt", "head-stage2-step0.rank1-of-2.pt", "last.pt", "log.jsonl",
                     "stage1.pt", "stage2.pt"]
    s1 = load_checkpoint(tmp / "a" / "stage1.pt")
    assert s1["head_shards"] == ["head-stage1-step0.rank0-of-2.pt", "head-stage1-step0.rank1-of-2.pt"]
    shard = torch.load(tmp / "a" / "head-stage1-step0.rank1-of-2.pt", weights_only=False)
    assert shard["rank"] == 1 and shard["head"]["_extra_state"]["start"] == 2   # classes [2, 4) of 4


def test_an_interrupted_two_rank_run_resumes_bit_for_bit(runs):
    tmp, outs, _ = runs
    for o in outs:
        assert f"after step {FAIL_AT}" in o["b_failed"]
        assert o["b"] == o["a"][FAIL_AT - 1:]           # steps 5 and 6 again, from the step-4 checkpoint
    assert step_losses(tmp / "b") == outs[0]["a"]
    ha, hb = _full_head(tmp / "a"), _full_head(tmp / "b")
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, folder, monkeypatch):
    """Stage 1's end of the 2-rank run, resumed in one process: the head is resharded from 2
    shard files (simcore.load_resharded), stage 2 grows it and trains as the 2-rank run did."""
    tmp, outs, one = runs
    shutil.copytree(tmp / "a", tmp / "a1")
    monkeypatch.setattr(T, "build_backbone", _no_batchnorm)
    msgs = []
    r = T.train(tiny_config(folder, tmp / "a1", RUN, resume=str(tmp / "a1" / "stage1.pt")), log_fn=msgs.append)
    assert any("saved by 2 rank(s), now 1" in m for m in msgs)
    assert max(abs(x - y) / abs(y) for x, y in zip(r.losses, outs[0]["a"][3:])) <= TOL
    ck = load_checkpoint(tmp / "a1" / "final.pt")
    assert ck["world_size"] == 1 and ck["head_shards"] is None
    assert rel_err(ck["head"]["weight"], _full_head(tmp / "a")["weight"]) <= TOL


def _doc_commands():
    """The ```bash block of docs/train.md's "Several GPUs" section."""
    text = open(DOC, encoding="utf-8").read()
    start = text.index("### Several GPUs")
    section = text[start:text.index("\n## ", start)]
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if not b.startswith("# not run:")]
    return [line for b in blocks for line in b.splitlines() if line.strip()]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_documented_torchrun_command_and_embed(tmp_path, capsys, monkeypatch):
    """docs/train.md's torchrun line as written (2 CPU processes, gloo), then `simcore embed` on
    the 2-rank run's checkpoint."""
    lines = _doc_commands()
    assert len(lines) == 2 and lines[0].startswith("torchrun --nproc_per_node=2 --no-python simcore train")
    assert lines[1].startswith("simcore embed")
    text = open(DOC, encoding="utf-8").read()
    try_it = text[text.index("## Try it"):text.index("\n## ", text.index("## Try it") + 1)]
    monkeypatch.chdir(tmp_path)
    exec(compile(re.findall(r"```python\n(.*?)```", try_it, re.S)[0], "docs/train.md", "exec"), {})  # photos/
    shim = tmp_path / "bin" / "simcore"                  # the installed console script's stand-in
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m simcore.isc.cli \"$@\"\n")
    shim.chmod(0o755)
    env = subprocess_env(PATH=f"{shim.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                              f"{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                         PET_MASTER_PORT=str(_free_port()))  # torchrun's --master-port; not its busy default 29500
    out = subprocess.run(lines[0], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("stage 2: 24 classes") == 1, out.stdout     # rank 0 reports, once
    run = next(p for p in shlex.split(lines[0]) if p.startswith("run"))
    ck = load_checkpoint(tmp_path / run / "final.pt")
    assert ck["world_size"] == 2 and ck["global_step"] == 20
    start = json.loads(open(tmp_path / run / "log.jsonl").readline())
    assert start["world_size"] == 2
    from simcore.isc.cli import main
    capsys.readouterr()
    assert main(shlex.split(lines[1])[1:]) == 0
    import h5py
    out_file = next(p for p in shlex.split(lines[1]) if p.endswith(".h5"))
    with h5py.File(tmp_path / out_file) as f:
        assert f["query"].shape == (20, 32) and f["reference"].shape == (15, 32)
