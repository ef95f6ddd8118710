"""``simcore train``: copy-detection descriptors from a folder of images, the 2nd-place ISC 2021 recipe.

    from simcore.isc.train import TrainConfig, train
    result = train(TrainConfig(images="imgs/", output="run/", drip=(50, 100, "ALL"), steps=(20, 20, 20)))

Every image is its own class (or, with ``labels="folder"``, every sub-folder); positives are
augmented copies (:mod:`simcore.isc.augment`, made per sample in DataLoader workers,
:mod:`simcore.isc.data`, or with ``augment_on="device"`` batched on the training device, the workers
only decoding). The head is :class:`simcore.PartialMarginHead` (its own sparse row
optimizer; ``arcface``, ``cosface``, ``adaface``, ``magface``, ``curricularface`` or ``cam``),
the backbone a ``simcore.isc.backbones`` model with Adam or SGD, linear warm-up then cosine
decay per stage.

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
workers.

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
import dataclasses
import datetime
import gc
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

import simcore
from simcore.isc import augment as A
from simcore.isc import data as Dt
from simcore.isc.backbones import backbone_spec, build_backbone
from simcore.isc.descriptors import match as match_descriptors
from simcore.isc.embed import CHECKPOINT_FORMAT, CheckpointError, autocast_context, embed_dataset, load_checkpoint
from simcore.isc.files import atomic_write
from simcore.isc.metrics import evaluate

__all__ = ["TrainConfig", "TrainResult", "train", "resolve_device", "LOSSES", "AUGMENT_ON", "FAIL_AFTER_STEP_ENV",
           "SimulatedFailure", "TrainSetupError"]

#: The ``--loss`` choices.
LOSSES = ("arcface", "cosface", "adaface", "magface", "curricularface", "cam")

#: Test hook: an integer N makes ``train`` raise SimulatedFailure right after global step N (after that
#: step's checkpoint, if one was due): an interrupted run, to resume.
FAIL_AFTER_STEP_ENV = "SIMCORE_TRAIN_FAIL_AFTER_STEP"

#: Augmentation of the training copies: the demo's mix (1-3 transforms, intensity 0.2-1).
TRAIN_OPS_WEIGHTS = {"overlay_text": 0.5, "screenshot": 0.5, "meme": 0.5}

class TrainSetupError(ValueError):
    """Settings that cannot work (bad values, a drip larger than the data, a resume with other settings)."""


class SimulatedFailure(RuntimeError):
    """The interruption that ``SIMCORE_TRAIN_FAIL_AFTER_STEP`` asks for."""


# Config fields that must match to resume a run (the others - workers, progress, checkpoint
# frequency, plot, device - may change between the interrupted run and its resumption).
_RESUME_FIELDS = ("backbone", "dim", "image_size", "labels", "drip", "batch_size", "steps", "stop_loss",
                  "stop_window", "precision", "loss", "margin", "scale", "sample_rate", "subcenters", "lr",
                  "head_lr", "optimizer", "momentum", "weight_decay", "warmup", "views", "seed", "widths", "depth",
                  "augment_on")
# What a checkpoint written before a field existed ran with.
_RESUME_DEFAULTS = {"augment_on": "workers"}

#: The ``--augment-on`` choices: the training copies are made per sample in the DataLoader workers, or
#: batched on the training device (the workers then only decode and resize).
AUGMENT_ON = ("workers", "device")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the ``simcore train`` flags map one to one (docs/train.md)."""
    images: str                                   # folder (recursive) or text file listing images
    output: str                                   # run folder: checkpoints, log.jsonl, loss.png
    backbone: str = "smallcnn"                    # or a timm model name
    pretrained: bool = False                      # timm: start from its pretrained weights
    widths: Sequence[int] = (32, 64, 128, 256)    # smallcnn stages
    depth: int = 1                                # smallcnn convolutions per stage
    dim: int = 256
    image_size: int = 64
    labels: str = "image"                         # "image": one class per image; "folder": per sub-folder
    drip: Sequence[Union[int, str]] = ("ALL",)    # class count per stage, increasing; "ALL" = every class
    batch_size: Sequence[int] = (32,)             # one per stage, or one for all
    steps: Sequence[int] = (100,)                 # (maximum) steps per stage, one per stage or one for all
    stop_loss: Optional[float] = None             # end a stage once the mean of the last stop_window losses < it
    stop_window: int = 20
    precision: str = "fp32"                       # fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    loss: str = "arcface"
    margin: Optional[float] = None                # default per loss: arcface 0.4, cosface 0.35, adaface 0.4, ...
    scale: Optional[float] = None                 # default 40 (cam: 20)
    sample_rate: float = 0.1                      # Partial FC: labels + this fraction of the classes per step
    subcenters: int = 1
    lr: float = 1e-3                              # backbone
    head_lr: Optional[float] = None               # head (default: lr)
    optimizer: str = "adam"                       # adam (head: adamw without decay) | sgd (momentum)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 0                               # linear warm-up steps at each stage start
    views: int = 4                                # augmented copies per image for new class centres
    seed: int = 0
    workers: int = 0                              # DataLoader worker processes
    augment_on: str = "workers"                   # workers: per sample in the DataLoader | device: batched there
    device: str = "auto"                          # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None                 # torch intra-op threads in the main process
    checkpoint_every: int = 0                     # steps; 0: at stage ends only
    resume: Optional[str] = None                  # a checkpoint of this run (RUN_DIR/last.pt)
    val_dir: Optional[str] = None
    val_max: int = 500                            # at most this many validation images
    plot: bool = False
    tensorboard: bool = False                     # RUN_DIR/tb event files (needs the tensorboard package)
    strict: bool = False                          # unreadable image files are an error, not skipped
    progress: bool = True

    def normalised(self) -> "TrainConfig":
        """A copy with lists for the per-stage fields and checked values (ValueError on bad ones)."""
        c = dataclasses.replace(self)
        c.images, c.output = os.fspath(c.images), os.fspath(c.output)
        c.drip = [("ALL" if str(d).strip().upper() == "ALL" else _int(d, "drip")) for d in _as_list(c.drip)]
        n = len(c.drip)
        if n == 0:
            raise TrainSetupError("drip needs at least one stage")
        c.batch_size = _per_stage(c.batch_size, n, "batch_size")
        c.steps = _per_stage(c.steps, n, "steps")
        c.widths = [int(w) for w in _as_list(c.widths)]
        if any(b < 1 for b in c.batch_size):
            raise TrainSetupError(f"batch sizes must be >= 1, got {c.batch_size}")
        if any(s < 1 for s in c.steps):
            raise TrainSetupError(f"steps must be >= 1 per stage, got {c.steps}")
        if c.precision not in ("fp32", "bf16", "fp16"):
            raise TrainSetupError(f"precision must be fp32, bf16 or fp16, got {c.precision!r}")
        if c.loss not in LOSSES:
            raise TrainSetupError(f"loss must be one of {', '.join(LOSSES)}, got {c.loss!r}")
        if c.optimizer not in ("adam", "sgd"):
            raise TrainSetupError(f"optimizer must be adam or sgd, got {c.optimizer!r}")
        if c.augment_on not in AUGMENT_ON:
            raise TrainSetupError(f"augment_on must be workers or device, got {c.augment_on!r}")
        if c.labels not in ("image", "folder"):
            raise TrainSetupError(f"labels must be 'image' or 'folder', got {c.labels!r}")
        for name in ("dim", "image_size", "stop_window", "subcenters"):
            if getattr(c, name) < 1:
                raise TrainSetupError(f"{name} must be >= 1, got {getattr(c, name)}")
        for name in ("warmup", "views", "workers", "checkpoint_every"):
            if getattr(c, name) < 0:
                raise TrainSetupError(f"{name} must be >= 0, got {getattr(c, name)}")
        if not 0 < c.sample_rate <= 1:
            raise TrainSetupError(f"sample_rate must lie in (0, 1], got {c.sample_rate}")
        if c.image_size < 16:
            raise TrainSetupError(f"image_size must be >= 16, got {c.image_size}")
        return c


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


