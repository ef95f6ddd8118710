"""simcore.isc.training.config: TrainConfig's whole validation (one line naming the flag and its range,
exit 2 from the command line before any image is read or model built) and StagePlan's checks of the
settings against the data (one class, a batch larger than the stage, ranks)."""
import math
import warnings

import pytest
import torch
from test_cli import run_inproc  # noqa: F401  (the fixture: simcore.isc.cli.main in-process)
from test_data import write_photos

from simcore.isc import data as Dt
from simcore.isc.training.config import StagePlan, TrainConfig, TrainSetupError, TrainWarning, resolve_device

# (field, bad value, the flag and the range the message must name)
BAD_VALUES = [
    ("scale", 0.0, "--scale must be a finite number > 0"), ("scale", math.inf, "--scale must be a finite number > 0"),
    ("lr", math.nan, "--lr must be a finite number >= 0"), ("lr", -1e-3, "--lr must be a finite number >= 0"),
    ("head_lr", math.inf, "--head-lr must be a finite number >= 0"),
    ("margin", 10.0, "--margin must be a number in [0, 1.571] for arcface"),
    ("margin", -0.1, "--margin must be a number in [0, 1.571] for arcface"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N"),
    ("val_max", 0, "--val-max must be a whole number >= 1"),
    ("batch_size", 0, "--batch-size must be whole numbers >= 1"),
    ("batch_size", "4,x", "--batch-size: 'x' is not a whole number"),
    ("batch_size", 2.5, "--batch-size: 2.5 is not a whole number"),
    ("workers", -1, "--workers must be a whole number in [0, 1024]"),
    ("steps", "0", "--steps must be whole numbers >= 1"),
    ("sample_rate", 2.0, "--sample-rate must be a number in (0, 1]"),
    ("momentum", 1.0, "--momentum must be a number in [0, 1)"),
    ("weight_decay", -1.0, "--weight-decay must be a finite number >= 0"),
    ("stop_loss", math.nan, "--stop must be a finite number"),
    ("stop_window", 0, "--stop-window must be a whole number >= 1"),
    ("threads", 0, "--threads must be a whole number >= 1"),
    ("image_size", 8, "--image-size must be a whole number in [16, 8192]"),
    ("dim", 0, "--dim must be a whole number in [1, 65536]"),
    ("subcenters", 300, "--subcenters must be a whole number in [1, 255]"),
    ("seed", -1, "--seed must be a whole number in [0, 9223372036854775807]"),
    ("views", -1, "--views must be a whole number in [0, 1024]"),
    ("warmup", -5, "--warmup must be a whole number >= 0"),
    ("checkpoint_every", -1, "--checkpoint-every must be a whole number >= 0"),
    ("precision", "fp8", "--precision must be one of fp32, bf16, fp16"),
    ("loss", "softmax", "--loss must be one of arcface"),
    ("optimizer", "lamb", "--optimizer must be one of adam, sgd"),
    ("labels", "file", "--labels must be one of image, folder"),
    ("augment_on", "gpu", "--augment-on must be one of workers, device"),
    ("drip", "5,abc", "--drip: 'abc' is not a whole number"),
    ("drip", "", "--drip needs at least one stage"),
    ("widths", "8,0", "--widths must be whole numbers >= 1"),
    ("grad_accum", 0, "--grad-accum must be a whole number in [1, 65536]"),
    ("grad_accum", "1.5", "--grad-accum must be a whole number in [1, 65536]"),
    ("grad_accum", 2.0, "--grad-accum must be a whole number in [1, 65536]"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_the_flag(name, value, message):
    with pytest.raises(TrainSetupError) as e:
        TrainConfig(images="x", output="y", **{name: value}).normalised()
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert f"got {value!r}" in str(e.value) or "whole number" in str(e.value) or name == "drip"


def test_margins_follow_the_loss():
    TrainConfig(images="x", output="y", loss="cosface", margin=0.35).normalised()
    with pytest.raises(TrainSetupError, match=r"--margin must be a number in \[0, 1\] for cosface"):
        TrainConfig(images="x", output="y", loss="cosface", margin=1.5).normalised()
    with pytest.raises(TrainSetupError, match="--margin: magface has no margin to set"):
        TrainConfig(images="x", output="y", loss="magface", margin=0.3).normalised()


def test_good_values_pass_and_per_stage_lists_are_filled():
    c = TrainConfig(images="x", output="y", drip="4,ALL", batch_size=8, steps="3,5", device="cuda:1",
                    scale=64.0, margin=0.5, lr=0.0).normalised()
    assert c.drip == [4, "ALL"] and c.batch_size == [8, 8] and c.steps == [3, 5]
    assert c.as_record()["widths"] == [32, 64, 128, 256]


def test_the_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "file").write_text("x")
    ok = dict(images=str(tmp_path / "imgs"), output=str(tmp_path / "run"))
    TrainConfig(**ok).check_files()
    with pytest.raises(Dt.NoImagesError, match="no such folder or file"):
        TrainConfig(images=str(tmp_path / "nope"), output="run").check_files()
    with pytest.raises(TrainSetupError, match="exists and is not a folder"):
        TrainConfig(**dict(ok, output=str(tmp_path / "file"))).check_files()
    with pytest.raises(TrainSetupError, match="--val-dir .*: no such folder"):
        TrainConfig(**ok, val_dir=str(tmp_path / "nope")).check_files()
    with pytest.raises(TrainSetupError, match="--resume .*: no such checkpoint file"):
        TrainConfig(**ok, resume=str(tmp_path / "run" / "last.pt")).check_files()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "last.pt").write_bytes(b"")
    with pytest.raises(TrainSetupError, match=r"is a checkpoint of the run in .*a, not of -o .*run .*resume with -o"):
        TrainConfig(**ok, resume=str(tmp_path / "a" / "last.pt")).check_files()


def test_a_cuda_device_torch_does_not_see():
    if torch.cuda.is_available():
        with pytest.raises(TrainSetupError, match="torch sees"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(TrainSetupError, match="--device cuda: torch sees no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def _plan(item_labels, num_classes, world=1, **kw):
    return StagePlan.build(TrainConfig(images="x", output="y", **kw).normalised(), item_labels, num_classes, world)


def test_the_plan_against_the_data():
    with pytest.raises(TrainSetupError, match=r"one class is 0 .* at least 2 classes, got 1 \(--labels folder: "
                                              r"the images hold 1 class"):
        _plan([0, 0, 0, 0], 1, labels="folder")
    with pytest.raises(TrainSetupError, match="at least 2 classes, got 1"):
        _plan(list(range(6)), 6, drip="1,ALL")
    with pytest.raises(TrainSetupError, match="2 ranks shard .* at least 2 classes, got 1"):
        _plan(list(range(6)), 6, world=2, drip="1,ALL")
    with pytest.raises(TrainSetupError, match="asks for 7 classes but the images hold 6"):
        _plan(list(range(6)), 6, drip="3,7")
    with pytest.warns(TrainWarning, match="--batch-size 100: stage 1 has 24 images, so its batches hold 24"):
        p = _plan(list(range(24)), 24, batch_size=100)
    assert p.batch_sizes == [24]
    with pytest.warns(TrainWarning, match="--batch-size 8 x --grad-accum 4: stage 1 has 24 images, so its batches "
                                          "hold 24"):
        p = _plan(list(range(24)), 24, batch_size=8, grad_accum=4)
    assert p.batch_sizes == [24]
    assert _plan(list(range(24)), 24, batch_size=4, grad_accum="3").batch_sizes == [12]   # a step: 3 micro-batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = _plan(list(range(24)), 24, drip="6,ALL", batch_size="4,8")
    assert p.counts == [6, 24] and p.batch_sizes == [4, 8] and p.stage_images(0) == 6
    assert sorted(p.class_order.tolist()) == list(range(24))
    assert torch.equal(p.labels[p.class_order], torch.arange(24))   # head class k is the data's class order[k]
    assert p.stage_items(0).tolist() == torch.nonzero(p.labels < 6).squeeze(1).tolist()


@pytest.mark.parametrize("flags,message", [
    (["--scale", "0"], "--scale must be a finite number > 0"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--margin", "10"], "--margin must be a number in [0, 1.571]"), (["--device", "tpu"], "--device must be"),
    (["--val-max", "0"], "--val-max must be a whole number >= 1"), (["--workers", "-2"], "--workers must be"),
    (["--batch-size", "0"], "--batch-size must be whole numbers >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be a whole number in [1, 65536], got 0"),
    (["--grad-accum", "two"], "--grad-accum must be a whole number in [1, 65536], got 'two'"),
])
def test_the_command_refuses_before_reading_an_image(tmp_path, run_inproc, monkeypatch, flags, message):  # noqa: F811
    write_photos(tmp_path / "imgs", 3, size=32)

    def no_reading(*a, **k):
        raise AssertionError("an image was read before the settings were checked")
    monkeypatch.setattr(Dt, "load_image_set", no_reading)
    monkeypatch.setattr(Dt, "scan_images", no_reading)
    r = run_inproc("train", tmp_path / "imgs", "-o", tmp_path / "run", *flags, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"simcore train: error: {message}"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
