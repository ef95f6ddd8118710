"""Where a run's training images come from.

A ``DataSource`` has two steps. ``scan`` lists the items and returns ``TrainingData``: the class of
each item (and how many files it left out). ``dataset`` then serves the items as a map-style
dataset whose item is ``(index, seed)``: ``seed == -1`` asks for the clean image, any other seed for
the augmented copy that seed determines (``simcore.isc.data.ImageDataset`` is the model); it returns
``(uint8 image (3, S, S), label, index, ok)``, ``ok`` False for a sample that could not be decoded
(the trainer drops it from its batch). Everything the trainer does with the data - the seeded stage
batches, the centre embeddings, the DataLoader workers - goes through that item, so a new format
(InsightFace RecordIO) is a new ``DataSource`` and one line in ``source_for``.

A streaming source (``streaming = True``: WebDataset shards, read in order, each DataLoader worker and
each rank its own shards) cannot serve items by index. It gives the trainer loaders instead:
``stage_loader`` (a stage's training batches, without end, and a ``ShardProgress`` that the trainer
feeds each batch's indices and checkpoints) and ``centre_loader`` (one pass over the rank's shards:
each new class's images, clean and ``views`` copies, for its centre).
"""
from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List

import torch

from simcore.isc import data as Dt

__all__ = ["DataSource", "TrainingData", "ImageFolderSource", "ImageListSource", "RecordSource", "ShardSource",
           "source_for"]


@dataclass
class TrainingData:
    """What a source holds: each item's class (0 .. num_classes - 1), in item order."""
    labels: List[int]
    num_classes: int
    skipped: int = 0                    # unreadable files left out while listing
    classes_are: str = "one per image"  # what a class is, for the run's first line

    @property
    def num_items(self) -> int:
        return len(self.labels)


class DataSource(ABC):
    """A run's training data. ``scan`` lists it (it may read the data: it runs after the config is
    validated); ``dataset`` then serves its items with the labels the trainer gives (the head's
    class ids, a permutation of the source's)."""

    streaming = False   # True: the items come as a stream (ShardSource), not by index

    def __init__(self, location: str):
        self.location = location

    @abstractmethod
    def scan(self, c, log=None) -> TrainingData:
        """The items for config ``c`` (``c.labels``, ``c.strict``, ``c.workers``)."""

    @abstractmethod
    def dataset(self, c, labels, augment) -> torch.utils.data.Dataset:
        """The scanned items as a dataset of ``(index, seed)`` items with class ``labels[index]``, at
        ``c.image_size``; ``augment`` makes the training copies when ``c.augment_on == "workers"``."""


class ImageFolderSource(DataSource):
    """A folder of image files, searched recursively (``simcore.isc.data.list_images``): every image
    its own class, or with ``labels="folder"`` every sub-folder."""

    def scan(self, c, log=None) -> TrainingData:
        images = Dt.load_image_set(self.location, labels=c.labels, strict=c.strict, workers=max(c.workers, 1),
                                   log=log)
        self.paths = images.paths
        return TrainingData(list(images.labels), images.num_classes, len(images.skipped),
                            "one per image" if c.labels == "image" else "one per sub-folder")

    def dataset(self, c, labels, augment):
        return Dt.ImageDataset(self.paths, labels, c.image_size, augment, strict=c.strict)


class ImageListSource(ImageFolderSource):
    """A text file naming image files, one a line (relative to the file's folder); every image its own class."""


class RecordSource(DataSource):
    """An InsightFace RecordIO pair (``train.rec`` with ``train.idx`` beside it): the records' class labels
    (``--labels record``); unreadable records are left out (``strict``: refused)."""

    def scan(self, c, log=None) -> TrainingData:
        from simcore.isc.recordio import RecordDataset
        self.records = RecordDataset(self.location, image_size=c.image_size, strict=c.strict, log=log)
        return TrainingData(self.records.labels.tolist(), self.records.num_classes, len(self.records.skipped),
                            "the records' labels")

    def dataset(self, c, labels, augment):
        from simcore.isc.encoded import EncodedImageDataset
        ds = copy.copy(self.records)          # the scanned index, with the trainer's labels and augmentation
        EncodedImageDataset.__init__(ds, labels, c.image_size, augment, strict=c.strict)
        return ds


