"""Checkpoints of a training run: writing them whole, reading them back, resharding the head, and
refusing a resume that cannot continue the run bit for bit.

Files (``RUN_DIR``): ``last.pt`` (every ``checkpoint_every`` steps and at each stage end),
``stage<k>.pt`` (a copy at the end of stage k), ``final.pt`` (once every stage has run) and, with
several ranks, one head shard per rank ``head-stage<s>-step<k>.rank<r>-of-<R>.pt`` that ``last.pt``
names. Every file goes through ``simcore.isc.files.atomic_write``: a failed write is one
``CheckpointWriteError`` line and leaves the previous file whole. ``log.jsonl`` records a
checkpoint only once its file exists.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

import simcore
from simcore.isc.embed import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from simcore.isc.files import atomic_write
from simcore.isc.training.config import TrainSetupError, jsonable
from simcore.isc.training.sinks import RunLog

__all__ = ["CheckpointManager", "CheckpointWriteError", "SHARD_FORMAT", "RESUME_FIELDS", "rng_states",
           "set_rng_states", "atomic_save", "atomic_copy"]

#: A head shard file of a checkpoint written by several ranks.
SHARD_FORMAT = "simcore.isc.train.head-shard/1"
_SHARD_NAME = re.compile(r"^head-stage(\d+)-step(\d+)\.rank(\d+)-of-(\d+)\.pt$")

#: Config fields that must match to resume a run (the others - workers, progress, checkpoint
#: frequency, plot, device - may change between the interrupted run and its resumption).
RESUME_FIELDS = ("backbone", "dim", "image_size", "labels", "drip", "batch_size", "steps", "stop_loss",
                 "stop_window", "precision", "loss", "margin", "scale", "sample_rate", "subcenters", "lr",
                 "head_lr", "optimizer", "momentum", "weight_decay", "warmup", "views", "seed", "widths", "depth",
                 "augment_on", "grad_accum")
# What a checkpoint written before a field existed ran with.
_RESUME_DEFAULTS = {"augment_on": "workers", "grad_accum": 1}


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (the disk is full, the folder went away, ...)."""


