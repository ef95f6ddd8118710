"""Where a run's figures go: ``RUN_DIR/log.jsonl``, TensorBoard events in ``RUN_DIR/tb``, the tqdm
bar, and ``RUN_DIR/loss.png`` (``--plot``).

``MetricsSink.step`` takes a step's record with its loss still a device tensor and writes the
*previous* step's record: by then the next step's work is queued, so reading the loss waits only
for work the device has done (on a GPU the host never idles between steps). ``settle()`` writes
the pending record at once, for anything that needs every loss so far (the stop rule, a
checkpoint, a stage end). Only rank 0 writes; other ranks get a sink that keeps the losses alone.
"""
from __future__ import annotations

import json
import math
import os
import sys

from simcore.isc.files import atomic_write

__all__ = ["RunLog", "MetricsSink", "plot_losses", "TENSORBOARD_MISSING"]

#: The note for ``tensorboard=True`` without the tensorboard package.
TENSORBOARD_MISSING = "--tensorboard: the tensorboard package is not installed (pip install tensorboard): " \
                      "no TensorBoard events, training goes on"

#: A step record's TensorBoard scalars, and a validation's.
_STEP_SCALARS = ("loss", "lr", "head_lr", "images_per_second", "classes")


class RunLog:
    """RUN_DIR/log.jsonl, one JSON object a line. A resume cuts it back to its length at the
    checkpoint (``truncate_to``) and writes that checkpoint's own line again (``last_line``), so the
    log is whole even when the process died between writing a checkpoint and logging it."""

    def __init__(self, path, truncate_to=None, last_line=None):
        self.path = path
        if truncate_to is None:
            if os.path.exists(path):
                os.unlink(path)
        elif os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(truncate_to - (len(last_line.encode()) if last_line else 0))
        self.f = open(path, "a", encoding="utf-8")
        if truncate_to is not None and last_line:
            self.write_line(last_line)

    @staticmethod
    def line(record) -> str:
        return json.dumps(record) + "\n"

    def write(self, **record):
        self.write_line(self.line(record))

    def write_line(self, line):
        self.f.write(line)
        self.f.flush()

    def offset_after(self, line) -> int:
        """The log's length once ``line`` is written (the checkpoint stores it before the line is)."""
        self.f.flush()
        return self.f.tell() + len(line.encode())

    def close(self):
        self.f.close()


class MetricsSink:
    """The run's figures. ``losses``: every settled loss of this process; ``stage_losses``: this
    stage's (the trainer resets it at a stage start and restores it on a resume)."""

    def __init__(self, log=None, tensorboard=None, bar=None, num_stages=1):
        self.log, self.tb, self.bar, self.num_stages = log, tensorboard, bar, num_stages
        self.losses, self.stage_losses, self.pending = [], [], None

    @classmethod
    def open(cls, c, lead, *, num_stages, resume=None, say=print):
        """Rank 0's sink on ``c.output`` (log.jsonl; TensorBoard with ``c.tensorboard``; the bar with
        ``c.progress``); ``resume``: (global step, log offset, the checkpoint's log line) of a resume."""
        if not lead:
            return cls(num_stages=num_stages)
        step, offset, line = resume if resume is not None else (0, None, None)
        sink = cls(RunLog(os.path.join(c.output, "log.jsonl"), truncate_to=offset, last_line=line),
                   num_stages=num_stages)
        try:
            if c.tensorboard:
                sink.tb, note = tensorboard_writer(os.path.join(c.output, "tb"), step + 1 if resume else None)
                if note:
                    say(note)
                    sink.event(event="note", message=note)
        except BaseException:
            sink.close()
            raise
        return sink

    def start_bar(self, total, initial):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def event(self, **record):
        if self.log is not None:
            self.log.write(**record)

    def step(self, record):
        """Write the previous step's record, then hold this one (its ``loss`` a tensor, or None for a
        step that every rank skipped)."""
        self.settle()
        self.pending = record
        if self.bar is not None:
            self.bar.update(1)

    def settle(self):
        """Read the pending step's loss (the global batch's mean: the same on every rank) and write its record."""
        if self.pending is None:
            return
        record, self.pending = self.pending, None
        record["loss"] = value = float("nan") if record["loss"] is None else float(record["loss"])
        self.stage_losses.append(value)
        self.losses.append(value)
        self.event(event="step", **record)
        if self.tb is not None:
            for key in _STEP_SCALARS:
                self.tb.add_scalar(f"train/{key}", record[key], record["global_step"])
        if self.bar is not None:
            self.bar.set_postfix(stage=f"{record['stage'] + 1}/{self.num_stages}", loss=f"{value:.3f}",
                                 refresh=False, img_s=f"{record['images_per_second']:.0f}")

    def mean_recent_loss(self, window):
        """The mean of this stage's last ``window`` finite losses (0 when there is none)."""
        finite = [v for v in self.stage_losses if math.isfinite(v)][-window:]
        return sum(finite) / max(1, len(finite))

    def scalars(self, prefix, values, keys, global_step):
        if self.tb is not None:
            for key in keys:
                self.tb.add_scalar(f"{prefix}/{key}", values[key], global_step)

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        """Close the bar, the TensorBoard writer and the log (each even when another fails)."""
        try:
            if self.bar is not None:
                self.bar.close()
        finally:
            try:
                if self.tb is not None:
                    self.tb.close()
            finally:
                if self.log is not None:
                    self.log.close()


def tensorboard_writer(folder, purge_step):
    """(SummaryWriter on ``folder``, None), or (None, the note) when tensorboard cannot be imported.
    ``purge_step``: a resume hides the events of the interrupted run from that step on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None, TENSORBOARD_MISSING
    return SummaryWriter(folder, purge_step=purge_step), None


def plot_losses(log_path, out_path):
    """The loss curve of ``log_path`` to the PNG ``out_path`` (atomically); None, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    steps, losses, starts = [], [], []
    with open(log_path, encoding="utf-8") as f:
        for r in map(json.loads, f):
            if r.get("event") == "step":
                steps.append(r["global_step"])
                losses.append(r["loss"])
            elif r.get("event") == "stage_start":
                starts.append((r["global_step"], r["classes"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1)
    for s, n in starts:
        ax.axvline(s, color="grey", ls="--", lw=0.8)
        ax.text(s, ax.get_ylim()[1], f" {n} classes", va="top", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("simcore train")
    fig.tight_layout()
    try:
        with atomic_write(out_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return None
