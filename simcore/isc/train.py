"""``simcore train``: copy-detection descriptors from a folder of images, the 2nd-place ISC 2021 recipe.

    from simcore.isc.train import TrainConfig, train
    result = train(TrainConfig(images="imgs/", output="run/", drip=(50, 100, "ALL"), steps=(20, 20, 20)))

The ``Trainer`` below is the loop: ``setup()`` builds the run from the components of
``simcore.isc.training`` (config, sources, validators, sinks, checkpoints, distributed),
``run_stage()`` runs one drip stage, ``step()`` one optimisation step.

Every image is its own class (or, with ``labels="folder"``, every sub-folder); positives are
augmented copies (:mod:`simcore.isc.augment`, made per sample in DataLoader workers,
:mod:`simcore.isc.data`, or with ``augment_on="device"`` batched on the training device, the workers
only decoding). The head is :class:`simcore.PartialMarginHead` (its own sparse row
optimizer; ``arcface``, ``cosface``, ``adaface``, ``magface``, ``curricularface`` or ``cam``),
the backbone a ``simcore.isc.backbones`` model with Adam or SGD, linear warm-up then cosine
decay per stage. With ``grad_accum`` N a step is N micro-batches of ``batch_size``, one forward and
backward pass each (:mod:`simcore.isc.accumulate`), then one optimizer step: the step of one batch of
N x ``batch_size``; steps, the schedule and checkpoints count optimizer steps.

Drip training: ``drip`` lists the class count of each stage (``"ALL"``: every class). The
classes are taken in a seeded random order; at the start of each stage the head grows by the
new classes, whose centres are the mean embedding of each class's clean image(s) and ``views``
augmented copies from the current backbone (``PartialMarginHead.centres_from_embeddings`` then
``head.grow``); the backbone is kept, its optimizer and LR schedule restart. A stage runs
``steps`` steps, or ends earlier once the mean loss of the last ``stop_window`` steps falls
below ``stop_loss``.

Checkpoints (``RUN_DIR/last.pt`` every ``checkpoint_every`` steps and at each stage end,
``RUN_DIR/final.pt`` once every stage has run, and
``RUN_DIR/stage<k>.pt`` at the end of stage k) are written atomically (temporary file, then
``os.replace``) and hold the model, the head (centres, row-optimizer state, loss statistics),
the backbone optimizer, the GradScaler, the RNG states (torch, CUDA, numpy, python, the head's
class-sampling generator), the stage, the step and the log's length. The data order and every
augmentation are functions of (seed, stage, step, slot) (``StageBatchSampler``), so
``resume=RUN_DIR/last.pt`` continues bit for bit where the run stopped, with any number of
workers. WebDataset shards are streamed instead (a ``streaming`` source: each worker and rank reads
its own shards in order; the checkpoint holds how far every rank has read): their resume is bit for
bit with the same workers and world size, and exact in the samples, not the batches, with others.

Several processes (``torchrun``, docs/train.md "Several GPUs"): WORLD_SIZE > 1 (or a process
group the caller initialised) makes every rank train together: gloo on the CPU, NCCL on
``cuda:LOCAL_RANK``; DDP on the backbone, the class-sharded head (``process_group=``), rank r takes
the slots j ≡ r (mod R) of each global batch, samples its shard's negatives with its own generator,
embeds every R-th new-centre image (all-gathered, so every rank computes the same centres, then
``head.grow`` moves rows between shards). Rank 0 logs, validates and writes ``last.pt``; each rank
writes its head shard ``head-stage<s>-step<k>.rank<r>-of-<R>.pt``, which ``last.pt`` names; a
resume at another world size reshards the head with ``simcore.load_resharded``.

Feedback: a tqdm bar (loss, images/s, ETA), ``RUN_DIR/log.jsonl`` (one JSON object per step:
loss, learning rates, images/s, stage, classes; and stage, validation and checkpoint events),
``RUN_DIR/loss.png`` with ``plot=True``, TensorBoard events in ``RUN_DIR/tb`` with ``tensorboard=True``
(where the tensorboard package is installed; rank 0), and with ``val_dir`` the µAP and recall@P90 of one
augmented copy of each validation image searched among the clean ones, at each stage end.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import simcore
from simcore.isc import augment as A
from simcore.isc import data as Dt
from simcore.isc.accumulate import accumulate_gradients
from simcore.isc.backbones import backbone_spec, build_backbone
from simcore.isc.embed import CHECKPOINT_FORMAT, autocast_context, embed_dataset, embedding_sums
from simcore.isc.training.checkpoints import SHARD_FORMAT, CheckpointManager, CheckpointWriteError, rng_states, \
    set_rng_states
from simcore.isc.training.config import AUGMENT_ON, LOSSES, StagePlan, TrainConfig, TrainSetupError, TrainWarning, \
    resolve_device
from simcore.isc.training.distributed import finish_distributed, init_distributed
from simcore.isc.training.sinks import TENSORBOARD_MISSING, MetricsSink, plot_losses
from simcore.isc.training.sources import source_for
from simcore.isc.training.validators import validators_for

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "resolve_device", "LOSSES", "AUGMENT_ON",
           "FAIL_AFTER_STEP_ENV", "SimulatedFailure", "TrainSetupError", "TrainWarning", "TrainInterrupted",
           "CheckpointWriteError", "SHARD_FORMAT", "TENSORBOARD_MISSING", "TRAIN_OPS_WEIGHTS"]

#: Test hook: an integer N makes ``train`` raise SimulatedFailure right after global step N (after that
#: step's checkpoint, if one was due): an interrupted run, to resume.
FAIL_AFTER_STEP_ENV = "SIMCORE_TRAIN_FAIL_AFTER_STEP"

#: Augmentation of the training copies: the demo's mix (1-3 transforms, intensity 0.2-1).
TRAIN_OPS_WEIGHTS = {"overlay_text": 0.5, "screenshot": 0.5, "meme": 0.5}


class SimulatedFailure(RuntimeError):
    """The interruption that ``SIMCORE_TRAIN_FAIL_AFTER_STEP`` asks for."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``; its message says where the last checkpoint is and how to resume."""


