"""`simcore train` on WebDataset tar shards the tests write themselves (8 shards of 4 samples, 4 classes):
the command end to end (``--labels cls`` and ``stem``), the refusals before any work, a corrupt member and a
truncated shard (skipped and counted, or refused under --strict), disjoint shards per DataLoader worker
and per rank, and resume: bit for bit with the same worker count, exact in the samples with another."""
import io
import itertools
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from simcore.isc import train as T
from simcore.isc.shards import ShardError, decode_index, scan_shards, write_shards
from simcore.isc.training.sources import ShardSource

PATTERN = "shards/train-{000000..000007}.tar"
TINY = dict(widths=(8, 16), dim=8, image_size=16, sample_rate=1.0, progress=False, views=1, batch_size=(4,),
            labels="cls", device="cpu")


def jpeg(cls, seed):
    from PIL import Image
    base = np.array([60 * cls, 255 - 60 * cls, 40 + 50 * cls])
    noise = np.random.default_rng(seed).integers(0, 40, (20, 20, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_set(root, n=32, per_shard=4):
    """Shards ``root/shards/train-%06d.tar``: sample i is class i % 4, key ``CCCC_IIIIII``."""
    return write_shards(((f"{i % 4:04d}_{i:06d}", jpeg(i % 4, i), "jpg", i % 4) for i in range(n)),
                        str(root / "shards" / "train-%06d.tar"), per_shard=per_shard)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardset")
    write_set(root)
    return root


def cli(capsys, monkeypatch, cwd, *args):
    from simcore.isc.cli import main
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


BASE = ["--image-size", "16", "--dim", "8", "--steps", "3", "--batch-size", "4", "--views", "1", "--sample-rate", "1",
        "--device", "cpu", "--no-progress", "--json"]


@pytest.mark.parametrize("labels", ["cls", "stem"])
def test_train_on_shards_end_to_end(shard_root, tmp_path, capsys, monkeypatch, labels):
    r = cli(capsys, monkeypatch, shard_root, "train", PATTERN, "--labels", labels, "-o", tmp_path / "run", *BASE)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["steps"] == 3 and summary["stages"][0]["classes"] == 4 and summary["dropped_samples"] == 0
    assert np.isfinite(summary["final_loss"])
    what = ".cls members" if labels == "cls" else "key stems"
    assert f"32 images, 4 classes (the samples' {what})" in r.stderr
    assert os.path.isfile(tmp_path / "run" / "final.pt")
    # a single .tar is a pattern of one shard
    r = cli(capsys, monkeypatch, shard_root, "train", "shards/train-000003.tar", "--labels", labels,
            "-o", tmp_path / "one", *BASE)
    assert r.returncode == 0, r.stderr
    assert "4 images, 4 classes" in r.stderr


def test_refusals_before_any_work(shard_root, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    os.makedirs(bad / "shards")
    (bad / "shards" / "empty-000000.tar").write_bytes(b"")
    with tarfile.open(bad / "shards" / "none-000000.tar", "w"):
        pass                                            # a valid tar without a member
    write_set(bad, n=4, per_shard=4)
    cases = [
        ([PATTERN, "--labels", "cls"], "7 of 8 shard files are missing"),
        (["shards/empty-000000.tar", "--labels", "cls"], "the shard shards/empty-000000.tar is an empty file"),
        (["shards/none-000000.tar", "--labels", "cls"], "an empty shard (no sample)"),
        (["shards/train-000000.tar"], "--labels cls or stem goes with WebDataset shards"),
        (["shards/train-000000.tar", "--labels", "folder"], "--labels cls or stem goes with WebDataset shards"),
        (["shards", "--labels", "stem"], "--labels cls or stem goes with WebDataset shards"),
        (["shards/train-000000.tar", "--labels", "cls", "--workers", "2"], "--workers 2: 1 shard(s) cannot give"),
        (["shards/train-000000.tar", "--labels", "cls", "--drip", "9"], "--drip asks for 9 classes"),
    ]
    for args, needle in cases:
        r = cli(capsys, monkeypatch, bad, "train", *args, "-o", tmp_path / "out", *BASE)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (args, r.stderr)


def test_corrupt_member_and_truncated_shard(tmp_path, capsys, monkeypatch):
    """An undecodable image is dropped from its batches and counted, a sample without a label and the
    cut end of a truncated shard are skipped at the scan and counted; --strict refuses them."""
    write_set(tmp_path, n=12, per_shard=4)
    broken = write_shards([("0000_a", jpeg(0, 1), "jpg", 0), ("0001_b", b"not a jpeg", "jpg", 1),
                           ("0002_c", jpeg(2, 2), "jpg", 2), ("0003_d", jpeg(3, 3), "jpg", 3)],
                          str(tmp_path / "broken-%d.tar"), per_shard=4)
    path = str(tmp_path / "shards" / "train-000003.tar")
    os.replace(broken[0], path)
    with tarfile.open(path) as t:
        cut = t.getmember("0003_d.jpg").offset_data + 50
    with open(path, "r+b") as f:
        f.truncate(cut)
    with tarfile.open(tmp_path / "shards" / "train-000004.tar", "w") as t:   # a sample without a .cls
        data = jpeg(1, 9)
        info = tarfile.TarInfo("0001_nolabel.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    pattern = "shards/train-{000000..000004}.tar"
    rest = [*BASE[:-4], "--steps", "8", "--no-progress", "--json"]
    r = cli(capsys, monkeypatch, tmp_path, "train", pattern, "--labels", "cls", "-o", tmp_path / "run", *rest)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["steps"] == 8
    assert summary["skipped_files"] == 2                # the cut sample and the unlabelled one
    assert summary["dropped_samples"] >= 1              # the undecodable image, each time it comes
    assert "skipped 2 unreadable sample(s) of 17" in r.stderr and "1 broken shard(s)" in r.stderr
    r = cli(capsys, monkeypatch, tmp_path, "train", pattern, "--labels", "cls", "--strict", "-o", tmp_path / "strict",
            *rest)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "train-000003.tar" in r.stderr, r.stderr
    # the undecodable image alone (no truncation, every label), met by a DataLoader worker during training:
    # one line too (not torch's re-raised traceback), naming the sample
    write_shards([("0000_a", jpeg(0, 1), "jpg", 0), ("0001_b", b"not a jpeg", "jpg", 1)],
                 str(tmp_path / "broken-%d.tar"))
    r = cli(capsys, monkeypatch, tmp_path, "train", "shards/train-{000000..000002}.tar::broken-0.tar", "--labels",
            "cls", "--strict", "--workers", "2", "-o", tmp_path / "strict2", *rest)
    last = r.stderr.splitlines()[-1]
    assert r.returncode == 2 and last.startswith("simcore train: error: broken-0.tar: sample '0001_b'"), r.stderr
    assert "Traceback" not in r.stderr


def test_ranks_share_the_scan(shard_root):
    """Under torchrun each rank scans every R-th shard and the ranks exchange what they found
    (``gather``): each then holds the whole scan, or raises the error any rank met."""
    pattern = str(shard_root / PATTERN)
    whole = scan_shards(pattern)
    recorded = []

    class Stop(Exception):
        pass

    def record(obj):
        recorded.append(obj)
        raise Stop
    for rank in range(2):
        with pytest.raises(Stop):
            scan_shards(pattern, part=(rank, 2), gather=record)
    assert sorted(recorded[0][0]) == [0, 2, 4, 6] and sorted(recorded[1][0]) == [1, 3, 5, 7]
    shared = scan_shards(pattern, part=(0, 2), gather=lambda obj: recorded)
    assert (shared.labels, shared.sizes, shared.paths) == (whole.labels, whole.sizes, whole.paths)
    failed = [recorded[0], ({}, ShardError("x-000001.tar: a broken tar"))]
    with pytest.raises(ShardError, match="x-000001.tar: a broken tar"):
        scan_shards(pattern, part=(0, 2), gather=lambda obj: failed)


class Recording(ShardSource):
    """A ShardSource that records the indices of every trained batch, per process."""
    seen = []

    def stage_loader(self, *args, **kw):
        loader, progress = super().stage_loader(*args, **kw)
        update = progress.update

        def record(indices):
            Recording.seen.append(indices.tolist())
            update(indices)
        progress.update = record
        return loader, progress


def _train(root, out, workers, source=True, **kw):
    c = T.TrainConfig(images=str(root / PATTERN), output=str(out), workers=workers, checkpoint_every=1,
                      **{**TINY, "steps": (12,), "batch_size": (3,), **kw})   # batches of 3 across shards of 4
    Recording.seen = []
    result = T.train(c, log_fn=lambda m: None, source=Recording(c.images) if source else None)
    return result, Recording.seen


def _interrupted(root, out, workers, fail_after, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(T.FAIL_AFTER_STEP_ENV, str(fail_after))
        with pytest.raises(T.SimulatedFailure):
            _train(root, out, workers, **kw)
    return Recording.seen


def _model(out):
    return torch.load(os.path.join(out, "final.pt"), weights_only=False)["model"]


@pytest.fixture(scope="module")
def resumed_runs(shard_root, tmp_path_factory):
    """An uninterrupted run (2 workers, 12 steps of 3); the same run interrupted after step 3 (not a
    multiple of the workers' turn) and resumed with 2 workers, and with none."""
    tmp = tmp_path_factory.mktemp("resume")
    runs = {"whole": _train(shard_root, tmp / "whole", 2)}
    for name, workers in (("same", 2), ("other", 0)):
        before = _interrupted(shard_root, tmp / name, 2, 3)
        result, after = _train(shard_root, tmp / name, workers, resume=str(tmp / name / "last.pt"))
        runs[name] = (result, before, after)
    return tmp, runs


def test_resume_is_bit_for_bit_with_the_same_workers(resumed_runs):
    """The resumed run trains on the same batches in the same order as the uninterrupted one: the same
    losses and weights, bit for bit."""
    tmp, runs = resumed_runs
    (whole, seen), (resumed, before, after) = runs["whole"], runs["same"]
    assert before + after == seen
    assert whole.losses[3:] == resumed.losses
    final_whole, final_cut = _model(tmp / "whole"), _model(tmp / "same")
    assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)
    shards = [{decode_index(i)[1] for i in batch} for batch in seen[:10]]
    # DataLoader worker w gives batches w, w + 2, ...: the two workers' shards never meet
    assert not (set().union(*shards[0::2]) & set().union(*shards[1::2]))


def test_resume_with_another_worker_count_is_exact_in_the_samples(resumed_runs):
    """2 workers interrupted, resumed in the main process: no sample trained twice, every sample of the
    first pass (32 samples) trained once, with the same pixels' seeds (the index); the batches are
    regrouped, so the losses after the resume differ from the uninterrupted run's."""
    _, runs = resumed_runs
    (whole, seen), (resumed, before, after) = runs["whole"], runs["other"]
    flat = lambda batches: [i for b in batches for i in b]               # noqa: E731
    epoch0 = lambda ids: sorted(i for i in ids if decode_index(i)[0] == 0)  # noqa: E731
    assert not set(flat(before)) & set(flat(after))
    assert epoch0(flat(before) + flat(after)) == epoch0(flat(seen))     # each of the 32 samples once
    assert len(epoch0(flat(seen))) == 32 and len(set(epoch0(flat(seen)))) == 32
    assert resumed.losses != whole.losses[3:]
    print(f"losses after the resume, 2 workers then 0: {resumed.losses}; uninterrupted: {whole.losses[3:]}")


def test_ranks_read_disjoint_shards(shard_root):
    """Two ranks' stage streams (as under torchrun), 2 DataLoader workers each: no shard read by two of the
    four readers in the first pass, and together they read every shard."""
    c = T.TrainConfig(images=str(shard_root / PATTERN), output="unused", workers=2, **TINY).normalised()
    source = ShardSource(c.images)
    data = source.scan(c)
    source.dataset(c, data.labels, augment=None)
    readers = {}
    for rank in range(2):
        loader, _ = source.stage_loader(c, 0, 4, 4, rank=rank, world=2)
        assert loader.batch_size == 2                   # this rank's half of the global batch of 4
        for k, (_, _, index, _) in enumerate(itertools.islice(loader, 8)):
            for i in index.tolist():
                epoch, shard, _ = decode_index(i)
                if epoch == 0:
                    readers.setdefault(shard, set()).add((rank, k % 2))
    assert sorted(readers) == list(range(8)) and all(len(r) == 1 for r in readers.values())
    # a drip stage of 2 classes: its stream passes over the others' samples
    loader, _ = source.stage_loader(c, 1, 2, 4, rank=0, world=1)
    labels = torch.cat([y for _, y, _, _ in itertools.islice(loader, 6)])
    assert labels.numel() == 24 and set(labels.tolist()) == {0, 1}


def _shard_rank(rank, tmp, root):
    """A rank of a 2-rank gloo world: an uninterrupted run, then one interrupted after step 3 and resumed."""
    import datetime
    import torch.distributed as dist
    from pathlib import Path
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        root, tmp = Path(root), Path(tmp)
        kw = dict(steps=(6,), batch_size=(4,))
        out = {"whole": _train(root, tmp / "whole", 0, **kw)}
        out["before"] = _interrupted(root, tmp / "cut", 0, 3, **kw)
        out["position"] = torch.load(tmp / "cut" / "last.pt", weights_only=False)["data_position"]
        out["resumed"] = _train(root, tmp / "cut", 0, resume=str(tmp / "cut" / "last.pt"), **kw)
        torch.save({k: (v[0].losses, v[1]) if k in ("whole", "resumed") else v for k, v in out.items()},
                   tmp / f"out{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_disjoint_shards_and_resume_bit_for_bit(shard_root, tmp_path):
    """Under a 2-rank gloo world (as torchrun starts it): each rank streams its own shards (the new
    centres summed over both ranks, the checkpoint's data position gathered from both), and an
    interrupted run resumes with the uninterrupted run's losses, bit for bit."""
    from conftest import spawn_ranks
    spawn_ranks(_shard_rank, 2, tmp_path, args=(str(shard_root),), deadline_s=240)
    outs = [torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(2)]
    shards = [{decode_index(i)[1] for b in o["whole"][1] for i in b} for o in outs]
    assert not shards[0] & shards[1] and all(len(b) == 2 for o in outs for b in o["whole"][1])
    for o in outs:
        losses, seen = o["whole"]
        assert o["before"] + o["resumed"][1] == seen and o["resumed"][0] == losses[3:]
    assert outs[0]["whole"][0] == outs[1]["whole"][0]   # the global batch's loss on both ranks
    # the step-3 checkpoint: both ranks' 6 samples each, and the counts they were read with
    position = outs[0]["position"]
    assert position["workers"] == 0 and position["world_size"] == 2
    consumed = {(e, k): n for e, k, n in position["consumed"]}
    expected = {}
    for o in outs:
        for i in (i for b in o["before"] for i in b):
            e, k, p = decode_index(i)
            expected[(e, k)] = max(expected.get((e, k), 0), p + 1)
    assert consumed == expected and sum(consumed.values()) == 12 and {k for _, k in consumed} <= shards[0] | shards[1]
    assert {k for _, k in consumed} & shards[0] and {k for _, k in consumed} & shards[1]


def test_grad_accum_on_shards_takes_n_micro_batches_a_step(shard_root, tmp_path, capsys, monkeypatch):
    """--grad-accum 2 --batch-size 4 on shards: each step takes 8 samples off the stream (logged rows)
    and the micro-batches really run (the stage line says so)."""
    r = cli(capsys, monkeypatch, shard_root, "train", PATTERN, "--labels", "cls", "-o", tmp_path / "run", *BASE,
            "--grad-accum", "2")
    assert r.returncode == 0, r.stderr
    assert "batch 8 (2 micro-batches a step)" in r.stderr
    steps = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"step"' in line]
    steps = [s for s in steps if "batch" in s]
    assert [s["batch"] for s in steps] == [8, 8, 8]
