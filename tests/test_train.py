"""simcore.isc.train: drip training from an image folder, checkpoints and a bit-identical resume, losses,
precisions, labels, validation, backbones by name; all on tiny CPU models."""
import json
import os
import stat
import sys
import types
import warnings

import pytest
import torch
from conftest import hardware_only  # noqa: E402
from test_data import write_photos  # noqa: E402
from train_helpers import TINY, log_records, photo_folder, tiny_config  # noqa: E402

from simcore.isc import augment as A  # noqa: E402
from simcore.isc import train as T  # noqa: E402
from simcore.isc.backbones import BackboneError, TimmBackbone, build_backbone  # noqa: E402
from simcore.isc.embed import load_checkpoint  # noqa: E402
from simcore.isc.files import atomic_write  # noqa: E402



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 12)


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_an_interrupted_run_resumes_bit_for_bit(folder, tmp_path, monkeypatch, augment_on):
    kw = dict(drip=(4, "ALL"), batch_size=(4, 6), steps=(4, 5), checkpoint_every=3, warmup=2, augment_on=augment_on)
    full = T.train(tiny_config(folder, tmp_path / "a", **kw), log_fn=lambda m: None)
    monkeypatch.setenv(T.FAIL_AFTER_STEP_ENV, "7")       # stage 2, step 3; the last checkpoint: global step 6
    with pytest.raises(RuntimeError, match="simulated failure after step 7"):
        T.train(tiny_config(folder, tmp_path / "b", **kw), log_fn=lambda m: None)
    monkeypatch.delenv(T.FAIL_AFTER_STEP_ENV)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["global_step"] == 6
    resumed = T.train(tiny_config(folder, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), workers=2, **kw),
                      log_fn=lambda m: None)
    assert len(resumed.losses) == 3                       # steps 7, 8, 9 again
    a, b = log_records(tmp_path / "a", "step"), log_records(tmp_path / "b", "step")
    assert [r["global_step"] for r in b] == list(range(1, 10))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]           # the log was cut back at the checkpoint
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    ca, cb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for part in ("model", "head"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert ca["head_classes"] == 12 and ca["stage"] == 2
    assert full.stages[0]["classes"] == 4 and full.stages[1]["steps"] == 5
    other = "device" if augment_on == "workers" else "workers"   # the mode shapes the samples: a resume keeps it
    with pytest.raises(ValueError, match=rf"augment_on \('{augment_on}' -> '{other}'\)"):
        T.train(tiny_config(folder, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"),
                            **dict(kw, augment_on=other)), log_fn=lambda m: None)


def test_resume_refuses_other_settings(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path, steps=2, batch_size=4), log_fn=lambda m: None)
    with pytest.raises(ValueError, match=r"dim \(16 -> 8\)"):
        T.train(tiny_config(folder, tmp_path, steps=2, batch_size=4, dim=8, resume=str(tmp_path / "last.pt")))


def test_checkpoint_contents_and_atomic_writes(folder, tmp_path):
    r = T.train(tiny_config(folder, tmp_path, drip=(6, 12), steps=(2, 2), batch_size=4, checkpoint_every=1,
                            precision="fp16"), log_fn=lambda m: None)
    ck = load_checkpoint(r.checkpoint)
    for key in ("model", "head", "optimizer", "scaler", "rng", "stage", "step", "global_step", "backbone",
                "class_order", "log_offset"):
        assert key in ck, key
    assert set(ck["rng"]) >= {"torch", "numpy", "python", "head_sampling"}
    assert ck["scaler"]["scale"] > 0                     # fp16: a GradScaler ran
    assert sorted(os.listdir(tmp_path)) == ["final.pt", "last.pt", "log.jsonl", "stage1.pt", "stage2.pt"]  # no temp files
    assert load_checkpoint(tmp_path / "stage1.pt")["head_classes"] == 6
    assert load_checkpoint(tmp_path / "final.pt")["global_step"] == ck["global_step"] == 4


