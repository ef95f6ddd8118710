"""What a run measures at each stage end.

A ``Validator`` embeds its own images with the current backbone (eval mode, the training device
and precision) and returns a dict of figures; the trainer logs it as a ``name`` event in
``log.jsonl``, sends ``scalars`` to TensorBoard and prints ``describe(result)``. There are three:
copy detection (``--val-dir``), face verification on InsightFace ``.bin`` pairs (``--val-bin``, one
validator a file, named ``val_<file name>``) and re-identification (``--val-reid``, ``val_reid``).
Another is a new class with the same three members, added in ``validators_for``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List

from simcore.isc import data as Dt
from simcore.isc.descriptors import match as match_descriptors
from simcore.isc.embed import autocast_context, embed_dataset
from simcore.isc.metrics import evaluate

__all__ = ["Validator", "CopyDetectionValidator", "FaceVerificationValidator", "ReidRunValidator", "validators_for"]


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


class _Embedder:
    """The validators' ``embed_fn``: images (CPU, float32 in [0, 1]) through ``model`` on ``device`` under
    the run's autocast precision."""

    def __init__(self, model, device, precision):
        self.model, self.device, self.precision = model, device, precision

    def __call__(self, images):
        with autocast_context(self.device, self.precision):
            return self.model(images.to(self.device)).float()


def _evaluate_in_eval_mode(inner, model, device, precision) -> dict:
    was = model.training
    model.eval()
    try:
        return inner.evaluate(_Embedder(model, device, precision))
    finally:
        model.train(was)


class FaceVerificationValidator(Validator):
    """``simcore.isc.verification.VerificationValidator`` on one ``.bin``: 10-fold accuracy, TAR@FAR."""
    scalars = ("accuracy", "tar@far=0.001")

    def __init__(self, path, *, image_size, workers=0):
        from simcore.isc.verification import VerificationValidator
        self.inner = VerificationValidator(path, image_size=image_size, workers=workers)
        self.name = f"val_{self.inner.name}"

    def validate(self, model, *, batch_size, device, precision) -> dict:
        self.inner.batch_size = batch_size
        return _evaluate_in_eval_mode(self.inner, model, device, precision)

    def describe(self, result) -> str:
        return (f"{self.inner.name} accuracy {result['accuracy']:.4f} ± {result['accuracy_std']:.4f}, "
                f"TAR@FAR=1e-3 {result['tar@far=0.001']:.4f} ({int(result['pairs'])} pairs)")


class ReidRunValidator(Validator):
    """``simcore.isc.reid.ReidValidator`` on a query and a gallery folder: CMC rank-k and mAP."""
    name = "val_reid"
    scalars = ("rank1", "rank5", "mAP")

    def __init__(self, query, gallery, *, image_size, workers=0):
        from simcore.isc.reid import ReidValidator
        self.inner = ReidValidator(query, gallery, image_size=image_size, workers=workers)

    def validate(self, model, *, batch_size, device, precision) -> dict:
        self.inner.batch_size = batch_size
        return _evaluate_in_eval_mode(self.inner, model, device, precision)

    def describe(self, result) -> str:
        return (f"re-ID rank-1 {result['rank1']:.4f}, mAP {result['mAP']:.4f} "
                f"({int(result['queries'])} queries)")


def validators_for(c, augment, log=None) -> List[Validator]:
    """The validators that config ``c`` asks for (rank 0 builds them; the others validate nothing)."""
    out = [CopyDetectionValidator.from_config(c, augment, log)] if c.val_dir is not None else []
    out += [FaceVerificationValidator(p, image_size=c.image_size, workers=c.workers) for p in c.val_bins()]
    if c.val_reid:
        query, gallery = c.val_reid_dirs()
        out.append(ReidRunValidator(query, gallery, image_size=c.image_size, workers=c.workers))
    return out