@dataclass
class TrainResult:
    output: str
    checkpoint: str                               # RUN_DIR/last.pt
    stages: List[dict] = field(default_factory=list)   # per stage: classes, steps run, mean loss, validation
    losses: List[float] = field(default_factory=list)  # every step's loss (this process: from the resumed step)
    images_per_second: float = 0.0                # training images per second over this process's steps
    skipped_files: int = 0                        # unreadable files skipped when listing
    dropped_samples: int = 0                      # samples whose file failed to decode (dropped from batches)
    val: List[dict] = field(default_factory=list)


def _make_head(c: TrainConfig, num_classes: int, device, process_group=None):
    """The run's head; with ``process_group`` the class-sharded one (this rank's block of classes)."""
    scale = c.scale if c.scale is not None else (20.0 if c.loss == "cam" else 40.0)
    kw = dict(sample_rate=c.sample_rate, subcenters=c.subcenters, device=device, process_group=process_group,
              optimizer="adamw" if c.optimizer == "adam" else "sgd",
              lr=c.head_lr if c.head_lr is not None else c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    if c.loss == "arcface":
        return simcore.PartialMarginHead(num_classes, c.dim, margin=0.4 if c.margin is None else c.margin,
                                         scale=scale, **kw)
    if c.loss == "cosface":
        return simcore.PartialMarginHead(num_classes, c.dim, margin=0.0, m3=0.35 if c.margin is None else c.margin,
                                         scale=scale, **kw)
    loss = {"adaface": lambda: simcore.AdaFace(margin=0.4 if c.margin is None else c.margin, scale=scale),
            "magface": lambda: simcore.MagFace(scale=scale),
            "curricularface": lambda: simcore.CurricularFace(margin=0.5 if c.margin is None else c.margin,
                                                             scale=scale),
            "cam": lambda: simcore.CamSoftmax(scale=scale, schedule=simcore.CamSchedule())}[c.loss]()
    return simcore.PartialMarginHead(num_classes, c.dim, loss=loss.to(device), scale=scale, **kw)


def _make_optimizer(c: TrainConfig, model):
    params = [p for p in model.parameters() if p.requires_grad]
    # On CUDA the fused step: one kernel for every parameter, and GradScaler (fp16) hands it the
    # inf check as a tensor instead of reading it on the host each step.
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if c.optimizer == "adam":
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, **fused)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, **fused)


