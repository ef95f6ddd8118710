"""``TrainConfig``: every setting of a training run, and its whole validation.

The command line and the Python API share it: ``TrainConfig.normalised()`` checks every value
(no file is touched), ``check_files()`` checks the paths (no image is read), and ``StagePlan``
checks the settings against the data once it is listed. A bad value is one ``TrainSetupError``
line naming the flag and the range it accepts; ``simcore train`` turns it into exit code 2
before any image is read or any model built.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

__all__ = ["TrainConfig", "TrainSetupError", "TrainWarning", "StagePlan", "resolve_device", "LOSSES", "AUGMENT_ON",
           "PRECISIONS", "DEFAULT_MARGINS", "jsonable", "class_order"]

#: The ``--loss`` choices.
LOSSES = ("arcface", "cosface", "adaface", "magface", "curricularface", "cam")

#: The ``--augment-on`` choices: the training copies are made per sample in the DataLoader workers, or
#: batched on the training device (the workers then only decode and resize).
AUGMENT_ON = ("workers", "device")

PRECISIONS = ("fp32", "bf16", "fp16")

#: Each loss's margin: (default, the range ``--margin`` accepts); None: the loss has no ``--margin``.
DEFAULT_MARGINS = {"arcface": (0.4, (0.0, math.pi / 2)), "cosface": (0.35, (0.0, 1.0)),
                   "adaface": (0.4, (0.0, math.pi / 2)), "curricularface": (0.5, (0.0, math.pi / 2)),
                   "magface": None, "cam": None}

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class TrainSetupError(ValueError):
    """Settings that cannot work (bad values, a drip larger than the data, a resume with other settings)."""


class TrainWarning(UserWarning):
    """Settings that run but not as written (a batch larger than the stage's images, ...)."""


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the ``simcore train`` flags map one to one (docs/train.md)."""
    images: str                                   # folder (recursive), text file listing images, .rec, shards
    output: str                                   # run folder: checkpoints, log.jsonl, loss.png
    backbone: str = "smallcnn"                    # or a timm model name
    pretrained: bool = False                      # timm: start from its pretrained weights
    widths: Sequence[int] = (32, 64, 128, 256)    # smallcnn stages
    depth: int = 1                                # smallcnn convolutions per stage
    dim: int = 256
    image_size: int = 64
    labels: str = "image"                         # "image": one class per image; "folder": per sub-folder;
    #                                               "record": a .rec's labels; "cls" / "stem": shards' .cls / key stem
    drip: Sequence[Union[int, str]] = ("ALL",)    # class count per stage, increasing; "ALL" = every class
    batch_size: Sequence[int] = (32,)             # one per stage, or one for all (a micro-batch with grad_accum)
    grad_accum: int = 1                           # micro-batches of batch_size per optimizer step
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
    val_bin: Optional[str] = None                 # face verification .bin files, comma-separated
    val_reid: Optional[str] = None                # re-identification "QUERY_DIR,GALLERY_DIR"
    plot: bool = False
    tensorboard: bool = False                     # RUN_DIR/tb event files (needs the tensorboard package)
    strict: bool = False                          # unreadable image files are an error, not skipped
    progress: bool = True

    def normalised(self) -> "TrainConfig":
        """A copy with lists for the per-stage fields and every value checked (TrainSetupError on the
        first bad one). Touches no file: ``check_files`` does that."""
        c = dataclasses.replace(self)
        c.images, c.output = os.fspath(c.images), os.fspath(c.output)
        c.drip = [("ALL" if str(d).strip().upper() == "ALL" else _int(d, "drip")) for d in _as_list(c.drip)]
        if not c.drip:
            raise TrainSetupError("--drip needs at least one stage (class counts, or ALL)")
        c.batch_size = _per_stage(c.batch_size, len(c.drip), "batch_size")
        c.steps = _per_stage(c.steps, len(c.drip), "steps")
        c.widths = [_int(w, "widths") for w in _as_list(c.widths)]
        c.grad_accum = _from_text(c.grad_accum)
        for check in (_check_choices, _check_counts, _check_numbers, _check_loss):
            check(c)
        return c

    def as_record(self) -> dict:
        """The config as JSON values (log.jsonl's start, a checkpoint's ``config``)."""
        return jsonable(dataclasses.asdict(self))

    def check_files(self, images: bool = True) -> None:
        """The paths: the images (``images=False``: another data source) and validation folder exist,
        ``output`` is (or can be) a folder, a resume names a file in ``output``. Reads no image.
        NoImagesError / TrainSetupError."""
        from simcore.isc.data import NoImagesError
        from simcore.isc.shards import is_shard_pattern
        if images and is_shard_pattern(self.images):
            _check_shard_files(self.images)
        elif images and not os.path.exists(self.images):
            raise NoImagesError(f"{self.images}: no such folder or file")
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise TrainSetupError(f"-o/--output {self.output}: exists and is not a folder")
        if self.val_dir is not None and not os.path.exists(self.val_dir):
            raise TrainSetupError(f"--val-dir {self.val_dir}: no such folder or file")
        self._check_face_files()
        if self.resume is None:
            return
        if not os.path.isfile(self.resume):
            raise TrainSetupError(f"--resume {self.resume}: no such checkpoint file")
        home = os.path.dirname(os.path.abspath(self.resume))
        if os.path.realpath(home) != os.path.realpath(self.output):
            raise TrainSetupError(f"--resume {self.resume} is a checkpoint of the run in {home}, not of -o "
                                  f"{self.output} (its log.jsonl there holds the run's start): resume with -o {home}")


    def val_bins(self) -> list:
        """The ``--val-bin`` files, in order."""
        return [p.strip() for p in _as_list(self.val_bin)] if self.val_bin else []

    def val_reid_dirs(self) -> tuple:
        """(query folder, gallery folder) of ``--val-reid``, or () without it."""
        if not self.val_reid:
            return ()
        parts = [p.strip() for p in str(self.val_reid).split(",")]
        if len(parts) != 2 or not all(parts):
            raise TrainSetupError(f"--val-reid must be QUERY_DIR,GALLERY_DIR (two folders), got {self.val_reid!r}")
        return tuple(parts)

    def _check_face_files(self):
        """``--labels record`` with a .rec file, the ``--val-bin`` files and ``--val-reid`` folders."""
        if (self.labels == "record") != self.images.endswith(".rec"):
            raise TrainSetupError(f"--labels record goes with a RecordIO .rec file (and a .rec with --labels "
                                  f"record), got {self.images} with --labels {self.labels}")
        from simcore.isc.shards import is_shard_pattern
        if (self.labels in ("cls", "stem")) != is_shard_pattern(self.images):
            raise TrainSetupError(f"--labels cls or stem goes with WebDataset shards (a .tar or a pattern such as "
                                  f"train-{{000000..000099}}.tar), and shards with one of them, got {self.images} "
                                  f"with --labels {self.labels}")
        bins = self.val_bins()
        for path in bins:
            if not os.path.isfile(path):
                raise TrainSetupError(f"--val-bin {path}: no such file")
        names = [os.path.splitext(os.path.basename(p))[0] for p in bins]
        if len(set(names)) != len(names):
            raise TrainSetupError(f"--val-bin: two files share a name ({', '.join(names)}); each logs as val_NAME")
        for folder in self.val_reid_dirs():
            if not os.path.isdir(folder):
                raise TrainSetupError(f"--val-reid {folder}: no such folder")


def _check_shard_files(pattern):
    """Every shard of the pattern is a file, none of them empty (their samples are read by the scan)."""
    from simcore.isc.shards import expand_shards
    for path in expand_shards(pattern):
        if os.path.getsize(path) == 0:
            raise TrainSetupError(f"IMAGES {pattern}: the shard {path} is an empty file")


def jsonable(v):
    """``v`` with tuples as lists (a config as JSON, and as a checkpoint compares it)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def _as_list(v):
    if isinstance(v, str):
        return [p for p in v.split(",") if p.strip()]
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _int(v, name):
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise TrainSetupError(f"--{_flag(name)}: {v!r} is not a whole number")
    try:
        return int(v)
    except (TypeError, ValueError):
        what = " (drip stages are class counts or ALL)" if name == "drip" else ""
        raise TrainSetupError(f"--{_flag(name)}: {v!r} is not a whole number{what}") from None


def _from_text(v):
    """A flag's text as a whole number when it is one, else as given (for the range check to name)."""
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    return v


def _per_stage(v, n, name):
    vals = [_int(x, name) for x in _as_list(v)]
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise TrainSetupError(f"--{_flag(name)} has {len(vals)} values for {n} drip stages (give one, or one per "
                              "stage)")
    return vals


def _flag(name):
    return {"stop_loss": "stop", "output": "output"}.get(name, name.replace("_", "-"))


def _bad(name, accepted, got):
    return TrainSetupError(f"--{_flag(name)} must be {accepted}, got {got!r}")


def _check_choices(c):
    for name, choices in (("labels", ("image", "folder", "record", "cls", "stem")), ("precision", PRECISIONS),
                          ("loss", LOSSES),
                          ("optimizer", ("adam", "sgd")), ("augment_on", AUGMENT_ON)):
        if getattr(c, name) not in choices:
            raise _bad(name, "one of " + ", ".join(choices), getattr(c, name))
    if not isinstance(c.device, str) or not _DEVICE.match(c.device):
        raise _bad("device", "auto, cpu, cuda or cuda:N", c.device)
    if not isinstance(c.backbone, str) or not c.backbone.strip():
        raise _bad("backbone", "smallcnn or a timm model name", c.backbone)


# (field, smallest, largest): whole numbers
_COUNTS = (("dim", 1, 65536), ("image_size", 16, 8192), ("depth", 1, 64), ("stop_window", 1, None),
           ("subcenters", 1, 255), ("warmup", 0, None), ("views", 0, 1024), ("workers", 0, 1024),
           ("checkpoint_every", 0, None), ("val_max", 1, None), ("seed", 0, 2 ** 63 - 1), ("grad_accum", 1, 65536))


def _in_range(v, lo, hi):
    return lo <= v and (hi is None or v <= hi)


def _range_text(lo, hi):
    return f"a whole number >= {lo}" if hi is None else f"a whole number in [{lo}, {hi}]"


def _check_counts(c):
    for name, lo, hi in _COUNTS:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not _in_range(v, lo, hi):
            raise _bad(name, _range_text(lo, hi), v)
    for name, lo in (("batch_size", 1), ("steps", 1), ("widths", 1)):
        bad = [v for v in getattr(c, name) if v < lo]
        if bad:
            raise _bad(name, f"whole numbers >= {lo}", ",".join(map(str, getattr(c, name))))
    if c.threads is not None and (isinstance(c.threads, bool) or not isinstance(c.threads, numbers.Integral)
                                  or c.threads < 1):
        raise _bad("threads", "a whole number >= 1", c.threads)


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_numbers(c):
    for name, ok, text in (
            ("lr", lambda v: v >= 0, "a finite number >= 0"),
            ("head_lr", lambda v: v >= 0, "a finite number >= 0 (default: --lr)"),
            ("sample_rate", lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
            ("scale", lambda v: v > 0, "a finite number > 0 (default 40, cam 20)"),
            ("stop_loss", lambda v: True, "a finite number")):
        v = getattr(c, name)
        if v is None and name in ("head_lr", "scale", "stop_loss"):
            continue
        if not _number(v) or not ok(v):
            raise _bad(name, text, v)


def _check_loss(c):
    margins = DEFAULT_MARGINS[c.loss]
    if c.margin is None:
        return
    if margins is None:
        why = "it follows the embedding norms" if c.loss == "magface" else "it adapts the scale alone"
        raise TrainSetupError(f"--margin: {c.loss} has no margin to set ({why}); leave --margin out")
    lo, hi = margins[1]
    if not _number(c.margin) or not lo <= c.margin <= hi:
        raise _bad("margin", f"a number in [{lo:g}, {hi:.4g}] for {c.loss} (default {margins[0]})", c.margin)


def resolve_device(name):
    """"auto" -> cuda when torch sees a GPU, else cpu; a CUDA device torch does not see is a TrainSetupError."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise _bad("device", "auto, cpu, cuda or cuda:N", name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainSetupError(f"--device {name}: torch sees no CUDA device (use --device cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise TrainSetupError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


@dataclass
class StagePlan:
    """The drip stages against the data: each stage's class count and images, and its batch as run
    (a batch never exceeds the stage's images). ``labels``: each item's class id in the head (the
    head takes the classes in a seeded order: ``class_order[k]`` is the data's class of head class k)."""
    counts: List[int]
    labels: torch.Tensor
    class_order: torch.Tensor
    batch_sizes: List[int]

    @classmethod
    def build(cls, c: TrainConfig, data_labels, num_classes: int, world: int = 1, warn: bool = True) -> "StagePlan":
        counts = _stage_counts(c.drip, num_classes)
        order = class_order(num_classes, c.seed)
        head_label = torch.empty(num_classes, dtype=torch.int64)
        head_label[order] = torch.arange(num_classes)
        labels = head_label[torch.as_tensor(data_labels)]
        plan = cls(counts, labels, order, [])
        # a step's batch: grad_accum micro-batches of batch_size (at most the stage's images)
        plan.batch_sizes = [min(bs * c.grad_accum, plan.stage_images(k)) for k, bs in enumerate(c.batch_size)]
        plan._check(c, world, warn)
        return plan

    def stage_items(self, stage: int) -> torch.Tensor:
        """The items of stage ``stage``'s classes (dataset indices)."""
        return torch.nonzero(self.labels < self.counts[stage]).squeeze(1)

    def stage_images(self, stage: int) -> int:
        return int((self.labels < self.counts[stage]).sum())

    def _check(self, c, world, warn):
        need = max(2, world)
        if self.counts[0] < need:
            why = f"{world} ranks shard the head's classes" if world > 1 else \
                "a margin loss over one class is 0 and learns nothing"
            raise TrainSetupError(f"{why}: the first drip stage needs at least {need} classes, got {self.counts[0]}"
                                  + (f" (--labels {c.labels}: the images hold {self.counts[-1]} class(es))"
                                     if self.counts[-1] < need else ""))
        short = [(k + 1, b) for k, b in enumerate(self.batch_sizes) if b < world]
        if short:
            raise TrainSetupError(f"stage {short[0][0]}: a global batch of {short[0][1]} cannot be split between "
                                  f"{world} ranks (--batch-size is the global batch)")
        for k, (asked, b) in enumerate(zip(c.batch_size, self.batch_sizes)):
            if warn and b < asked * c.grad_accum:
                flags = f"--batch-size {asked}" + (f" x --grad-accum {c.grad_accum}" if c.grad_accum > 1 else "")
                warnings.warn(f"{flags}: stage {k + 1} has {b} images, so its batches hold {b}",
                              TrainWarning, stacklevel=3)


def class_order(num_classes, seed):
    """The order in which drip stages take the classes: a seeded permutation."""
    from simcore.isc.data import sample_seed
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(sample_seed(seed, 0xC1A55)))


def _stage_counts(drip, num_classes):
    counts = [num_classes if d == "ALL" else int(d) for d in drip]
    if any(n < 1 for n in counts):
        raise TrainSetupError(f"--drip stages must hold >= 1 classes, got {drip}")
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise TrainSetupError(f"--drip stages must grow: {drip} gives class counts {counts}")
    if counts[-1] > num_classes:
        raise TrainSetupError(f"--drip asks for {counts[-1]} classes but the images hold {num_classes}")
    return counts