def _as_list(v):
    if isinstance(v, str):
        return [p for p in v.split(",") if p.strip()]
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _int(v, name):
    try:
        return int(v)
    except (TypeError, ValueError):
        raise TrainSetupError(f"{name}: {v!r} is not a whole number (drip stages are class counts or ALL)") from None


def _per_stage(v, n, name):
    vals = [_int(x, name) for x in _as_list(v)]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise TrainSetupError(f"{name} has {len(vals)} values for {n} drip stages (give one, or one per stage)")
    return vals


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainSetupError(f"device {name!r}: torch sees no CUDA device")
    return name


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


class _Dist:
    """This process's place in a ``torchrun`` world: the process group (WORLD), rank, world size,
    its device, and whether ``train`` created the group (and so destroys it at the end)."""

    def __init__(self, rank, world, local_rank, device, created):
        self.rank, self.world, self.local_rank, self.device, self.created = rank, world, local_rank, device, created
        self.group = dist.group.WORLD
        nccl = dist.get_backend() == "nccl"
        # bulk collectives (centre embeddings) run on the backend's device (NCCL: this rank's GPU)
        self.comm = torch.device(device) if nccl else torch.device("cpu")
        # the per-step exchange of a few host integers goes through gloo on the host: through NCCL
        # it would copy to the GPU and back, and so wait for the step the GPU is still computing
        self.control = dist.new_group(backend="gloo") if nccl else self.group

    def gather_ints(self, values):
        """(world, len(values)) int64 on the host: every rank's ``values``."""
        t = torch.tensor(values, dtype=torch.int64)
        out = torch.empty(self.world * t.numel(), dtype=torch.int64)
        dist.all_gather_into_tensor(out, t, group=self.control)
        return out.view(self.world, t.numel())

    def agree(self, error, what):
        """A collective: raise on every rank if any rank has an ``error`` (its own error there, a
        TrainSetupError naming the failed ranks elsewhere), so that no rank waits for another forever."""
        failed = self.gather_ints([int(error is not None)])[:, 0].nonzero().flatten().tolist()
        if error is not None:
            raise error
        if failed:
            raise TrainSetupError(f"rank(s) {failed} failed to {what} (see the error on those ranks)")

    def gather_rows(self, local, n, dim):
        """The (n, dim) float32 rows of items 0..n-1 when rank r holds items r, r+R, r+2R, ... (``local``)."""
        per = -(-n // self.world)
        buf = torch.zeros(per, dim, dtype=torch.float32, device=self.comm)
        if local.numel():
            buf[:local.shape[0]] = local.to(self.comm, torch.float32)
        out = torch.empty(self.world * per, dim, dtype=torch.float32, device=self.comm)
        dist.all_gather_into_tensor(out, buf, group=self.group)
        out = out.cpu().view(self.world, per, dim)
        rows = torch.empty(n, dim)
        for q in range(self.world):
            rows[q::self.world] = out[q, :len(range(q, n, self.world))]
        return rows


def _init_distributed(device_name):
    """None in one process; under ``torchrun`` (WORLD_SIZE > 1, or a process group the caller
    initialised) the rank's _Dist: gloo on the CPU, NCCL on CUDA with ``cuda:LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        device = resolve_device(device_name)
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        return _Dist(dist.get_rank(), world, local, device, created=False)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise TrainSetupError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise TrainSetupError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with torchrun "
                              "(docs/train.md, 'Several GPUs')")
    if not dist.is_available():
        raise TrainSetupError("this torch has no torch.distributed: train in one process")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = resolve_device(device_name)
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), local, device, created=True)


#: A head shard file of a checkpoint written by several ranks.
SHARD_FORMAT = "simcore.isc.train.head-shard/1"
_SHARD_NAME = re.compile(r"^head-stage(\d+)-step(\d+)\.rank(\d+)-of-(\d+)\.pt$")


def _shard_names(tag, world):
    return [f"head-{tag}.rank{q}-of-{world}.pt" for q in range(world)]


def _collect_shards(folder, keep_tag):
    """Delete head shard files of superseded mid-stage checkpoints (stage-end ones stay: stage<k>.pt
    and final.pt name them), and the shards of an interrupted checkpoint that never got its last.pt."""
    for name in os.listdir(folder):
        m = _SHARD_NAME.match(name)
        if m and int(m.group(2)) != 0 and f"stage{m.group(1)}-step{m.group(2)}" != keep_tag:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _load_head_state(head, ckpt, path, rank, world):
    """Load a checkpoint's head into ``head`` (single-process or sharded, at any world size);
    returns the RNG states this rank should continue with (None: reseed the class sampling)."""
    shards = ckpt.get("head_shards")
    saved_world = int(ckpt.get("world_size", 1))
    if not shards:
        if world > 1:
            simcore.load_resharded(head, [ckpt["head"]])
        else:
            head.load_state_dict(ckpt["head"])
        return ckpt["rng"] if saved_world == world else None
    folder = os.path.dirname(os.path.abspath(path))
    loaded = []
    for name in shards:
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
        loaded.append(sd)
    simcore.load_resharded(head, [sd["head"] for sd in loaded])
    return loaded[rank]["rng"] if saved_world == world else None


def _atomic_save(obj, path):
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


class _Switch(torch.utils.data.Sampler):
    """A batch sampler whose ``inner`` sampler can be swapped between passes of one DataLoader (whose
    persistent workers then serve every stage, the centre embeddings and the training steps alike)."""

    def __init__(self):
        self.inner = None

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class _Log:
    """RUN_DIR/log.jsonl, truncated on resume to its length at the checkpoint."""

    def __init__(self, path, truncate_to=None):
        self.path = path
        if truncate_to is not None and os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        elif truncate_to is None and os.path.exists(path):
            os.unlink(path)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, **record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def tell(self):
        self.f.flush()
        return self.f.tell()

    def close(self):
        self.f.close()


def _class_order(num_classes, seed):
    """The order in which drip stages take the classes: a seeded permutation."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(Dt.sample_seed(seed, 0xC1A55)))


def _stage_counts(drip, num_classes):
    counts = [num_classes if d == "ALL" else int(d) for d in drip]
    if any(n < 1 for n in counts):
        raise TrainSetupError(f"drip stages must hold >= 1 classes, got {drip}")
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise TrainSetupError(f"drip stages must grow: {drip} gives class counts {counts}")
    if counts[-1] > num_classes:
        raise TrainSetupError(f"drip asks for {counts[-1]} classes but the images hold {num_classes}")
    return counts


def _rng_states(head_gen, device):
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "head_sampling": head_gen.get_state()}
    if str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states, head_gen):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    head_gen.set_state(states["head_sampling"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plot(log_path, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    steps, losses, starts = [], [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
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
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return None


def _validate(model, val, c, loader_args):
    """µAP / recall@P90 of one augmented copy of each validation image searched among the clean ones."""
    n = len(val.paths)
    items = list(range(n))
    copies = [(i, Dt.sample_seed(c.seed, 0x7A1, i)) for i in items]
    ds = loader_args["dataset"]
    refs = embed_dataset(model, ds, items, **loader_args["kw"])
    qs = embed_dataset(model, ds, copies, **loader_args["kw"])
    m = match_descriptors(qs, refs, k=min(10, n), max_results=None)
    ids = [str(i) for i in items]
    metrics = evaluate(m.to_triples([f"q{i}" for i in ids], ids), [(f"q{i}", i) for i in ids])
    return {"micro_ap": metrics.micro_ap, "recall_at_p90": metrics.recall_at_p90,
            "recall_at_rank1": metrics.recall_at_rank1, "images": n}


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


#: The note for ``tensorboard=True`` without the tensorboard package.
TENSORBOARD_MISSING = "--tensorboard: the tensorboard package is not installed (pip install tensorboard): " \
                      "no TensorBoard events, training goes on"


def _tensorboard_writer(folder, purge_step):
    """(SummaryWriter on ``folder``, None), or (None, the note) when tensorboard cannot be imported.
    ``purge_step``: a resume hides the events of the interrupted run from that step on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None, TENSORBOARD_MISSING
    return SummaryWriter(folder, purge_step=purge_step), None


def train(config: TrainConfig, *, log_fn=None) -> TrainResult:
    """Run (or resume) a training run; returns a ``TrainResult`` (figures also in RUN_DIR/log.jsonl).

    Under ``torchrun`` (WORLD_SIZE > 1, or with a process group the caller initialised) every rank
    calls it: DDP on the backbone, the class-sharded head, rank r's share of each global batch
    (docs/train.md, "Several GPUs"). ``log_fn``: where one-line messages go (default: stderr; rank 0 only)."""
    c = config.normalised()
    dd = _init_distributed(c.device)
    try:
        return _train(c, dd, log_fn)
    finally:
        if dd is not None and dd.created and dist.is_initialized():
            # the head and its optimizer reference each other: free them (and the process group they
            # hold) now, not in the interpreter's finalisation
            gc.collect()
            dist.destroy_process_group()
        elif dd is not None and dd.control is not dd.group and dist.is_initialized():
            dist.destroy_process_group(dd.control)   # the caller's group lives on; train's own gloo group ends


def _train(c: TrainConfig, dd: Optional[_Dist], log_fn) -> TrainResult:
    rank, world = (dd.rank, dd.world) if dd is not None else (0, 1)
    lead = rank == 0
    group = dd.group if dd is not None else None
    say = (log_fn or (lambda msg: print(f"[simcore train] {msg}", file=sys.stderr, flush=True))) if lead \
        else (lambda msg: None)
    device = dd.device if dd is not None else resolve_device(c.device)
    fail_after = os.environ.get(FAIL_AFTER_STEP_ENV)
    fail_after = int(fail_after) if fail_after else None
    stage, step, global_step, log_offset, stage_losses, stage_done = 0, 0, 0, None, [], []
    ckpt, head, resume_rng = None, None, None
    setup_error = None
    try:  # under torchrun, every rank's setup error is raised on every rank (dd.agree below)
        if c.threads:
            torch.set_num_threads(c.threads)
        os.makedirs(c.output, exist_ok=True)
        if not c.resume and os.path.exists(os.path.join(c.output, "last.pt")):
            raise TrainSetupError(f"{c.output} already holds a run (last.pt): continue it with --resume "
                                  f"{os.path.join(c.output, 'last.pt')}, or train into another folder")

        # ------------------------------------------------------------ data
        images = Dt.load_image_set(c.images, labels=c.labels, strict=c.strict, workers=max(c.workers, 1), log=say)
        num_classes = images.num_classes
        counts = _stage_counts(c.drip, num_classes)
        order = _class_order(num_classes, c.seed)                 # head class k = dataset class order[k]
        head_label = torch.empty(num_classes, dtype=torch.int64)
        head_label[order] = torch.arange(num_classes)
        labels = head_label[torch.as_tensor(images.labels)]       # per image: its class's id in the head
        if world > 1:
            if counts[0] < world:
                raise TrainSetupError(f"{world} ranks shard the head's classes: the first drip stage needs at least "
                                      f"{world} classes, got {counts[0]}")
            short = [(k + 1, min(bs, int((labels < n).sum()))) for k, (n, bs) in enumerate(zip(counts, c.batch_size))
                     if min(bs, int((labels < n).sum())) < world]
            if short:
                raise TrainSetupError(f"stage {short[0][0]}: a global batch of {short[0][1]} cannot be split between "
                                      f"{world} ranks (--batch-size is the global batch)")
        augment = A.RandomAugment(num_ops=(1, 3), intensity=(0.2, 1.0), weights=TRAIN_OPS_WEIGHTS)
        dataset = Dt.ImageDataset(images.paths, labels.tolist(), c.image_size, augment, strict=c.strict)
        switch = _Switch()
        loader = Dt.make_loader(dataset, switch, workers=c.workers, device=device)
        embed_kw = dict(batch_size=max(c.batch_size), device=device, precision=c.precision)
        say(f"{len(images.paths)} images, {num_classes} classes ({'one per image' if c.labels == 'image' else 'one per sub-folder'})"
            f"{f', {len(images.skipped)} unreadable files skipped' if images.skipped else ''}; "
            f"stages: {counts} classes; device {device}, "
            f"{f'{c.workers} loader worker' + 's' * (c.workers > 1) if c.workers else 'loading in the main process'}, "
            f"augmenting {'batched on the device' if c.augment_on == 'device' else 'per sample while loading'}"
            + (f"; {world} ranks (torchrun, {dist.get_backend()})" if world > 1 else ""))
        val = None
        if c.val_dir is not None and lead:
            val = Dt.load_image_set(c.val_dir, strict=c.strict, log=say)
            if len(val.paths) > c.val_max:
                val = Dt.ImageSet(val.root, val.paths[:c.val_max], val.labels[:c.val_max],
                                  val.class_names[:c.val_max], val.skipped)
            val_ds = Dt.ImageDataset(val.paths, val.labels, c.image_size, augment, strict=c.strict)
            val_args = {"dataset": val_ds, "kw": dict(embed_kw, workers=c.workers)}

        # ------------------------------------------------------------ model, head, optimizers
        spec = backbone_spec(c.backbone, c.dim, c.image_size, pretrained=c.pretrained, widths=c.widths,
                             depth=c.depth)
        torch.manual_seed(c.seed)
        model = build_backbone(spec, pretrained=c.pretrained and not c.resume).to(device)  # a resume loads its own
        # class sampling: one generator per rank (the sharded head draws each shard's negatives with it)
        head_seed = Dt.sample_seed(c.seed, 0x5A3) if world == 1 else Dt.sample_seed(c.seed, 0x5A3, rank, world)
        head_gen = torch.Generator(device=device).manual_seed(head_seed)
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=c.precision == "fp16")
        if c.resume:
            ckpt = load_checkpoint(c.resume)
            old = ckpt["config"]
            diff = [f"{k} ({old.get(k, _RESUME_DEFAULTS.get(k))!r} -> {getattr(c, k)!r})" for k in _RESUME_FIELDS
                    if _jsonable(old.get(k, _RESUME_DEFAULTS.get(k))) != _jsonable(getattr(c, k))]
            if diff:
                raise TrainSetupError(f"{c.resume}: the run was made with other settings: {', '.join(diff)}")
            if ckpt["num_images"] != len(images.paths) or ckpt["num_classes"] != num_classes:
                raise TrainSetupError(f"{c.resume}: the run had {ckpt['num_images']} images in {ckpt['num_classes']} "
                                      f"classes, {c.images} now holds {len(images.paths)} in {num_classes}")
            model.load_state_dict(ckpt["model"])
            head = _make_head(c, ckpt["head_classes"], device, group)
            resume_rng = _load_head_state(head, ckpt, c.resume, rank, world)
            stage, step, global_step = ckpt["stage"], ckpt["step"], ckpt["global_step"]
            log_offset, stage_losses, stage_done = ckpt["log_offset"], list(ckpt["stage_losses"]), list(ckpt["stages"])
            saved_world = int(ckpt.get("world_size", 1))
            say(f"resuming {c.resume}: stage {stage + 1}/{len(counts)}, step {step}, global step {global_step}"
                + (f" (saved by {saved_world} rank(s), now {world}: the head is resharded and the class sampling "
                   "reseeded)" if saved_world != world else ""))
    except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
        setup_error = e
    if dd is not None:
        dd.agree(setup_error, "set up the run")
    elif setup_error is not None:
        raise setup_error

    log = _Log(os.path.join(c.output, "log.jsonl"), truncate_to=log_offset) if lead else _NullLog()
    tb = bar = None
    try:   # nothing below leaves log.jsonl or the TensorBoard writer open when it fails
        if c.tensorboard and lead:   # rank 0 only, like log.jsonl
            tb, note = _tensorboard_writer(os.path.join(c.output, "tb"),
                                           global_step + 1 if ckpt is not None else None)
            if note:
                say(note)
                log.write(event="note", message=note)
        train_model = model
        if dd is not None:  # DDP broadcasts rank 0's weights and buffers; checkpoints hold the plain model's
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dd.local_rank] if device.startswith("cuda") else None)
        opt = _make_optimizer(c, model)
        if ckpt is not None:
            if ckpt["optimizer"] is not None:
                opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_states(resume_rng if resume_rng is not None else ckpt["rng"], head_gen)
            if resume_rng is None:  # another world size: each rank's class sampling continues from a fresh seed
                head_gen.manual_seed(Dt.sample_seed(c.seed, 0x5A3, rank, world, global_step))
        if ckpt is None:
            log.write(event="start", config=_jsonable(dataclasses.asdict(c)), images=len(images.paths),
                      classes=num_classes, skipped_files=len(images.skipped), device=device, world_size=world)

        result = TrainResult(c.output, os.path.join(c.output, "last.pt"), skipped_files=len(images.skipped))
        result.stages = list(stage_done)
        if c.progress and lead:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(c.steps), initial=sum(c.steps[:stage]) + step, desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
    except BaseException:
        if tb is not None:
            tb.close()
        log.close()
        raise

    pending = None   # the last step's log record, its loss still a device tensor

    def settle():
        """Read the pending step's loss and write its record (log.jsonl, TensorBoard, the bar). The loop
        calls it once the next step's work is queued, so that on a GPU the host never waits for the
        device between steps, and before anything that needs every loss so far."""
        nonlocal pending
        if pending is None:
            return
        record, pending = pending, None
        # the global batch's mean: the same on every rank
        record["loss"] = value = float("nan") if record["loss"] is None else float(record["loss"])
        stage_losses.append(value)
        result.losses.append(value)
        log.write(event="step", **record)
        if tb is not None:
            for key in ("loss", "lr", "head_lr", "images_per_second", "classes"):
                tb.add_scalar(f"train/{key}", record[key], record["global_step"])
        if bar is not None:
            bar.set_postfix(stage=f"{record['stage'] + 1}/{len(counts)}", loss=f"{value:.3f}", refresh=False,
                            img_s=f"{record['images_per_second']:.0f}")

    def checkpoint(path, next_stage, next_step, copy_to=None):
        """Every rank calls it. One process: ``path`` holds everything. Several ranks: each rank
        writes its head shard (and its RNG states), then rank 0 writes ``path`` (the model, the
        optimizers, rank 0's RNG states, the shard names); a shard's name carries the checkpoint's
        (stage, step), so ``path`` never names shards of another moment. Each file is atomic."""
        settle()   # the losses and log.jsonl up to this step go into the checkpoint
        tag = f"stage{next_stage}-step{next_step}"
        shards = _shard_names(tag, world) if dd is not None else None
        if dd is not None:
            error = None
            try:
                _atomic_save({"format": SHARD_FORMAT, "tag": tag, "rank": rank, "world_size": world,
                              "global_step": global_step, "head": head.state_dict(),
                              "rng": _rng_states(head_gen, device)}, os.path.join(c.output, shards[rank]))
            except Exception as e:  # noqa: BLE001 - raised on every rank by agree
                error = e
            dd.agree(error, "write its head shard")
        error = None
        if lead:
            try:
                state = {
                    "format": CHECKPOINT_FORMAT, "config": _jsonable(dataclasses.asdict(c)), "backbone": spec,
                    "model": model.state_dict(), "head": head.state_dict() if dd is None else None,
                    "head_classes": head.num_classes, "world_size": world, "head_shards": shards, "head_tag": tag,
                    "optimizer": opt.state_dict() if next_step > 0 else None,  # a new stage starts a fresh one
                    "scaler": scaler.state_dict(), "rng": _rng_states(head_gen, device),
                    "stage": next_stage, "step": next_step, "global_step": global_step,
                    "stage_losses": stage_losses, "stages": result.stages, "num_images": len(images.paths),
                    "num_classes": num_classes, "class_order": order, "log_offset": None,
                    "simcore": simcore.__version__,
                }
                log.write(event="checkpoint", path=os.path.basename(path), stage=next_stage, step=next_step,
                          global_step=global_step)
                state["log_offset"] = log.tell()
                if tb is not None:
                    tb.flush()
                _atomic_save(state, path)
                if copy_to is not None:
                    _atomic_copy(path, copy_to)
                _collect_shards(c.output, tag)
            except Exception as e:  # noqa: BLE001
                error = e
        if dd is not None:
            dd.agree(error, "write the checkpoint")
        elif error is not None:
            raise error

    seen_images, train_seconds = 0, 0.0
    try:
        while stage < len(counts):
            n_cls, bs, max_steps = counts[stage], c.batch_size[stage], c.steps[stage]
            items = torch.nonzero(labels < n_cls).squeeze(1)
            if step == 0:
                # ---- a stage starts: new classes' centres from the current backbone, fresh optimizer
                have = 0 if head is None else head.num_classes
                new = torch.nonzero((labels >= have) & (labels < n_cls)).squeeze(1).tolist()
                centre_items = [(i, -1) for i in new] + [(i, Dt.sample_seed(c.seed, stage, 0xCE47, i, v))
                                                         for v in range(c.views) for i in new]
                t0 = time.perf_counter()
                if dd is None:
                    emb = embed_dataset(model, dataset, centre_items, loader=loader, **embed_kw)
                else:  # each rank embeds every world-th item; all-gathered in item order
                    mine = embed_dataset(model, dataset, centre_items[rank::world], loader=loader,
                                         **embed_kw)
                    emb = dd.gather_rows(mine, len(centre_items), c.dim)
                groups = labels[torch.tensor([i for i, _ in centre_items])] - have
                centres = simcore.PartialMarginHead.centres_from_embeddings(emb, groups)
                if c.subcenters > 1:   # K copies per class, slightly apart so that each can become dominant
                    g = torch.Generator().manual_seed(Dt.sample_seed(c.seed, stage, 0x5C))
                    centres = centres.repeat_interleave(c.subcenters, 0)
                    centres = centres + 1e-2 * torch.randn(centres.shape, generator=g)
                centres = centres.to(device)
                if head is None:
                    head = _make_head(c, n_cls, device, group)
                    lo, hi = getattr(head, "shard", (0, n_cls))
                    with torch.no_grad():
                        head.weight.copy_(centres[lo * c.subcenters:hi * c.subcenters].to(head.weight.dtype))
                else:
                    head.grow(centres)   # sharded: a collective, the rows move to the new shard bounds
                opt = _make_optimizer(c, model)
                stage_losses = []
                log.write(event="stage_start", stage=stage, classes=n_cls, new_classes=n_cls - have,
                          images=int(items.numel()), batch_size=bs, steps=max_steps, global_step=global_step,
                          centre_seconds=round(time.perf_counter() - t0, 3))
                say(f"stage {stage + 1}/{len(counts)}: {n_cls} classes ({n_cls - have} new, centres from "
                    f"{len(centre_items)} embeddings), batch {bs}, up to {max_steps} steps")
            switch.inner = Dt.StageBatchSampler(items, bs, seed=c.seed, stage=stage, start=step,
                                                steps=max_steps - step, rank=rank, world_size=world,
                                                augment=c.augment_on == "workers")
            train_model.train()
            head.train()
            base_head_lr = c.head_lr if c.head_lr is not None else c.lr
            t_last = time.perf_counter()
            stopped = False
            for x, y, _, ok in loader:
                f = _lr_factor(step, max_steps, c.warmup)
                for pg in opt.param_groups:
                    pg["lr"] = c.lr * f
                head.lr = base_head_lr * f
                dropped = int((~ok).sum())
                if dropped:
                    x, y = x[ok], y[ok]
                rows = int(x.shape[0])
                if dd is not None:  # the global batch; a step runs only when every rank has rows
                    g = dd.gather_ints([rows, dropped])
                    rows, dropped, run_step = int(g[:, 0].sum()), int(g[:, 1].sum()), bool(g[:, 0].min() > 0)
                else:
                    run_step = rows > 0
                result.dropped_samples += dropped
                loss = None
                if run_step:
                    x = _training_inputs(x, c.augment_on, augment, device,
                                         (c.seed, stage, step, 0xDE7, rank, world))
                    y = y.to(device, non_blocking=True)
                    with autocast_context(device, c.precision):
                        loss = head(train_model(x), y, generator=head_gen)
                    opt.zero_grad(set_to_none=True)
                    head.zero_grad()
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.step(head.row_optimizer)
                    scaler.update()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                ips = rows / dt if dt > 0 else 0.0
                seen_images += rows
                train_seconds += dt
                step += 1
                global_step += 1
                settle()   # the previous step's loss: its work is done or nearly, and this step's is queued
                pending = dict(stage=stage, step=step, global_step=global_step,
                               loss=None if loss is None else loss.detach(), lr=c.lr * f, head_lr=base_head_lr * f,
                               images_per_second=round(ips, 2), classes=n_cls, batch=rows, dropped=dropped)
                if bar is not None:
                    bar.update(1)
                if c.stop_loss is not None:   # the stop rule needs this step's loss now
                    settle()
                window = stage_losses[-c.stop_window:]
                stopped = (c.stop_loss is not None and len(window) == c.stop_window
                           and sum(window) / c.stop_window < c.stop_loss)
                if dd is not None and c.stop_loss is not None:   # one decision for every rank
                    stopped = bool(dd.gather_ints([int(stopped)])[0, 0])
                if step < max_steps and not stopped and c.checkpoint_every and global_step % c.checkpoint_every == 0:
                    checkpoint(result.checkpoint, stage, step)
                if fail_after is not None and global_step == fail_after and (step < max_steps and not stopped):
                    settle()
                    raise SimulatedFailure(f"{FAIL_AFTER_STEP_ENV}={fail_after}: simulated failure after step "
                                           f"{global_step}; continue with --resume {result.checkpoint}")
                if stopped:
                    break
            # ---- stage end
            settle()
            finite = [v for v in stage_losses if math.isfinite(v)]
            summary = {"stage": stage, "classes": n_cls, "steps": step,
                       "final_loss": sum(finite[-c.stop_window:]) / max(1, len(finite[-c.stop_window:])),
                       "stopped_early": bool(stopped)}
            if val is not None:   # rank 0 only, on the plain model
                v = _validate(model, val, c, val_args)
                summary["val"] = v
                result.val.append(dict(v, stage=stage))
                log.write(event="val", stage=stage, global_step=global_step, **v)
                if tb is not None:
                    for key in ("micro_ap", "recall_at_p90", "recall_at_rank1"):
                        tb.add_scalar(f"val/{key}", v[key], global_step)
                say(f"stage {stage + 1} validation: µAP {v['micro_ap']:.4f}, recall@P90 {v['recall_at_p90']:.4f} "
                    f"({v['images']} images)")
            result.stages.append(summary)
            log.write(event="stage_end", global_step=global_step, **summary)
            stage, step = stage + 1, 0
            checkpoint(result.checkpoint, stage, 0, copy_to=os.path.join(c.output, f"stage{stage}.pt"))
            if fail_after is not None and global_step == fail_after and stage < len(counts):
                raise SimulatedFailure(f"{FAIL_AFTER_STEP_ENV}={fail_after}: simulated failure after step "
                                       f"{global_step}; continue with --resume {result.checkpoint}")
    finally:
        with contextlib.suppress(Exception):   # the last step's line, unless reading its loss fails too
            settle()
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        log.close()
    result.images_per_second = seen_images / train_seconds if train_seconds else 0.0
    if lead:
        _atomic_copy(result.checkpoint, os.path.join(c.output, "final.pt"))  # only a finished run has one
        if c.plot:
            problem = _plot(os.path.join(c.output, "log.jsonl"), os.path.join(c.output, "loss.png"))
            say(problem or f"loss curve: {os.path.join(c.output, 'loss.png')}")
    say(f"done: {global_step} steps, {result.images_per_second:.1f} images/s; checkpoint {result.checkpoint}")
    return result


class _NullLog:
    """The log of ranks other than 0 (rank 0 writes RUN_DIR/log.jsonl)."""

    def write(self, **record):
        pass

    def tell(self):
        return None

    def close(self):
        pass


def _atomic_copy(src, dst):
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