def _lr_factor(step, steps, warmup):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _training_inputs(x, augment_on, augment, device, seed_key):
    """The model's input for a training batch of the loader's uint8 images (B, 3, S, S): float32 in
    [0, 1] on ``device``. ``"workers"``: the workers already made the augmented copies. ``"device"``:
    the workers decoded the clean images; ``augment`` makes the copies here, batched on the device,
    every random parameter drawn by one CPU generator seeded with ``sample_seed(*seed_key)`` (run seed,
    stage, step, tag, rank, world size): a function of the step alone, so a resume is bit for bit."""
    x = x.to(device, non_blocking=True).float().div_(255)
    if augment_on == "device":
        x = augment(x, generator=torch.Generator().manual_seed(Dt.sample_seed(*seed_key)))
    return x


class _Switch(torch.utils.data.Sampler):
    """A batch sampler whose ``inner`` sampler can be swapped between passes of one DataLoader (whose
    persistent workers then serve every stage, the centre embeddings and the training steps alike)."""

    def __init__(self):
        self.inner = None

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class Trainer:
    """One training run (one rank of it under ``torchrun``): ``setup()``, then ``run()``, which runs
    ``run_stage()`` per drip stage, which runs ``step()`` per batch. The state lives here: the
    position (``stage``, ``stage_step``, ``global_step``), the model and its DDP wrap, the head, the
    optimizers, the loader; the components do the rest: ``sink`` (figures), ``checkpoints``,
    ``validators``, the data ``source`` and ``plan`` (``simcore.isc.training``)."""

    def __init__(self, config: TrainConfig, dd=None, log_fn=None, *, source=None, validators=None):
        self.c, self.dd = config, dd
        self.source, self.validators = source, validators   # None: source_for(images), validators_for(config)
        self.rank, self.world = (dd.rank, dd.world) if dd is not None else (0, 1)
        self.lead = self.rank == 0
        self.group = dd.group if dd is not None else None
        say = log_fn or (lambda msg: print(f"[simcore train] {msg}", file=sys.stderr, flush=True))
        self.say = say if self.lead else (lambda msg: None)
        self.device = dd.device if dd is not None else resolve_device(config.device)
        fail_after = os.environ.get(FAIL_AFTER_STEP_ENV)
        self.fail_after = int(fail_after) if fail_after else None
        self.checkpoints = CheckpointManager(config.output, dd)
        self.stage = self.stage_step = self.global_step = 0
        self.head = self.resume_rng = None
        # a streaming source (shards): the stage's ShardProgress, a resume's data position, a checkpoint's
        self.progress = self.data_resume = self.data_position = None
        self.sink = MetricsSink()
        self.result = TrainResult(config.output, self.checkpoints.last)
        self.seen_images, self.train_seconds, self.lr_factor = 0, 0.0, 1.0

    # ------------------------------------------------------------------ setup
    def setup(self):
        """Data, model, head, optimizers, sinks, and a resume's state. Under ``torchrun`` an error on
        any rank is raised on every rank. On failure nothing is left open."""
        ckpt, error = None, None
        try:
            ckpt = self._setup_data_and_model()
            if self.c.resume:
                self._resume(ckpt)
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        if self.dd is not None:
            self.dd.agree(error, "set up the run")
        elif error is not None:
            raise error
        resume = (self.global_step, ckpt["log_offset"], ckpt.get("log_record")) if ckpt is not None else None
        self.sink = MetricsSink.open(self.c, self.lead, num_stages=len(self.plan.counts), resume=resume,
                                     say=self.say)
        try:
            self._setup_training(ckpt)
        except BaseException:
            self.sink.close()
            raise

    def _setup_data_and_model(self):
        c = self.c
        c.check_files(images=self.source is None)
        if c.threads:
            torch.set_num_threads(c.threads)
        os.makedirs(c.output, exist_ok=True)
        if not c.resume and os.path.exists(self.checkpoints.last):
            raise TrainSetupError(f"{c.output} already holds a run (last.pt): continue it with --resume "
                                  f"{self.checkpoints.last}, or train into another folder")
        source = self.source = self.source or source_for(c.images)
        self.data = source.scan(c, log=self.say)
        self.plan = StagePlan.build(c, self.data.labels, self.data.num_classes, self.world, warn=self.lead)
        self.augment = A.RandomAugment(num_ops=(1, 3), intensity=(0.2, 1.0), weights=TRAIN_OPS_WEIGHTS)
        self.dataset = source.dataset(c, self.plan.labels.tolist(), self.augment)
        self.switch = _Switch()
        self.loader = None if source.streaming else \
            Dt.make_loader(self.dataset, self.switch, workers=c.workers, device=self.device)
        self.say(self._describe_run())
        if not self.lead:
            self.validators = []
        elif self.validators is None:
            self.validators = validators_for(c, self.augment, log=self.say)
        self.spec = backbone_spec(c.backbone, c.dim, c.image_size, pretrained=c.pretrained, widths=c.widths,
                                  depth=c.depth)
        torch.manual_seed(c.seed)
        self.model = build_backbone(self.spec, pretrained=c.pretrained and not c.resume).to(self.device)
        # class sampling: one generator per rank (the sharded head draws each shard's negatives with it)
        key = (c.seed, 0x5A3) if self.world == 1 else (c.seed, 0x5A3, self.rank, self.world)
        self.head_gen = torch.Generator(device=self.device).manual_seed(Dt.sample_seed(*key))
        self.scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=c.precision == "fp16")
        if c.resume:
            return self.checkpoints.load_for_resume(c, self.data.num_items, self.data.num_classes,
                                                    len(self.plan.counts))
        return None

    def _describe_run(self):
        c, d = self.c, self.data
        loading = f"{c.workers} loader worker" + "s" * (c.workers > 1) if c.workers else "loading in the main process"
        return (f"{d.num_items} images, {d.num_classes} classes ({d.classes_are})"
                f"{f', {d.skipped} unreadable files skipped' if d.skipped else ''}; "
                f"stages: {self.plan.counts} classes; device {self.device}, "
                f"{loading}, "
                f"augmenting {'batched on the device' if c.augment_on == 'device' else 'per sample while loading'}"
                + (f"; {self.world} ranks (torchrun, {torch.distributed.get_backend()})" if self.world > 1 else ""))

    def _resume(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.head = _make_head(self.c, ckpt["head_classes"], self.device, self.group)
        self.resume_rng = self.checkpoints.load_head(self.head, ckpt, self.c.resume)
        self.stage, self.stage_step, self.global_step = ckpt["stage"], ckpt["step"], ckpt["global_step"]
        self.result.stages = list(ckpt["stages"])
        self.data_resume = ckpt.get("data_position")
        saved_world = int(ckpt.get("world_size", 1))
        self.say(f"resuming {self.c.resume}: stage {self.stage + 1}/{len(self.plan.counts)}, step {self.stage_step}, "
                 f"global step {self.global_step}"
                 + (f" (saved by {saved_world} rank(s), now {self.world}: the head is resharded and the class "
                    "sampling reseeded)" if saved_world != self.world else ""))

    def _setup_training(self, ckpt):
        c = self.c
        self.train_model = self.model
        if self.dd is not None:  # DDP broadcasts rank 0's weights and buffers; checkpoints hold the plain model's
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dd.local_rank] if self.device.startswith("cuda") else None)
        self.opt = _make_optimizer(c, self.model)
        if ckpt is not None:
            self.sink.stage_losses = list(ckpt["stage_losses"])
            if ckpt["optimizer"] is not None:
                self.opt.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_states(self.resume_rng if self.resume_rng is not None else ckpt["rng"], self.head_gen)
            if self.resume_rng is None:  # another world size: each rank's class sampling continues from a fresh seed
                self.head_gen.manual_seed(Dt.sample_seed(c.seed, 0x5A3, self.rank, self.world, self.global_step))
        else:
            self.sink.event(event="start", config=c.as_record(), images=self.data.num_items,
                            classes=self.data.num_classes, skipped_files=self.data.skipped, device=self.device,
                            world_size=self.world)
        self.result.skipped_files = self.data.skipped
        if c.progress and self.lead:
            self.sink.start_bar(sum(c.steps), sum(c.steps[:self.stage]) + self.stage_step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Every stage from where the run stands, then ``final.pt`` (and ``loss.png``)."""
        try:
            while self.stage < len(self.plan.counts):
                self.run_stage()
        finally:
            with contextlib.suppress(Exception):   # the last step's line, unless reading its loss fails too
                self.sink.settle()
            self.sink.close()
        return self._finish()

    def run_stage(self):
        """The current stage from its current step: its new classes' centres (at step 0), its steps
        until ``steps`` or the stop rule, then its end (validation, checkpoint)."""
        c, stage = self.c, self.stage
        if self.stage_step == 0:
            self._start_stage()
        batches = self._stage_batches(stage)
        self.train_model.train()
        self.head.train()
        t_last, stopped = time.perf_counter(), False
        for x, y, index, ok in batches:
            if self.progress is not None:
                self.progress.update(index)
            loss, rows, dropped = self.step(x, y, ok)
            now = time.perf_counter()
            stopped = self._after_step(loss, rows, dropped, now - t_last)
            t_last = now
            if stopped:
                break
        self._end_stage(stopped)

    def _stage_batches(self, stage):
        """The stage's batches from its current step: the seeded stage sampler over the loader, or a
        streaming source's loader (and its progress, from a resume's data position)."""
        c = self.c
        steps = c.steps[stage] - self.stage_step
        if self.source.streaming:
            loader, self.progress = self.source.stage_loader(
                c, stage, self.plan.counts[stage], self.plan.batch_sizes[stage], rank=self.rank, world=self.world,
                start=self.stage_step, resume=self.data_resume, device=self.device)
            self.data_resume = None
            return itertools.islice(loader, steps)
        self.switch.inner = Dt.StageBatchSampler(self.plan.stage_items(stage), self.plan.batch_sizes[stage],
                                                 seed=c.seed, stage=stage, start=self.stage_step, steps=steps,
                                                 rank=self.rank, world_size=self.world,
                                                 augment=c.augment_on == "workers")
        return self.loader

    def step(self, x, y, ok):
        """One optimisation step on a loader batch: (the loss as a device tensor, or None when every
        rank's batch was empty; the global batch's rows; its dropped samples)."""
        c = self.c
        self.lr_factor = f = _lr_factor(self.stage_step, c.steps[self.stage], c.warmup)
        for pg in self.opt.param_groups:
            pg["lr"] = c.lr * f
        self.head.lr = self._head_lr() * f
        dropped = int((~ok).sum())
        if dropped:
            x, y = x[ok], y[ok]
        rows = int(x.shape[0])
        fewest = rows
        if self.dd is not None:  # the global batch; a step runs only when every rank has rows
            g = self.dd.gather_ints([rows, dropped])
            rows, dropped, fewest = int(g[:, 0].sum()), int(g[:, 1].sum()), int(g[:, 0].min())
        self.result.dropped_samples += dropped
        # --grad-accum micro-batches, fewer only when a rank holds fewer rows (every rank runs as many)
        return (self._optimise(x, y, min(c.grad_accum, fewest)) if fewest > 0 else None), rows, dropped

    def _optimise(self, x, y, micro_batches):
        """One optimizer step over ``micro_batches`` forward and backward passes (simcore.isc.accumulate)."""
        c = self.c
        x = _training_inputs(x, c.augment_on, self.augment, self.device,
                             (c.seed, self.stage, self.stage_step, 0xDE7, self.rank, self.world))
        y = y.to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        self.head.zero_grad()
        loss, _ = accumulate_gradients(
            self.train_model, self.head, list(zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches))),
            generator=self.head_gen, backward=lambda loss: self.scaler.scale(loss).backward(),
            forward_context=lambda: autocast_context(self.device, c.precision),
            no_sync=self.train_model.no_sync if self.dd is not None else None)
        self.scaler.step(self.opt)
        self.scaler.step(self.head.row_optimizer)
        self.scaler.update()
        return loss

    def _head_lr(self):
        return self.c.head_lr if self.c.head_lr is not None else self.c.lr

    def _after_step(self, loss, rows, dropped, seconds):
        """Count the step, hand its record to the sink, apply the stop rule, checkpoint when due;
        True when the stage stops early."""
        c, f = self.c, self.lr_factor
        self.seen_images += rows
        self.train_seconds += seconds
        self.stage_step += 1
        self.global_step += 1
        # the previous step's loss is read now: its work is done or nearly, and this step's is queued
        self.sink.step(dict(stage=self.stage, step=self.stage_step, global_step=self.global_step,
                            loss=None if loss is None else loss.detach(), lr=c.lr * f, head_lr=self._head_lr() * f,
                            images_per_second=round(rows / seconds if seconds > 0 else 0.0, 2),
                            classes=self.plan.counts[self.stage], batch=rows, dropped=dropped))
        stopped = self._stop_rule()
        running = self.stage_step < c.steps[self.stage] and not stopped
        if running and c.checkpoint_every and self.global_step % c.checkpoint_every == 0:
            self._save(self.stage, self.stage_step)
        if running:
            self._simulated_failure()
        return stopped

    def _save(self, next_stage, next_step, copy_to=None):
        """``last.pt`` (every rank calls it); a streaming source's position goes with it (a stage end's
        is None: the next stage starts its own stream)."""
        self.data_position = None
        if self.progress is not None and next_step > 0:
            state = self.progress.state_dict()
            states = self.dd.gather_objects(state) if self.dd is not None else [state]
            self.data_position = self.source.data_position(states, self.c.workers, self.world)
        self.checkpoints.save(self, self.checkpoints.last, next_stage, next_step, copy_to=copy_to)

    def _stop_rule(self):
        """``stop_loss``: the mean of the stage's last ``stop_window`` losses below it (one decision for every rank)."""
        c = self.c
        if c.stop_loss is None:
            return False
        self.sink.settle()   # the rule needs this step's loss now
        window = self.sink.stage_losses[-c.stop_window:]
        stopped = len(window) == c.stop_window and sum(window) / c.stop_window < c.stop_loss
        if self.dd is not None:
            stopped = bool(self.dd.gather_ints([int(stopped)])[0, 0])
        return stopped

    def _simulated_failure(self):
        if self.fail_after is not None and self.global_step == self.fail_after:
            self.sink.settle()
            raise SimulatedFailure(f"{FAIL_AFTER_STEP_ENV}={self.fail_after}: simulated failure after step "
                                   f"{self.global_step}; continue with --resume {self.checkpoints.last}")

    # ------------------------------------------------------------------ stage start and end
    def _start_stage(self):
        """Grow the head by the stage's new classes, their centres from the current backbone; a fresh optimizer."""
        c, stage, n_cls = self.c, self.stage, self.plan.counts[self.stage]
        have = 0 if self.head is None else self.head.num_classes
        labels = self.plan.labels
        t0 = time.perf_counter()
        if self.source.streaming:
            centres, embedded = self._streamed_centres(have, n_cls)
        else:
            new = torch.nonzero((labels >= have) & (labels < n_cls)).squeeze(1).tolist()
            centre_items = [(i, -1) for i in new] + [(i, Dt.sample_seed(c.seed, stage, 0xCE47, i, v))
                                                     for v in range(c.views) for i in new]
            centres = self._new_centres(centre_items, labels[torch.tensor([i for i, _ in centre_items])] - have)
            embedded = len(centre_items)
        if self.head is None:
            self.head = _make_head(c, n_cls, self.device, self.group)
            lo, hi = getattr(self.head, "shard", (0, n_cls))
            with torch.no_grad():
                self.head.weight.copy_(centres[lo * c.subcenters:hi * c.subcenters].to(self.head.weight.dtype))
        else:
            self.head.grow(centres)   # sharded: a collective, the rows move to the new shard bounds
        self.opt = _make_optimizer(c, self.model)
        self.sink.stage_losses = []
        bs, images = self.plan.batch_sizes[stage], self.plan.stage_images(stage)
        self.sink.event(event="stage_start", stage=stage, classes=n_cls, new_classes=n_cls - have, images=images,
                        batch_size=bs, steps=c.steps[stage], global_step=self.global_step,
                        centre_seconds=round(time.perf_counter() - t0, 3))
        self.say(f"stage {stage + 1}/{len(self.plan.counts)}: {n_cls} classes ({n_cls - have} new, centres from "
                 f"{embedded} embeddings), batch {bs}"
                 + (f" ({c.grad_accum} micro-batches a step)" if c.grad_accum > 1 else "")
                 + f", up to {c.steps[stage]} steps")

    def _new_centres(self, centre_items, groups):
        """The centres (on the device) of the classes ``groups`` numbers: each the mean embedding of its items."""
        c = self.c
        kw = dict(batch_size=max(c.batch_size), device=self.device, precision=c.precision, loader=self.loader)
        if self.dd is None:
            emb = embed_dataset(self.model, self.dataset, centre_items, **kw)
        else:  # each rank embeds every world-th item; all-gathered in item order
            mine = embed_dataset(self.model, self.dataset, centre_items[self.rank::self.world], **kw)
            emb = self.dd.gather_rows(mine, len(centre_items), c.dim)
        return self._subcentres(simcore.PartialMarginHead.centres_from_embeddings(emb, groups))

    def _streamed_centres(self, have, n_cls):
        """(the centres of head classes [have, n_cls), the embeddings they come from) from one pass over
        this rank's shards (a streaming source), summed over the ranks."""
        c = self.c
        loader = self.source.centre_loader(c, self.stage, have, n_cls, max(c.batch_size), rank=self.rank,
                                           world=self.world, device=self.device)
        sums, counts = embedding_sums(self.model, loader, have, n_cls - have, c.dim, device=self.device,
                                      precision=c.precision)
        if self.dd is not None:
            self.dd.sum_(sums)
            self.dd.sum_(counts)
        centres = sums.cpu() / counts.cpu().clamp_min(1).unsqueeze(1)
        return self._subcentres(centres), int(counts.sum())

    def _subcentres(self, centres):
        """The centres on the device; with sub-centres K copies per class, slightly apart so that each can
        become dominant."""
        c = self.c
        if c.subcenters > 1:
            g = torch.Generator().manual_seed(Dt.sample_seed(c.seed, self.stage, 0x5C))
            centres = centres.repeat_interleave(c.subcenters, 0)
            centres = centres + 1e-2 * torch.randn(centres.shape, generator=g)
        return centres.to(self.device)

    def _end_stage(self, stopped):
        """The stage's summary, validation (rank 0, on the plain model), its checkpoint and ``stage<k>.pt``."""
        self.sink.settle()
        stage = self.stage
        summary = {"stage": stage, "classes": self.plan.counts[stage], "steps": self.stage_step,
                   "final_loss": self.sink.mean_recent_loss(self.c.stop_window), "stopped_early": bool(stopped)}
        for validator in self.validators:
            self._validate(validator, summary)
        self.result.stages.append(summary)
        self.sink.event(event="stage_end", global_step=self.global_step, **summary)
        self.stage, self.stage_step = stage + 1, 0
        self._save(self.stage, 0, copy_to=os.path.join(self.c.output, f"stage{self.stage}.pt"))
        if self.stage < len(self.plan.counts):
            self._simulated_failure()

    def _validate(self, validator, summary):
        v = validator.validate(self.model, batch_size=max(self.c.batch_size), device=self.device,
                               precision=self.c.precision)
        summary[validator.name] = v
        self.result.val.append(dict(v, stage=self.stage))
        self.sink.event(event=validator.name, stage=self.stage, global_step=self.global_step, **v)
        self.sink.scalars(validator.name, v, validator.scalars, self.global_step)
        self.say(f"stage {self.stage + 1} validation: {validator.describe(v)}")

    # ------------------------------------------------------------------ what a checkpoint holds
    def checkpoint_state(self, next_stage, next_step, tag, shards):
        """``last.pt``'s content (rank 0); with several ranks the head is in the shards it names."""
        return {
            "format": CHECKPOINT_FORMAT, "config": self.c.as_record(), "backbone": self.spec,
            "model": self.model.state_dict(), "head": self.head.state_dict() if self.dd is None else None,
            "head_classes": self.head.num_classes, "world_size": self.world, "head_shards": shards, "head_tag": tag,
            "optimizer": self.opt.state_dict() if next_step > 0 else None,  # a new stage starts a fresh one
            "scaler": self.scaler.state_dict(), "rng": rng_states(self.head_gen, self.device),
            "stage": next_stage, "step": next_step, "global_step": self.global_step,
            "stage_losses": self.sink.stage_losses, "stages": self.result.stages,
            "num_images": self.data.num_items, "num_classes": self.data.num_classes,
            "class_order": self.plan.class_order, "log_offset": None, "simcore": simcore.__version__,
            "data_position": self.data_position,
        }

    def shard_state(self, tag):
        """This rank's head shard file (several ranks)."""
        return {"format": SHARD_FORMAT, "tag": tag, "rank": self.rank, "world_size": self.world,
                "global_step": self.global_step, "head": self.head.state_dict(),
                "rng": rng_states(self.head_gen, self.device)}

    def interrupted(self) -> str:
        """The line for Ctrl-C: where the last checkpoint is and how to continue."""
        saved = self.checkpoints.saved
        if saved is None:
            return (f"interrupted at step {self.global_step}, before the first checkpoint: nothing to resume "
                    f"(start again; {self.c.output} holds no last.pt)")
        return (f"interrupted at step {self.global_step}; the last checkpoint is {saved[0]} (global step "
                f"{saved[3]}): continue with `simcore train ... -o {self.c.output} --resume {saved[0]}` "
                "and the same settings")

    def _finish(self):
        c, r = self.c, self.result
        r.losses = self.sink.losses
        r.images_per_second = self.seen_images / self.train_seconds if self.train_seconds else 0.0
        if self.lead:
            self.checkpoints.finish()   # final.pt: only a finished run has one
            if c.plot:
                problem = plot_losses(os.path.join(c.output, "log.jsonl"), os.path.join(c.output, "loss.png"))
                self.say(problem or f"loss curve: {os.path.join(c.output, 'loss.png')}")
        self.say(f"done: {self.global_step} steps, {r.images_per_second:.1f} images/s; checkpoint {r.checkpoint}")
        return r


def train(config: TrainConfig, *, log_fn=None, source=None, validators=None) -> TrainResult:
    """Run (or resume) a training run; returns a ``TrainResult`` (figures also in RUN_DIR/log.jsonl).

    Under ``torchrun`` (WORLD_SIZE > 1, or with a process group the caller initialised) every rank
    calls it: DDP on the backbone, the class-sharded head, rank r's share of each global batch
    (docs/train.md, "Several GPUs"). ``log_fn``: where one-line messages go (default: stderr; rank 0
    only). ``source``: a ``simcore.isc.training.sources.DataSource`` instead of ``config.images``;
    ``validators``: ``simcore.isc.training.validators.Validator`` objects instead of ``config.val_dir``'s.
    Ctrl-C raises ``TrainInterrupted`` (a KeyboardInterrupt) naming the checkpoint to resume from."""
    c = config.normalised()
    dd = init_distributed(c.device)
    trainer = None
    try:
        trainer = Trainer(c, dd, log_fn, source=source, validators=validators)
        trainer.setup()
        return trainer.run()
    except KeyboardInterrupt:
        if trainer is None:
            raise
        raise TrainInterrupted(trainer.interrupted()) from None
    finally:
        finish_distributed(dd)
