"""simcore.isc.training.sinks: a step's record is written one step late (its loss read once the next
step is queued) or at settle(); the log is cut back and its checkpoint line restored on a resume; a
non-lead sink writes nothing; loss.png is written whole or not at all."""
import json
import os

import pytest

from simcore.isc.training import sinks as S


class Loss:
    """A loss 'on the device': counts the reads (float()) that would wait for the device."""
    reads = 0

    def __init__(self, v):
        self.v = v

    def __float__(self):
        Loss.reads += 1
        return self.v


def record(step, loss):
    return dict(stage=0, step=step, global_step=step, loss=loss, lr=0.1, head_lr=0.1, images_per_second=1.0,
                classes=4, batch=2, dropped=0)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_step_is_read_one_step_late(tmp_path):
    sink = S.MetricsSink(S.RunLog(str(tmp_path / "log.jsonl")))
    Loss.reads = 0
    sink.step(record(1, Loss(3.0)))
    assert Loss.reads == 0 and lines(tmp_path / "log.jsonl") == []       # step 1 is still queued
    sink.step(record(2, Loss(2.0)))
    assert Loss.reads == 1 and [r["loss"] for r in lines(tmp_path / "log.jsonl")] == [3.0]
    sink.step(record(3, None))                                           # a step every rank skipped
    sink.settle()
    sink.settle()                                                        # nothing pending: a no-op
    assert Loss.reads == 2 and sink.losses[:2] == [3.0, 2.0] and str(sink.losses[2]) == "nan"
    assert sink.mean_recent_loss(1) == 2.0 and sink.mean_recent_loss(2) == 2.5   # the last finite ones
    sink.close()
    assert [r["global_step"] for r in lines(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_a_resume_cuts_the_log_and_restores_the_checkpoint_line(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = S.RunLog(path)
    log.write(event="start")
    line = S.RunLog.line({"event": "checkpoint", "global_step": 1})
    offset = log.offset_after(line)
    log.write_line(line)
    log.write(event="step", global_step=2)                                # after the checkpoint: cut
    log.close()
    S.RunLog(path, truncate_to=offset, last_line=line).close()
    assert [r["event"] for r in lines(path)] == ["start", "checkpoint"] and os.path.getsize(path) == offset
    with open(path, "r+b") as f:                                         # the line never reached the log
        f.truncate(offset - len(line))
    S.RunLog(path, truncate_to=offset, last_line=line).close()
    assert [r["event"] for r in lines(path)] == ["start", "checkpoint"] and os.path.getsize(path) == offset
    S.RunLog(path).close()                                               # a fresh run starts a fresh log
    assert lines(path) == []


def test_other_ranks_write_nothing(tmp_path):
    class C:
        output, tensorboard = str(tmp_path), True
    sink = S.MetricsSink.open(C, lead=False, num_stages=1)
    sink.event(event="start")
    sink.step(record(1, Loss(1.0)))
    sink.settle()
    sink.close()
    assert os.listdir(tmp_path) == [] and sink.losses == [1.0]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    got = []

    class Writer:
        def add_scalar(self, tag, value, step):
            got.append((tag, value, step))

        def close(self):
            got.append("closed")
    sink = S.MetricsSink(tensorboard=Writer())
    sink.step(record(5, Loss(0.5)))
    sink.settle()
    sink.scalars("val", {"micro_ap": 0.25, "images": 3}, ("micro_ap",), 5)
    sink.close()
    assert ("train/loss", 0.5, 5) in got and ("val/micro_ap", 0.25, 5) in got and got[-1] == "closed"


def test_the_plot_is_whole_or_absent(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    log = S.RunLog(str(tmp_path / "log.jsonl"))
    log.write(event="stage_start", global_step=0, classes=4)
    for k in range(1, 6):
        log.write(event="step", global_step=k, loss=5.0 / k)
    log.close()
    png = tmp_path / "loss.png"
    png.write_bytes(b"old plot")
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        S.plot_losses(str(tmp_path / "log.jsonl"), str(png))
    assert png.read_bytes() == b"old plot" and sorted(os.listdir(tmp_path)) == ["log.jsonl", "loss.png"]
    monkeypatch.undo()
    assert S.plot_losses(str(tmp_path / "log.jsonl"), str(png)) is None
    assert png.read_bytes()[:4] == b"\x89PNG"