def test_atomic_write_keeps_the_old_file_until_the_new_one_is_whole(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"part")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask   # not mkstemp's 0600


def _open_files_under(folder):
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:     # the listing's own descriptor, closed by now
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_a_failed_setup_leaves_no_file_open(folder, tmp_path, monkeypatch):
    def broken(c, model):
        raise RuntimeError("no optimizer today")

    monkeypatch.setattr(T, "_make_optimizer", broken)
    with pytest.raises(RuntimeError, match="no optimizer today") as failure:
        T.train(tiny_config(folder, tmp_path, steps=1, batch_size=4, tensorboard=True), log_fn=lambda m: None)
    assert (tmp_path / "log.jsonl").exists() and (tmp_path / "tb").is_dir()   # both were open
    # while the caller holds the exception (a notebook keeps the last traceback), its frames live on
    assert failure.traceback and _open_files_under(tmp_path) == []


@hardware_only("host synchronisations are a GPU stream's (torch's sync-debug mode)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_steps_wait_for_the_gpu_only_to_read_the_loss(folder, tmp_path, precision):
    """A step's one synchronising call is the read of the previous step's loss (the next step's work
    is queued by then): no GradScaler inf check on the host, no control integers through the GPU,
    no host checks of the head's inputs after the first step. Two runs 6 steps apart differ by 6
    synchronising calls (set_sync_debug_mode("warn") turns each into a warning)."""
    def syncs(steps, out):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                T.train(tiny_config(folder, out, steps=steps, batch_size=4, device="cuda", precision=precision),
                        log_fn=lambda m: None)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchronizing CUDA operation" in str(w.message) for w in caught)

    short, long = syncs(3, tmp_path / "short"), syncs(9, tmp_path / "long")
    assert long - short == 6, (short, long)
    assert len(log_records(tmp_path / "long", "step")) == 9


def test_a_fresh_run_never_overwrites_another_run(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path, steps=1, batch_size=4), log_fn=lambda m: None)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(T.TrainSetupError, match="already holds a run"):
        T.train(tiny_config(folder, tmp_path, steps=1, batch_size=4), log_fn=lambda m: None)
    assert (tmp_path / "last.pt").read_bytes() == before


@pytest.mark.parametrize("loss", T.LOSSES)
def test_every_loss_trains(folder, tmp_path, loss):
    r = T.train(tiny_config(folder, tmp_path, loss=loss, steps=2, batch_size=4,
                            subcenters=2 if loss == "arcface" else 1, optimizer="sgd" if loss == "cosface" else "adam"),
                log_fn=lambda m: None)
    assert len(r.losses) == 2 and all(torch.isfinite(torch.tensor(r.losses)))


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_bf16_and_the_loss_goes_down(folder, tmp_path, monkeypatch, augment_on):
    """Both places of augmentation train; "device" augments each step's batch in one call."""
    calls = []
    real = A.RandomAugment.__call__

    def spy(self, images, **kw):
        calls.append(tuple(images.shape))
        return real(self, images, **kw)

    monkeypatch.setattr(A.RandomAugment, "__call__", spy)
    r = T.train(tiny_config(folder, tmp_path, steps=30, batch_size=12, precision="bf16", scale=16.0, margin=0.2,
                            augment_on=augment_on), log_fn=lambda m: None)
    assert all(torch.isfinite(torch.tensor(r.losses)))
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first, (first, last)
    # one batched call per step on the device (centre views: one image each); per sample in the loader else
    assert calls.count((12, 3, 32, 32)) == (30 if augment_on == "device" else 0)
    assert json.loads(open(tmp_path / "log.jsonl").readline())["config"]["augment_on"] == augment_on


