"""simcore.isc.train: the training copies made batched on the device (``augment_on="device"``; here the
device is the CPU), against the per-sample worker path; and TensorBoard event files (``tensorboard=True``)."""
import json
import os
import sys

import pytest
import torch
from train_helpers import photo_folder, tiny_config  # noqa: E402

from simcore.isc import augment as A  # noqa: E402
from simcore.isc import data as Dt  # noqa: E402
from simcore.isc import train as T  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 12)


def test_both_modes_give_the_model_the_same_kind_of_batch(folder):
    aug = A.RandomAugment(num_ops=(1, 3), intensity=(0.2, 1.0), weights=T.TRAIN_OPS_WEIGHTS)
    ds = Dt.ImageDataset(Dt.list_images(folder), list(range(12)), 32, aug)
    sampler = Dt.StageBatchSampler(range(12), 6, seed=0, stage=0)
    clean = Dt.StageBatchSampler(range(12), 6, seed=0, stage=0, augment=False)
    xw = Dt.collate([ds[it] for it in sampler.batch(0)])[0]
    xd = Dt.collate([ds[it] for it in clean.batch(0)])[0]
    assert xw.dtype == xd.dtype == torch.uint8 and xw.shape == xd.shape == (6, 3, 32, 32)
    key = (0, 0, 0, 0xDE7, 0, 1)
    a = T._training_inputs(xw, "workers", aug, "cpu", key)
    b = T._training_inputs(xd, "device", aug, "cpu", key)
    assert a.shape == b.shape == (6, 3, 32, 32) and a.dtype == b.dtype == torch.float32
    assert 0 <= b.min() and b.max() <= 1 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(b, T._training_inputs(xd, "device", aug, "cpu", key))          # seeded by the key
    assert not torch.equal(b, T._training_inputs(xd, "device", aug, "cpu", (0, 0, 1, 0xDE7, 0, 1)))
    assert ((b - xd.float() / 255).abs().flatten(1).mean(1) > 1e-4).all()            # every image edited


def test_the_modes_differ_and_bad_values_are_refused(folder, tmp_path):
    w = T.train(tiny_config(folder, tmp_path / "w", steps=2, batch_size=4), log_fn=lambda m: None)
    d = T.train(tiny_config(folder, tmp_path / "d", steps=2, batch_size=4, augment_on="device"), log_fn=lambda m: None)
    assert w.losses[0] != d.losses[0]                    # other copies (the same data order and init)
    with pytest.raises(ValueError, match="--augment-on must be one of workers, device, got 'gpu'"):
        tiny_config(folder, tmp_path / "x", augment_on="gpu").normalised()


def test_tensorboard_missing_is_a_note_and_training_goes_on(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)       # as if tensorboard were absent
    msgs = []
    r = T.train(tiny_config(folder, tmp_path, steps=2, batch_size=4, tensorboard=True), log_fn=msgs.append)
    assert len(r.losses) == 2
    assert [m for m in msgs if m.startswith("--tensorboard")] == [T.TENSORBOARD_MISSING]
    notes = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"note"' in line]
    assert [n["message"] for n in notes] == [T.TENSORBOARD_MISSING]
    assert not os.path.exists(tmp_path / "tb")


def test_tensorboard_event_files(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path, steps=3, batch_size=4, tensorboard=True, val_dir=str(folder), val_max=4),
            log_fn=lambda m: None)
    files = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3]
    assert {"train/lr", "train/images_per_second", "val/micro_ap"} <= set(ev.Tags()["scalars"])


def _ddp_worker(rank, tmp, folder):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    kw = dict(drip=(4, "ALL"), batch_size=(4, 6), steps=(3, 3), checkpoint_every=2, augment_on="device")
    try:
        out = {"a": T.train(tiny_config(folder, os.path.join(tmp, "a"), **kw), log_fn=lambda m: None).losses}
        os.environ[T.FAIL_AFTER_STEP_ENV] = "5"
        try:
            T.train(tiny_config(folder, os.path.join(tmp, "b"), **kw), log_fn=lambda m: None)
        except T.SimulatedFailure:
            out["b_failed"] = True
        del os.environ[T.FAIL_AFTER_STEP_ENV]
        out["b"] = T.train(tiny_config(folder, os.path.join(tmp, "b"), resume=os.path.join(tmp, "b", "last.pt"), **kw),
                           log_fn=lambda m: None).losses
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_device_mode_under_two_ranks_resumes(folder, tmp_path):
    """2 gloo ranks: each augments its share of the global batch in the loop; the ranks agree on the
    loss, and an interrupted run resumes onto the uninterrupted one's losses."""
    from conftest import spawn_ranks
    spawn_ranks(_ddp_worker, 2, tmp_path, args=(str(folder),), deadline_s=240)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    assert outs[0]["a"] == outs[1]["a"] and all(o.get("b_failed") for o in outs)
    assert outs[0]["b"] == outs[0]["a"][4:]            # resumed after global step 4
    assert all(torch.isfinite(torch.tensor(outs[0]["a"])))
