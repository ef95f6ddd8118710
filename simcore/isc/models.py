"""A trained checkpoint put to work outside training: ``simcore eval-verification``, ``simcore eval-reid``,
``simcore export`` and ``simcore convert`` as Python functions (the command line parses and prints).

- ``evaluate_verification(checkpoint, bins)``: {set name: metrics} of ``VerificationValidator`` on each
  InsightFace ``.bin`` (10-fold accuracy, TAR@FAR).
- ``evaluate_reid(checkpoint, query, gallery)``: ``ReidValidator``'s CMC rank-k and mAP.
- ``export_file(checkpoint, output, format=)``: ``simcore.isc.export.export_checkpoint`` after the checks.
- ``convert_source(source, pattern, ...)``: ``simcore.isc.shards.convert_to_shards`` after the checks.

The checkpoint is read by ``simcore.isc.embed.load_model`` (as ``simcore embed`` reads it); its backbone
spec gives the image size. Every value is checked (``simcore.isc.checks``) before a file is read.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import torch

from simcore.isc import checks

__all__ = ["ModelEmbedder", "evaluate_verification", "evaluate_reid", "export_file", "convert_source",
           "FORMAT_NAMES"]

#: ``simcore export --format`` names -> ``simcore.isc.export.EXPORT_FORMATS``.
FORMAT_NAMES = {"onnx": "onnx", "export": "torch.export"}


class ModelEmbedder:
    """``embed_fn`` of the validators: float32 images in [0, 1] (CPU) -> the model's embeddings on ``device``."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, images):
        return self.model(images.to(self.device)).float()


def _check_common(checkpoint, device, batch_size, workers):
    checks.input_file(None, checkpoint)
    checks.integer("--batch-size", batch_size, 1)
    checks.integer("--workers", workers, 0)
    return checks.device("--device", device)


def _load(checkpoint, device):
    from simcore.isc.embed import load_model
    model, spec = load_model(checkpoint, device)
    return ModelEmbedder(model, device), int(spec["image_size"])


def evaluate_verification(checkpoint, bins: Sequence[str], *, device="cpu", batch_size=64, workers=0, flip=True,
                          folds=10) -> Dict[str, dict]:
    """{name of each ``.bin`` (its file name without extension): its verification metrics}."""
    device = _check_common(checkpoint, device, batch_size, workers)
    if not bins:
        raise checks.ConfigError("BIN must name at least one .bin file (comma-separated for several)")
    for path in bins:
        checks.input_file(None, path)
    names = [os.path.splitext(os.path.basename(p))[0] for p in bins]
    if len(set(names)) != len(names):
        raise checks.ConfigError(f"BIN: two .bin files share a name ({', '.join(names)}); the results are keyed by it")
    from simcore.isc.verification import VerificationValidator
    embed_fn, image_size = _load(checkpoint, device)
    out = {}
    for path in bins:
        v = VerificationValidator(path, image_size=image_size, flip=flip, batch_size=batch_size, workers=workers)
        checks.integer("--folds", folds, 2, len(v.issame))
        v.folds = int(folds)
        out[v.name] = v.evaluate(embed_fn)
    return out


def evaluate_reid(checkpoint, query, gallery, *, device="cpu", batch_size=64, workers=0, flip=False) -> dict:
    """``ReidValidator``'s figures (rank1, rank5, rank10, mAP, queries, ...) of the checkpoint's model."""
    device = _check_common(checkpoint, device, batch_size, workers)
    for what, folder in (("QUERY_DIR", query), ("GALLERY_DIR", gallery)):
        if not os.path.isdir(folder):
            raise checks.ConfigError(f"{what} {folder}: no such folder")
    from simcore.isc.reid import ReidValidator
    embed_fn, image_size = _load(checkpoint, device)
    v = ReidValidator(query, gallery, image_size=image_size, flip=flip, batch_size=batch_size, workers=workers)
    return v.evaluate(embed_fn)


def export_file(checkpoint, output, *, format="onnx") -> str:
    """Write the checkpoint's model (backbone + L2 normalisation) to ``output`` (``FORMAT_NAMES``)."""
    checks.input_file(None, checkpoint)
    checks.choice("--format", format, tuple(FORMAT_NAMES))
    checks.output_file("-o/--output", output, "exported model")
    if format == "onnx":
        try:
            import onnx  # noqa: F401 - torch.onnx.export writes through it
        except ImportError:
            raise checks.ConfigError("--format onnx needs the onnx package: pip install onnx "
                                     "(or --format export for a torch.export archive)") from None
    from simcore.isc.export import export_checkpoint
    with torch.no_grad():
        return export_checkpoint(checkpoint, output, format=FORMAT_NAMES[format])


def convert_source(source, pattern, *, labels="folder", per_shard=1000, strict=False, log=None) -> List[str]:
    """An image folder or a ``.rec`` file (its ``.idx`` beside it) as WebDataset shards ``pattern``."""
    source = os.fspath(source)
    if source.endswith(".rec"):
        checks.input_file(None, source)
    elif not os.path.isdir(source):
        raise checks.ConfigError(f"{source}: neither a folder of images nor a .rec file")
    checks.choice("--labels", labels, ("folder", "image"))
    checks.integer("--per-shard", per_shard, 1)
    if "%" not in pattern:
        raise checks.ConfigError(f"-o/--output {pattern}: the shard pattern needs a %d-style field for the shard "
                                 "number (e.g. shards/train-%06d.tar)")
    try:
        pattern % 0
    except (TypeError, ValueError):
        raise checks.ConfigError(f"-o/--output {pattern}: not a pattern with one integer field "
                                 "(e.g. shards/train-%06d.tar)") from None
    checks.output_file("-o/--output", pattern % 0, "shards")
    from simcore.isc.shards import convert_to_shards
    return convert_to_shards(source, pattern, labels=labels, per_shard=per_shard, strict=strict, log=log)