def atomic_save(obj, path):
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src, dst):
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def rng_states(head_gen, device):
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "head_sampling": head_gen.get_state()}
    if str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, head_gen):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    head_gen.set_state(states["head_sampling"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _reason(e):
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class CheckpointManager:
    """Writes and reads one run's checkpoints. ``dd``: the ``Dist`` of a several-rank run (None:
    one process). ``saved``: (path, stage, step, global step) of the newest checkpoint that
    exists: the one written last, or the one the run resumed from."""

    def __init__(self, output, dd=None):
        self.output, self.dd = output, dd
        self.rank, self.world = (dd.rank, dd.world) if dd is not None else (0, 1)
        self.last = os.path.join(output, "last.pt")
        self.saved = None

    # ------------------------------------------------------------------ resume
    def load_for_resume(self, c, num_images, num_classes, num_stages):
        """The checkpoint ``c.resume``, refused (TrainSetupError) when it cannot continue this run:
        other settings, other data, or a run that has already finished."""
        ckpt = load_checkpoint(c.resume)
        old = ckpt["config"]
        diff = [f"{k} ({old.get(k, _RESUME_DEFAULTS.get(k))!r} -> {getattr(c, k)!r})" for k in RESUME_FIELDS
                if jsonable(old.get(k, _RESUME_DEFAULTS.get(k))) != jsonable(getattr(c, k))]
        if diff:
            raise TrainSetupError(f"{c.resume}: the run was made with other settings: {', '.join(diff)}")
        if ckpt["num_images"] != num_images or ckpt["num_classes"] != num_classes:
            raise TrainSetupError(f"{c.resume}: the run had {ckpt['num_images']} images in {ckpt['num_classes']} "
                                  f"classes, {c.images} now holds {num_images} in {num_classes}")
        if ckpt["stage"] >= num_stages:
            raise TrainSetupError(f"--resume {c.resume}: the run has finished (all {num_stages} stage(s), "
                                  f"{ckpt['global_step']} steps): nothing to resume; embed its final.pt, or train "
                                  "a new run into another folder")
        self.saved = (c.resume, ckpt["stage"], ckpt["step"], ckpt["global_step"])
        return ckpt

    def load_head(self, head, ckpt, path):
        """Load a checkpoint's head into ``head`` (single-process or sharded, at any world size);
        returns the RNG states this rank should continue with (None: reseed the class sampling)."""
        shards = ckpt.get("head_shards")
        saved_world = int(ckpt.get("world_size", 1))
        if not shards:
            if self.world > 1:
                simcore.load_resharded(head, [ckpt["head"]])
            else:
                head.load_state_dict(ckpt["head"])
            return ckpt["rng"] if saved_world == self.world else None
        loaded = [self._read_shard(os.path.dirname(os.path.abspath(path)), name, ckpt, path, saved_world)
                  for name in shards]
        simcore.load_resharded(head, [sd["head"] for sd in loaded])
        return loaded[self.rank]["rng"] if saved_world == self.world else None

    @staticmethod
    def _read_shard(folder, name, ckpt, path, saved_world):
        f = os.path.join(folder, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"{path}: its head shard {f} is missing (a checkpoint of {saved_world} ranks is "
                                  "last.pt plus one head-*.rank<r>-of-<R>.pt file per rank, in the same folder)")
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        except Exception as e:  # noqa: BLE001 - truncated or foreign files
            raise CheckpointError(f"{f}: not a readable head shard ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or sd.get("format") != SHARD_FORMAT or sd.get("tag") != ckpt.get("head_tag"):
            raise CheckpointError(f"{f}: not the head shard of {path} (format or checkpoint tag differ)")
        return sd

    # ------------------------------------------------------------------ save
    def save(self, run, path, next_stage, next_step, copy_to=None):
        """Every rank calls it; ``run`` (the Trainer) gives ``shard_state(tag)``,
        ``checkpoint_state(stage, step, tag, shards)``, ``global_step`` and its ``sink``. One
        process: ``path`` holds everything. Several ranks: each writes its head shard, then rank 0
        writes ``path`` naming them; a shard's name carries the checkpoint's (stage, step), so
        ``path`` never names shards of another moment."""
        run.sink.settle()   # the losses and log.jsonl up to this step go into the checkpoint
        tag = f"stage{next_stage}-step{next_step}"
        shards = [f"head-{tag}.rank{q}-of-{self.world}.pt" for q in range(self.world)] if self.dd else None
        if self.dd is not None:
            error = self._guarded(lambda: atomic_save(run.shard_state(tag),
                                                      os.path.join(self.output, shards[self.rank])),
                                  os.path.join(self.output, shards[self.rank]))
            self.dd.agree(error, "write its head shard")
        error = None
        if self.rank == 0:
            error = self._guarded(lambda: self._write(run, path, next_stage, next_step, tag, shards, copy_to),
                                  path)
        if self.dd is not None:
            self.dd.agree(error, "write the checkpoint")
        elif error is not None:
            raise error
        self.saved = (path, next_stage, next_step, run.global_step)

    def _guarded(self, write, path):
        try:
            write()
        except Exception as e:  # noqa: BLE001 - returned, so that every rank learns of it (Dist.agree)
            if not isinstance(e, (OSError, RuntimeError)):
                return e
            last = f"; the last whole checkpoint is {self.saved[0]}" if self.saved else ""
            return CheckpointWriteError(f"{path}: cannot write the checkpoint ({_reason(e)}){last}")
        return None

    def _write(self, run, path, next_stage, next_step, tag, shards, copy_to):
        state = run.checkpoint_state(next_stage, next_step, tag, shards)
        record = dict(event="checkpoint", path=os.path.basename(path), stage=next_stage, step=next_step,
                      global_step=run.global_step)
        line = RunLog.line(record)
        state["log_offset"] = run.sink.log.offset_after(line)
        state["log_record"] = line   # a resume writes it again: the log is whole even if the line never was
        run.sink.flush()
        atomic_save(state, path)
        run.sink.log.write_line(line)   # only now: log.jsonl never names a checkpoint that does not exist
        if copy_to is not None:
            atomic_copy(path, copy_to)
        self._collect_shards(tag)

    def _collect_shards(self, keep_tag):
        """Delete head shard files of superseded mid-stage checkpoints (stage-end ones stay: stage<k>.pt
        and final.pt name them), and the shards of an interrupted checkpoint that never got its last.pt."""
        for name in os.listdir(self.output):
            m = _SHARD_NAME.match(name)
            if m and int(m.group(2)) != 0 and f"stage{m.group(1)}-step{m.group(2)}" != keep_tag:
                try:
                    os.unlink(os.path.join(self.output, name))
                except FileNotFoundError:
                    pass

    def finish(self):
        """``final.pt``: a copy of the finished run's ``last.pt`` (rank 0)."""
        final = os.path.join(self.output, "final.pt")
        error = self._guarded(lambda: atomic_copy(self.last, final), final)
        if error is not None:
            raise error
        return final
