"""simcore.isc.training.validators: the copy-detection validator's figures, and a validator of another
kind plugged into train() (called at each stage end on the plain model, logged, its scalars sent on)."""
import json

import torch
from test_data import write_photos

from simcore.isc import augment as A
from simcore.isc import train as T
from simcore.isc.training.validators import CopyDetectionValidator, Validator

TINY = dict(widths=(8, 16), dim=16, image_size=32, sample_rate=1.0, progress=False, lr=3e-3, views=1)


class Pixels(torch.nn.Module):
    """A 'backbone' that returns the image's pixels: copies lightly edited stay nearest their original."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)


def test_copy_detection_figures(tmp_path):
    write_photos(tmp_path / "val", 6, size=40)
    c = T.TrainConfig(images="", output="", val_dir=str(tmp_path / "val"), val_max=5, image_size=32).normalised()
    mild = A.RandomAugment(["color_jitter"], num_ops=(1, 1), intensity=(0.05, 0.1))
    v = CopyDetectionValidator.from_config(c, mild)
    model = Pixels().train()
    r = v.validate(model, batch_size=4, device="cpu", precision="fp32")
    assert model.training                                    # left in the mode it was in
    assert r["images"] == 5 and r["micro_ap"] > 0.9 and r["recall_at_rank1"] == 1.0, r
    assert v.describe(r).startswith("µAP ")


class Counting(Validator):
    name, scalars = "verification", ("accuracy",)

    def __init__(self):
        self.calls = []

    def validate(self, model, *, batch_size, device, precision):
        self.calls.append((type(model).__name__, model.training, device, precision))
        return {"accuracy": 0.5 + 0.1 * len(self.calls)}

    def describe(self, result):
        return f"accuracy {result['accuracy']:.2f}"


def test_another_validator_plugs_in(tmp_path):
    write_photos(tmp_path / "imgs", 8, size=40)
    msgs, v = [], Counting()
    r = T.train(T.TrainConfig(images=str(tmp_path / "imgs"), output=str(tmp_path / "run"), drip="4,ALL", steps=1,
                              batch_size=4, **TINY), log_fn=msgs.append, validators=[v])
    assert [call[2:] for call in v.calls] == [("cpu", "fp32")] * 2
    assert [s["verification"]["accuracy"] for s in r.stages] == [0.6, 0.7]
    assert r.val == [{"accuracy": 0.6, "stage": 0}, {"accuracy": 0.7, "stage": 1}]
    logged = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["accuracy"] for e in logged if e["event"] == "verification"] == [0.6, 0.7]
    assert "stage 2 validation: accuracy 0.70" in msgs
