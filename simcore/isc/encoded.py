"""Datasets of encoded images held in containers (a RecordIO file, a verification ``.bin``, tar
shards) rather than one file per image, with the item contract of ``simcore.isc.data.ImageDataset``.

- ``decode_image_bytes(data, size)``: ``simcore.isc.data``'s one decoder (``data.decode_image`` reads a
  file and calls it), named here for the container formats.
- ``EncodedImageDataset``: items ``(index, seed)`` -> ``(image uint8 (3, S, S), label, index, ok)``;
  a subclass says where image ``index``'s bytes are (``read``). ``seed < 0`` is the clean image,
  otherwise ``augment(image, generator=seed)`` (with ``others``, a second image chosen by the same
  seed, when the augmentation takes it), so a sample depends on (index, seed) alone, not on the
  worker that makes it. A record that fails to decode gives ``ok = False`` and a zero image (the
  training loop drops and counts it) or, with ``strict``, raises ``CorruptRecordError``.
- ``BytesDataset``: the same over a list of encoded images in memory.
- ``embed_images(dataset, embed_fn)``: the L2-normalised embeddings of a dataset's clean images
  (what the validators of ``verification`` and ``reid`` score).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from simcore.isc import data as Dt
from simcore.isc.data import decode_image_bytes

__all__ = ["CorruptRecordError", "decode_image_bytes", "EncodedImageDataset", "BytesDataset", "embed_images"]


class CorruptRecordError(ValueError):
    """A record or encoded image that cannot be read, under ``strict``."""


def _takes_others(augment) -> bool:
    try:
        return augment is not None and "others" in inspect.signature(augment).parameters
    except (TypeError, ValueError):
        return False


class EncodedImageDataset(torch.utils.data.Dataset):
    """Items ``(index, seed)`` (or ``index``: the clean image) -> ``(image uint8 (3, S, S), label, index,
    ok)``. Subclasses implement ``read(index) -> bytes`` and ``describe(index) -> str`` (for messages)."""

    def __init__(self, labels: Sequence[int], image_size: int, augment=None, *, strict: bool = False):
        self.labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels,
                                      dtype=torch.int64)
        self.image_size, self.augment, self.strict = int(image_size), augment, bool(strict)
        self._augment_takes_others = _takes_others(augment)

    def read(self, index: int) -> bytes:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"item {index}"

    def __len__(self):
        return int(self.labels.numel())

    def decode(self, index: int):
        """The clean image of ``index``, or None when it cannot be read (``strict``: raises)."""
        try:
            return decode_image_bytes(self.read(index), self.image_size)
        except Exception as e:  # noqa: BLE001 - a bad record or image must not stop a run
            if self.strict:
                raise CorruptRecordError(f"{self.describe(index)}: cannot decode ({type(e).__name__}: {e})") from e
            return None

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, -1)
        index, seed = int(index), int(seed)
        x = self.decode(index)
        ok = x is not None
        if not ok:
            x = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        elif seed >= 0 and self.augment is not None:
            x = self._augmented(x, index, seed)
        return x, self.labels[index], index, ok

    def _augmented(self, x, index, seed):
        g = torch.Generator().manual_seed(seed)
        if not self._augment_takes_others:
            return self.augment(x, generator=g)
        other = int(np.random.default_rng(seed).integers(len(self)))

        def others():
            o = self.decode(other) if other != index else None
            return x if o is None else o

        return self.augment(x, generator=g, others=others)


class BytesDataset(EncodedImageDataset):
    """``EncodedImageDataset`` over encoded images held in memory (``blobs[i]`` with ``labels[i]``)."""

    def __init__(self, blobs: Sequence[bytes], labels: Sequence[int], image_size: int, augment=None, *,
                 strict: bool = False, name: str = "image"):
        if len(blobs) != len(labels):
            raise ValueError(f"{len(blobs)} images but {len(labels)} labels")
        super().__init__(labels, image_size, augment, strict=strict)
        self.blobs, self.name = list(blobs), name

    def read(self, index):
        return self.blobs[index]

    def describe(self, index):
        return f"{self.name} {index}"


def embed_images(dataset, embed_fn, *, batch_size: int = 64, workers: int = 0, flip: bool = False) -> torch.Tensor:
    """float64 (N, D): the clean images of ``dataset`` (every item, in order; ``(image, label, index, ok)``
    items) through ``embed_fn`` (float32 images (B, 3, S, S) in [0, 1] -> (B, D), called under
    ``torch.no_grad``), with ``flip`` plus the embedding of the mirror image (summed before
    normalising, InsightFace's test-time flip), L2-normalised. An undecodable image is an error."""
    loader = Dt.make_loader(dataset, Dt.ListBatchSampler(range(len(dataset)), batch_size), workers=workers)
    out = []
    with torch.no_grad():
        for x, _, index, ok in loader:
            if not bool(ok.all()):
                bad = int(index[~ok][0])
                describe = getattr(dataset, "describe", None)
                raise CorruptRecordError(f"{describe(bad) if describe else f'item {bad}'}: cannot decode")
            x = x.float().div_(255)
            e = embed_fn(x).double()
            if flip:
                e = e + embed_fn(x.flip(3)).double()
            out.append(F.normalize(e.cpu(), dim=1))
    return torch.cat(out)