class ShardSource(DataSource):
    """WebDataset tar shards (``shards/train-{000000..000099}.tar``, or one ``.tar``), streamed by
    ``simcore.isc.shards.ShardDataset``: labels from each sample's ``.cls`` member (``--labels cls``) or
    its key's stem (``--labels stem``). Stage s reads the shards in an order drawn from (seed, s) and
    serves only the stage's classes; DataLoader worker w of W on rank r of R reads its own shards."""

    streaming = True

    def scan(self, c, log=None) -> TrainingData:
        from simcore.isc.shards import expand_shards, scan_shards
        from simcore.isc.training.config import TrainSetupError
        from simcore.isc.training.distributed import gather_objects
        dist = torch.distributed
        ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world = dist.get_world_size() if ranks else 1
        shards = len(expand_shards(self.location))
        if shards < world * max(c.workers, 1):   # (every rank finds the same, so every rank raises)
            raise TrainSetupError(f"--workers {c.workers}: {shards} shard(s) cannot give each of {world} rank(s) x "
                                  f"{max(c.workers, 1)} DataLoader worker(s) its own shards: use at most "
                                  f"{max(shards // world, 1) if shards >= world else 0} workers, or more shards")
        share = {}
        if ranks:   # every rank reads 1/R of the shards; they exchange what they found
            share = dict(part=(dist.get_rank(), world), gather=gather_objects)
        self.scanned = scan_shards(self.location, labels=c.labels, strict=c.strict, threads=max(c.workers, 1),
                                   log=log, **share)
        return TrainingData(self.scanned.labels, self.scanned.num_classes, len(self.scanned.skipped),
                            "the samples' .cls members" if c.labels == "cls" else "the samples' key stems")

    def dataset(self, c, labels, augment):
        """Records the trainer's labels (as a map from the shards' classes) and augmentation; returns
        stage 0's stream over every class."""
        self.class_map = torch.full((self.scanned.num_classes,), -1, dtype=torch.int64)
        self.class_map[torch.as_tensor(self.scanned.labels)] = torch.as_tensor(labels, dtype=torch.int64)
        self.augment = augment
        return self._stream(c, Dt.sample_seed(c.seed, 0), augment if c.augment_on == "workers" else None)

    def _stream(self, c, seed, augment, **kw):
        from simcore.isc.shards import ShardDataset
        rank, world = kw.pop("rank", 0), kw.pop("world", 1)
        return ShardDataset(self.location, c.image_size, augment, seed=seed, rank=rank, world_size=world,
                            labels=c.labels, strict=c.strict, class_map=self.class_map, sizes=self.scanned.sizes,
                            **kw)

    def _loader(self, c, ds, batch_size, device):
        pin = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=c.workers, collate_fn=Dt.collate,
                                           pin_memory=pin)

    def stage_loader(self, c, stage, classes, batch_size, *, rank=0, world=1, start=0, resume=None, device="cpu"):
        """(the batches of stage ``stage`` from its step ``start``: this rank's share of the global
        ``batch_size``, items of head classes below ``classes``, without end; the ``ShardProgress`` to
        feed each trained batch's indices). ``resume``: a checkpoint's ``data_position``. With the
        worker count and world size it was saved with, the DataLoader's round-robin turn continues too
        (worker_offset), so the batches are those of the uninterrupted run."""
        from simcore.isc.shards import ShardProgress
        same = resume is not None and resume.get("workers") == c.workers and resume.get("world_size") == world
        ds = self._stream(c, Dt.sample_seed(c.seed, stage), self.augment if c.augment_on == "workers" else None,
                          rank=rank, world=world, resume=resume, keep=(0, classes),
                          worker_offset=start % max(c.workers, 1) if same else 0)
        progress = ShardProgress.from_state(resume) if resume is not None else ShardProgress()
        return self._loader(c, ds, len(range(rank, batch_size, world)), device), progress

    def centre_loader(self, c, stage, lo, hi, batch_size, *, rank=0, world=1, device="cpu"):
        """One pass over this rank's shards: every image of head classes [lo, hi), clean and ``c.views``
        augmented copies (seeded by (seed, stage, epoch, shard, position, view))."""
        ds = self._stream(c, Dt.sample_seed(c.seed, stage, 0xCE47), self.augment, rank=rank, world=world,
                          keep=(lo, hi), epochs=1, views=c.views)
        return self._loader(c, ds, batch_size, device)

    @staticmethod
    def data_position(states, workers, world):
        """A checkpoint's ``data_position``: the samples every rank consumed (``states``: each rank's
        ``ShardProgress.state_dict()``), and the worker count and world size they were read with."""
        from simcore.isc.shards import ShardProgress
        return dict(ShardProgress.merge(states).state_dict(), workers=workers, world_size=world)


def source_for(location) -> DataSource:
    """The source that reads ``location``: a RecordIO ``.rec`` file, WebDataset shards (a ``.tar`` or a
    pattern of them), a folder of images, or a text file listing them."""
    from simcore.isc.shards import is_shard_pattern
    location = os.fspath(location)
    if location.endswith(".rec"):
        return RecordSource(location)
    if is_shard_pattern(location):
        return ShardSource(location)
    return ImageFolderSource(location) if os.path.isdir(location) else ImageListSource(location)
