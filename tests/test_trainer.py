"""simcore.isc.train.Trainer: the loop as setup() / run_stage() / step(), and Ctrl-C (one line naming the
checkpoint to resume from, exit 130, no traceback); the command's warnings of class 4 (a batch larger than
the stage, one class)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import subprocess_env
from test_cli import run_inproc  # noqa: F401  (the fixture: simcore.isc.cli.main in-process)
from test_data import write_photos
from train_helpers import TINY, photo_folder

from simcore.isc import train as T



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 8)


def test_the_loop_by_hand(folder, tmp_path):
    """setup() builds the run; run_stage() grows the head and runs the stage; step() is one optimisation
    step whose loss stays a tensor until the sink reads it."""
    c = T.TrainConfig(images=str(folder), output=str(tmp_path), drip=(4, "ALL"), steps=(2, 3), batch_size=4,
                      **TINY).normalised()
    t = T.Trainer(c, log_fn=lambda m: None)
    t.setup()
    assert t.head is None and t.plan.counts == [4, 8] and (t.stage, t.stage_step, t.global_step) == (0, 0, 0)
    t.run_stage()
    assert t.head.num_classes == 4 and (t.stage, t.stage_step, t.global_step) == (1, 0, 2)
    assert t.checkpoints.saved == (str(tmp_path / "last.pt"), 1, 0, 2) and (tmp_path / "stage1.pt").exists()
    t._start_stage()
    t.switch.inner = [[(i, 0) for i in range(4)]]
    x, y, _, ok = next(iter(t.loader))
    ok[1] = False                                          # an undecodable sample is dropped from the batch
    loss, rows, dropped = t.step(x, y, ok)
    # the step's mean loss: a detached device tensor (its graph freed by the backward passes), not yet read
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad and (rows, dropped) == (3, 1)
    assert t.result.dropped_samples == 1 and t.head.num_classes == 8
    t.sink.close()


def test_ctrl_c_in_process_names_the_last_checkpoint(folder, tmp_path, monkeypatch):
    real, calls = T.Trainer.step, []

    def interrupted_at_4(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a)
    monkeypatch.setattr(T.Trainer, "step", interrupted_at_4)
    with pytest.raises(T.TrainInterrupted) as e:
        T.train(T.TrainConfig(images=str(folder), output=str(tmp_path), steps=6, batch_size=4, checkpoint_every=2,
                              **TINY), log_fn=lambda m: None)
    last = tmp_path / "last.pt"
    assert str(e.value) == (f"interrupted at step 3; the last checkpoint is {last} (global step 2): continue with "
                            f"`simcore train ... -o {tmp_path} --resume {last}` and the same settings")
    assert isinstance(e.value, KeyboardInterrupt)
    steps = [r["global_step"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if r["event"] == "step"]
    assert steps == [1, 2, 3]                              # the interrupted step's predecessors all logged
    monkeypatch.undo()
    with pytest.raises(T.TrainInterrupted, match="before the first checkpoint: nothing to resume"):
        monkeypatch.setattr(T.Trainer, "step", lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        T.train(T.TrainConfig(images=str(folder), output=str(tmp_path / "b"), steps=6, batch_size=4, **TINY),
                log_fn=lambda m: None)


def test_ctrl_c_on_the_command(folder, tmp_path):
    """SIGINT to the running command once it has written a checkpoint: exit 130, one line, no traceback."""
    cmd = [sys.executable, "-m", "simcore.isc.cli", "train", str(folder), "-o", str(tmp_path / "run"), "--dim", "16",
           "--image-size", "32", "--batch-size", "4", "--steps", "100000", "--checkpoint-every", "1", "--views", "1",
           "--no-progress", "--threads", "1"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    log, deadline = tmp_path / "run" / "log.jsonl", time.monotonic() + 240
    try:
        while not (log.exists() and '"checkpoint"' in log.read_text()):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    lines = [line for line in err.splitlines() if not line.startswith("[simcore train]")]
    assert p.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("simcore train: interrupted at step "), err
    assert f"--resume {tmp_path / 'run' / 'last.pt'}" in lines[0] and os.path.exists(tmp_path / "run" / "last.pt")


def test_the_command_warns_of_a_batch_larger_than_the_images(folder, tmp_path, run_inproc):  # noqa: F811
    with warnings.catch_warnings(record=True) as caught:   # printed by the command, or recorded here
        warnings.simplefilter("always")
        r = run_inproc("train", folder, "-o", tmp_path / "run", "--batch-size", "100", "--steps", "1", "--dim", "16",
                       "--image-size", "32", "--views", "1", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = r.stderr + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    assert re.search(r"warning: --batch-size 100: stage 1 has 8 images, so its batches hold 8$", said, re.I | re.M)
    assert "batch 8, up to 1 steps" in r.stderr


def test_the_command_refuses_one_class(tmp_path, run_inproc):  # noqa: F811
    write_photos(tmp_path / "imgs", 4, sub="only", size=40)
    r = run_inproc("train", tmp_path / "imgs", "-o", tmp_path / "run", "--labels", "folder", "--no-progress",
                   cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "at least 2 classes, got 1 (--labels folder: the images hold 1 class(es))" in r.stderr
