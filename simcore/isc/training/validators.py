"""What a run measures at each stage end.

A ``Validator`` embeds its own images with the current backbone (eval mode, the training device
and precision) and returns a dict of figures; the trainer logs it as a ``name`` event in
``log.jsonl``, sends ``scalars`` to TensorBoard and prints ``describe(result)``. Today there is the
copy-detection one; a face-verification (pairs, accuracy at the best threshold) or re-identification
(query/gallery, rank-1 and mAP) validator is a new class with the same three members, added in
``validators_for``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List

from simcore.isc import data as Dt
from simcore.isc.descriptors import match as match_descriptors
from simcore.isc.embed import embed_dataset
from simcore.isc.metrics import evaluate

__all__ = ["Validator", "CopyDetectionValidator", "validators_for"]


class Validator(ABC):
    name = "val"                 # the log.jsonl event, the TensorBoard prefix, the stage summary's key
    scalars = ()                 # the result's keys sent to TensorBoard

    @abstractmethod
    def validate(self, model, *, batch_size, device, precision) -> dict:
        """The figures of ``model`` (left in the mode it was in)."""

    @abstractmethod
    def describe(self, result) -> str:
        """One line for the user."""


class CopyDetectionValidator(Validator):
    """µAP / recall@P90 of one augmented copy of each validation image searched among the clean ones."""
    scalars = ("micro_ap", "recall_at_p90", "recall_at_rank1")

    def __init__(self, dataset, num_images, *, seed, workers=0):
        self.dataset, self.num_images, self.seed, self.workers = dataset, num_images, seed, workers

    @classmethod
    def from_config(cls, c, augment, log=None):
        images = Dt.load_image_set(c.val_dir, strict=c.strict, log=log)
        paths, labels = images.paths[:c.val_max], images.labels[:c.val_max]
        dataset = Dt.ImageDataset(paths, labels, c.image_size, augment, strict=c.strict)
        return cls(dataset, len(paths), seed=c.seed, workers=c.workers)

    def validate(self, model, *, batch_size, device, precision) -> dict:
        n = self.num_images
        items = list(range(n))
        copies = [(i, Dt.sample_seed(self.seed, 0x7A1, i)) for i in items]
        kw = dict(batch_size=batch_size, device=device, precision=precision, workers=self.workers)
        refs = embed_dataset(model, self.dataset, items, **kw)
        qs = embed_dataset(model, self.dataset, copies, **kw)
        m = match_descriptors(qs, refs, k=min(10, n), max_results=None)
        ids = [str(i) for i in items]
        metrics = evaluate(m.to_triples([f"q{i}" for i in ids], ids), [(f"q{i}", i) for i in ids])
        return {"micro_ap": metrics.micro_ap, "recall_at_p90": metrics.recall_at_p90,
                "recall_at_rank1": metrics.recall_at_rank1, "images": n}

    def describe(self, result) -> str:
        return f"µAP {result['micro_ap']:.4f}, recall@P90 {result['recall_at_p90']:.4f} ({result['images']} images)"


def validators_for(c, augment, log=None) -> List[Validator]:
    """The validators that config ``c`` asks for (rank 0 builds them; the others validate nothing)."""
    return [CopyDetectionValidator.from_config(c, augment, log)] if c.val_dir is not None else []