def test_stop_ends_a_stage_early_and_folder_labels(tmp_path):
    write_photos(tmp_path / "imgs", 3, sub="a", size=40)
    write_photos(tmp_path / "imgs", 3, sub="b", size=40, start=3)
    write_photos(tmp_path / "imgs", 3, sub="c", size=40, start=6)
    r = T.train(T.TrainConfig(images=str(tmp_path / "imgs"), output=str(tmp_path / "run"), labels="folder",
                              drip=(2, "ALL"), steps=(50, 40), batch_size=4, stop_loss=1e9, stop_window=2, **TINY),
                log_fn=lambda m: None)
    assert [s["steps"] for s in r.stages] == [2, 2] and all(s["stopped_early"] for s in r.stages)
    assert [s["classes"] for s in r.stages] == [2, 3]


def test_validation_plot_and_log(folder, tmp_path):
    msgs = []
    r = T.train(tiny_config(folder, tmp_path / "run", steps=2, batch_size=4, val_dir=str(folder), val_max=5, plot=True),
                log_fn=msgs.append)
    v = r.val[0]
    assert v["images"] == 5 and 0 <= v["micro_ap"] <= 1 and 0 <= v["recall_at_p90"] <= 1
    assert os.path.getsize(tmp_path / "run" / "loss.png") > 1000
    events = [json.loads(line)["event"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert events == ["start", "stage_start", "step", "step", "val", "stage_end", "checkpoint"]
    step = log_records(tmp_path / "run", "step")[0]
    assert {"loss", "lr", "head_lr", "images_per_second", "stage", "classes"} <= set(step)
    assert any("validation: µAP" in m for m in msgs)


def test_corrupt_files_are_counted_or_refused(folder, tmp_path):
    import shutil
    shutil.copytree(folder, tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        r = T.train(tiny_config(tmp_path / "imgs", tmp_path / "run", steps=1, batch_size=4), log_fn=lambda m: None)
    assert r.skipped_files == 1
    start = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert start["skipped_files"] == 1 and start["images"] == 12
    from simcore.isc.data import CorruptImageError
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        T.train(tiny_config(tmp_path / "imgs", tmp_path / "run2", steps=1, strict=True), log_fn=lambda m: None)


def test_bad_settings_are_clear_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="asks for 20 classes but the images hold 12"):
        T.train(tiny_config(folder, tmp_path, drip=(4, 20)), log_fn=lambda m: None)
    with pytest.raises(ValueError, match="must grow"):
        T.train(tiny_config(folder, tmp_path, drip=(8, 4), steps=1), log_fn=lambda m: None)
    with pytest.raises(ValueError, match="steps has 2 values for 3 drip stages"):
        T.TrainConfig(images="x", output="y", drip="2,4,ALL", steps="1,2").normalised()
    with pytest.raises(ValueError, match="drip: 'abc' is not a whole number"):
        T.TrainConfig(images="x", output="y", drip="5,abc").normalised()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(k, raising=False)
        with pytest.raises(T.TrainSetupError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set: "
                                                    "start the ranks with torchrun"):
            T.train(tiny_config(folder, tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    from simcore.isc.data import NoImagesError
    with pytest.raises(NoImagesError, match="no images"):
        T.train(tiny_config(empty, tmp_path / "run"))


def test_timm_backbones_by_name(monkeypatch):
    """With timm importable, a timm model's feature map -> GeM -> linear (a stand-in timm module here:
    timm cannot be installed beside this torch); without it, an error that names the fix."""
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(BackboneError, match="pip install timm"):
        build_backbone({"name": "resnet18", "dim": 8, "image_size": 32})

    class Body(torch.nn.Module):
        num_features = 12
        pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 12, 3, 2, 1)

        def forward_features(self, x):
            return torch.relu(self.conv(x))

    def create_model(name, pretrained=False, num_classes=None, global_pool=None):
        if name != "fake_net":
            raise RuntimeError(f"Unknown model ({name})")
        assert num_classes == 0 and global_pool == ""
        return Body()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    m = build_backbone({"name": "fake_net", "dim": 8, "image_size": 32})
    assert isinstance(m, TimmBackbone) and m(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        build_backbone({"name": "nope", "dim": 8, "image_size": 32})
