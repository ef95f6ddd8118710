"""simcore.isc.training.checkpoints: a failed checkpoint write is one CheckpointWriteError line, leaves the
previous checkpoint bit-identical and no temporary file, and log.jsonl never names a checkpoint that does not
exist; a resume rewrites the checkpoint's own log line; a finished run is not resumed."""
import errno
import os

import pytest
import torch
from train_helpers import log_records, photo_folder, tiny_config

from simcore.isc import train as T
from simcore.isc.embed import load_checkpoint
from simcore.isc.training import checkpoints as C



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory, 8)


def test_a_failed_checkpoint_write(folder, tmp_path, monkeypatch):
    """The disk fills at the second checkpoint (global step 2): one line naming the file and the last whole
    checkpoint; last.pt is the first checkpoint's, bit for bit; the log ends before the failed one."""
    real, calls = C.torch.save, []

    def filling(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as out:
                out.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(C.torch, "save", filling)
    with pytest.raises(C.CheckpointWriteError) as e:
        T.train(tiny_config(folder, tmp_path, steps=4, batch_size=4, checkpoint_every=1), log_fn=lambda m: None)
    last = str(tmp_path / "last.pt")
    assert str(e.value) == f"{last}: cannot write the checkpoint (No space left on device); the last whole " \
                           f"checkpoint is {last}"
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "log.jsonl"]          # no temporary file
    assert load_checkpoint(last)["global_step"] == 1
    log = log_records(tmp_path)
    assert [r["global_step"] for r in log if r["event"] == "checkpoint"] == [1]
    assert log[-1]["event"] == "step" and log[-1]["global_step"] == 2


def test_the_resume_writes_the_checkpoints_line_again(folder, tmp_path, monkeypatch):
    """A run killed between writing last.pt and logging it: the resume's log is whole all the same."""
    kw = dict(drip=(4, "ALL"), steps=(2, 2), batch_size=4, checkpoint_every=1)
    T.train(tiny_config(folder, tmp_path / "a", **kw), log_fn=lambda m: None)
    monkeypatch.setenv(T.FAIL_AFTER_STEP_ENV, "3")
    with pytest.raises(T.SimulatedFailure):
        T.train(tiny_config(folder, tmp_path / "b", **kw), log_fn=lambda m: None)
    monkeypatch.delenv(T.FAIL_AFTER_STEP_ENV)
    log_b = tmp_path / "b" / "log.jsonl"
    lines = log_b.read_text().splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines) if '"checkpoint"' in line)
    log_b.write_text("".join(lines[:cut]))                         # as if the process died before the line
    T.train(tiny_config(folder, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), **kw), log_fn=lambda m: None)
    def steady(run_dir):   # the log without its timings
        return [{k: v for k, v in r.items() if k not in ("images_per_second", "centre_seconds", "config")}
                for r in log_records(run_dir)]
    a, b = steady(tmp_path / "a"), steady(tmp_path / "b")
    assert [r["event"] for r in b].count("checkpoint") == 4 and a == b


def test_a_finished_run_is_not_resumed(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path, drip=(4, "ALL"), steps=1, batch_size=4), log_fn=lambda m: None)
    for name in ("final.pt", "last.pt"):
        with pytest.raises(T.TrainSetupError, match=r"the run has finished \(all 2 stage\(s\), 2 steps\): nothing "
                                                    "to resume"):
            T.train(tiny_config(folder, tmp_path, drip=(4, "ALL"), steps=1, batch_size=4, resume=str(tmp_path / name)),
                    log_fn=lambda m: None)


def test_resume_into_another_folder_is_refused(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path / "a", steps=1, batch_size=4), log_fn=lambda m: None)
    with pytest.raises(T.TrainSetupError, match="resume with -o"):
        T.train(tiny_config(folder, tmp_path / "b", steps=1, batch_size=4, resume=str(tmp_path / "a" / "stage1.pt")))
    assert not (tmp_path / "b").exists()


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(3)
    states = C.rng_states(g, "cpu")
    a = (torch.rand(3), torch.rand(2, generator=g))
    C.set_rng_states(states, g)
    b = (torch.rand(3), torch.rand(2, generator=g))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
