"""Where a run's training images come from.

A ``DataSource`` has two steps. ``scan`` lists the items and returns ``TrainingData``: the class of
each item (and how many files it left out). ``dataset`` then serves the items as a map-style
dataset whose item is ``(index, seed)``: ``seed == -1`` asks for the clean image, any other seed for
the augmented copy that seed determines (``simcore.isc.data.ImageDataset`` is the model); it returns
``(uint8 image (3, S, S), label, index, ok)``, ``ok`` False for a sample that could not be decoded
(the trainer drops it from its batch). Everything the trainer does with the data - the seeded stage
batches, the centre embeddings, the DataLoader workers - goes through that item, so a new format
(InsightFace RecordIO, WebDataset shards) is a new ``DataSource`` and one line in ``source_for``.
"""
from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List

import torch

from simcore.isc import data as Dt

__all__ = ["DataSource", "TrainingData", "ImageFolderSource", "ImageListSource", "RecordSource", "source_for"]


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


def source_for(location) -> DataSource:
    """The source that reads ``location``: a RecordIO ``.rec`` file, a folder of images, or a text file
    listing them."""
    location = os.fspath(location)
    if location.endswith(".rec"):
        return RecordSource(location)
    return ImageFolderSource(location) if os.path.isdir(location) else ImageListSource(location)
