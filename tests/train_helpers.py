"""What the training tests share: the tiny model, a folder of photos, a config, the run's log."""
import json
import os

from test_data import write_photos

from simcore.isc import train as T

# Small enough to train in a test: two stages of 8 and 16 channels at 32 px, one view per image.
TINY = dict(widths=(8, 16), dim=16, image_size=32, sample_rate=1.0, progress=False, lr=3e-3, views=1)


def photo_folder(tmp_path_factory, count):
    """A new folder of ``count`` generated 40 px photos (test_data.write_photos)."""
    root = tmp_path_factory.mktemp("imgs")
    write_photos(root, count, size=40)
    return root


def tiny_config(folder, out, run=None, **overrides):
    """TrainConfig of TINY, then ``run`` (a module's run settings), then ``overrides``."""
    return T.TrainConfig(images=str(folder), output=str(out), **{**TINY, **(run or {}), **overrides})


def log_records(run_dir, event=None):
    """The records of ``run_dir``/log.jsonl; those of one ``event`` when it is given."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if event is None or r["event"] == event]


def step_losses(run_dir):
    return [r["loss"] for r in log_records(run_dir, "step")]
