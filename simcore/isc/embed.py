"""Descriptors of image folders from trained checkpoints (``simcore embed``).

- ``load_model(path)``: the backbone of a ``simcore train`` checkpoint (its ``backbone`` spec
  and ``model`` weights), in eval mode, with its image size.
- ``embed_dataset(model, dataset, items, ...)``: L2-normalised embeddings of dataset items,
  batched, with optional flip test-time augmentation (normalise(f(x) + f(flipped x))).
- ``embed_folders(checkpoints, query=, reference=, train=, pca=, flip=)``: the descriptor
  track's pipeline: one or several checkpoints (an ensemble: each model's L2 embeddings
  concatenated), PCA whitening fitted on the training set's descriptors
  (:class:`simcore.isc.descriptors.PCAWhitening`, eigenvalue power −0.5, then L2), and
  ``write_descriptors`` writes the challenge's HDF5 layout atomically (a temporary file in the
  same folder, then ``os.replace``): datasets ``query``, ``reference``, ``query_ids``,
  ``reference_ids`` and, when a training set is given, ``train`` / ``train_ids``, so that
  ``simcore match out.h5 --train out.h5 --normalize shift`` reads one file.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from simcore.isc import checks
from simcore.isc import data as Dt
from simcore.isc.backbones import BackboneError, build_backbone
from simcore.isc.descriptors import PCAWhitening, l2_normalize
from simcore.isc.files import write_hdf5

__all__ = ["CheckpointError", "EmbedSetupError", "load_checkpoint", "load_model", "embed_dataset", "embedding_sums",
           "check_embed_options", "embed_folders", "write_descriptors", "autocast_context"]

#: The ``format`` entry of a ``simcore train`` checkpoint.
CHECKPOINT_FORMAT = "simcore.isc.train/1"


class CheckpointError(ValueError):
    """A file that is not a usable ``simcore train`` checkpoint."""


class EmbedSetupError(ValueError):
    """Inputs that ``embed_folders`` cannot work with (options, image ids): the user's to fix."""


def load_checkpoint(path, map_location="cpu") -> dict:
    """The dict saved by ``simcore train`` (a pickle: load only files you trust)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # mmap: a single-process run's checkpoint also holds the head (centres + optimizer state,
        # gigabytes at 1M classes); only what is used is read
        ckpt = torch.load(path, map_location=map_location, mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        reason = str(e).split(". ")[0].split("\n")[0]           # torch's messages run to several sentences
        if "mmap can only be used" in reason:
            reason = "not a torch.save zip archive"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a simcore train checkpoint (no format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_model(path, device="cpu"):
    """(model in eval mode on ``device``, its backbone spec) of a checkpoint."""
    ckpt = load_checkpoint(path)
    spec = ckpt["backbone"]
    try:
        model = build_backbone(spec, pretrained=False)
    except BackboneError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), spec


def autocast_context(device, precision):
    """``torch.autocast`` for "bf16" / "fp16", a no-op for "fp32"."""
    if precision == "fp32":
        import contextlib
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def embed_dataset(model, dataset, items, *, batch_size=64, workers=0, device="cpu", precision="fp32",
                  flip=False, progress=False, desc="embed", loader=None) -> torch.Tensor:
    """L2-normalised float32 embeddings (len(items), D) of ``dataset`` items ((index, seed) pairs, or
    indices: clean images), in eval mode, in item order. Undecodable images give zero rows.
    ``loader``: a DataLoader to reuse (its workers) whose batch sampler has a swappable ``inner``
    sampler (simcore.isc.train's stage loader)."""
    was = model.training
    model.eval()
    sampler = Dt.ListBatchSampler(items, batch_size)
    if loader is None:
        loader = Dt.make_loader(dataset, sampler, workers=workers, device=device)
    else:
        loader.batch_sampler.inner = sampler
    it = loader
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(loader, desc=desc, unit="batch", total=len(sampler), leave=False, file=sys.stderr)
    out = [_embed_batch(model, x, ok, device, precision, flip).cpu() for x, _, _, ok in it]
    model.train(was)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def _embed_batch(model, x, ok, device, precision, flip=False):
    """L2-normalised float32 embeddings of a loader batch of uint8 images; rows not ``ok`` are zero."""
    x = x.to(device, non_blocking=True).float().div_(255)
    with autocast_context(device, precision):
        e = model(x).float()
        if flip:
            e = F.normalize(e, dim=1) + F.normalize(model(x.flip(3)).float(), dim=1)
    e = F.normalize(e, dim=1)
    e[~ok.to(e.device)] = 0
    return e


@torch.no_grad()
def embedding_sums(model, batches, first: int, count: int, dim: int, *, device="cpu", precision="fp32"):
    """(sums (count, dim) float32, images per class (count,) int64) on ``device``: the L2-normalised
    embeddings of the ``batches`` (loader batches ``(images, labels, indices, ok)``) added up per label
    ``first .. first + count - 1``, in eval mode; samples not ``ok`` are left out. A streamed data set's
    class means (``simcore.isc.train``'s new centres from WebDataset shards)."""
    was = model.training
    model.eval()
    sums = torch.zeros(count, dim, device=device)
    counts = torch.zeros(count, dtype=torch.int64, device=device)
    for x, y, _, ok in batches:
        e = _embed_batch(model, x, ok, device, precision)
        keep = ok.to(device)
        groups = y.to(device)[keep] - first
        sums.index_add_(0, groups, e[keep])
        counts += torch.bincount(groups, minlength=count)
    model.train(was)
    return sums, counts


def _folder_set(source, what, strict, workers, log):
    try:
        return Dt.load_image_set(source, strict=strict, workers=workers, log=log)
    except Dt.NoImagesError as e:
        raise Dt.NoImagesError(f"{what}: {e}") from None


#: --workers' upper bound: each worker is a process holding a copy of the dataset's state.
MAX_WORKERS = 256


def check_embed_options(checkpoints, *, query, reference, train, pca, batch_size, workers, precision):
    """``embed_folders``' options alone, before a checkpoint or image is read: (batch_size, workers, pca)
    as ints, or ``checks.ConfigError`` / ``EmbedSetupError`` naming the flag."""
    if not checkpoints:
        raise CheckpointError("embed needs at least one checkpoint")
    batch_size = checks.integer("--batch-size", batch_size, 1)
    workers = checks.integer("--workers", workers, 0, MAX_WORKERS)
    pca = None if pca is None else checks.integer("--pca", pca, 1)
    checks.choice("--precision", precision, ("fp32", "bf16", "fp16"))
    if pca is not None and train is None:
        raise EmbedSetupError("--pca is fitted on the training images: give --train")
    if len(checkpoints) > 1 and train is None:
        raise EmbedSetupError("an ensemble of several checkpoints is whitened on the training images: give --train")
    for path in checkpoints:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such checkpoint file")
    for flag, source in (("--query", query), ("--reference", reference), ("--train", train)):
        if source is not None and not os.path.exists(source):
            raise checks.ConfigError(f"{flag} {source}: no such folder or file")
    return batch_size, workers, pca


def _image_sets(query, reference, train, strict, workers, log):
    """{role: ImageSet} of the query, reference and (when given) training images; ids checked."""
    sets = {"query": _folder_set(query, "--query", strict, workers, log),
            "reference": _folder_set(reference, "--reference", strict, workers, log)}
    if train is not None:
        sets["train"] = _folder_set(train, "--train", strict, workers, log)
    for s in sets.values():
        ids = s.ids()
        if len(set(ids)) != len(ids):
            seen = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise EmbedSetupError(f"{s.root}: two images share the id {dup!r} (ids are file names without extension)")
        if any("," in i or "\n" in i for i in ids):
            raise EmbedSetupError(f"{s.root}: image ids (file names) must not contain commas")
    return sets


def embed_folders(checkpoints: Sequence[str], *, query, reference, train=None, pca: Optional[int] = None,
                  flip: bool = False, batch_size: int = 64, workers: int = 0, device: str = "cpu",
                  precision: str = "fp32", strict: bool = False, progress: bool = False,
                  log: Callable = lambda msg: None) -> dict:
    """{"query", "reference", "train" (or None): float32 arrays; "query_ids", "reference_ids",
    "train_ids": lists; "dims": per-model dims; "pca": the fitted PCAWhitening or None}."""
    batch_size, workers, pca = check_embed_options(checkpoints, query=query, reference=reference, train=train,
                                                   pca=pca, batch_size=batch_size, workers=workers,
                                                   precision=precision)
    specs, models = [], []
    for path in checkpoints:
        model, spec = load_model(path, device)
        models.append(model)
        specs.append(spec)
    dims = [s["dim"] for s in specs]
    if len(set(dims)) > 1:
        listing = ", ".join(f"{p} ({d})" for p, d in zip(checkpoints, dims))
        raise CheckpointError(f"the checkpoints have different embedding dims: {listing}; an ensemble concatenates "
                              "models of one dim (train them with the same --dim)")
    sets = _image_sets(query, reference, train, strict, workers, log)
    if (pca is not None or len(checkpoints) > 1) and len(sets["train"].paths) - 1 < (pca or 1):
        # n images span at most n - 1 directions: refused before embedding (checks.pca_fit, after, is exact)
        raise checks.ConfigError(f"--pca {pca}: {len(sets['train'].paths)} training images span at most "
                                 f"{len(sets['train'].paths) - 1} directions; give --pca <= "
                                 f"{len(sets['train'].paths) - 1} or more training images")
    per_model = {role: [] for role in sets}
    for path, model, spec in zip(checkpoints, models, specs):
        for role, s in sets.items():
            ds = Dt.ImageDataset(s.paths, s.labels, spec["image_size"], strict=strict)
            e = embed_dataset(model, ds, list(range(len(s.paths))), batch_size=batch_size, workers=workers,
                              device=device, precision=precision, flip=flip, progress=progress,
                              desc=f"{role} {os.path.basename(path)}")
            per_model[role].append(e)
            log(f"embedded {len(s.paths)} {role} images with {path} ({spec['name']}, {spec['dim']}d)")
    out = {role: torch.cat([l2_normalize(e) for e in es], dim=1) for role, es in per_model.items()}
    fitted = None
    if len(checkpoints) > 1 or pca is not None:
        dim = pca if pca is not None else out["train"].shape[1]
        total = out["train"].shape[1]
        if not 1 <= dim <= total:
            raise EmbedSetupError(f"--pca must lie in [1, {total}] (the concatenated descriptors' dims), got {dim}")
        if out["train"].shape[0] < 2:
            raise EmbedSetupError(f"{train}: PCA whitening needs at least 2 training images")
        fitted = checks.pca_fit("--pca", PCAWhitening(dim).fit(out["train"]), out["train"].shape[0])
        out = {role: fitted.transform(x) for role, x in out.items()}
        log(f"PCA whitening {total} -> {dim} dims, fitted on {out['train'].shape[0]} training descriptors")
    result = {role: l2_normalize(x).numpy().astype(np.float32) for role, x in out.items()}
    result.update({f"{role}_ids": s.ids() for role, s in sets.items()})
    result.setdefault("train", None)
    result["dims"], result["pca"] = dims, fitted
    return result


def write_descriptors(path, result: dict):
    """The challenge HDF5 layout, written whole or not at all (``simcore.isc.files.write_hdf5``):
    an existing file is never left half-written; a failed write raises ``simcore.WriteError``."""
    import h5py
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    roles: List[str] = ["query", "reference"] + (["train"] if result.get("train") is not None else [])
    datasets = {}
    for role in roles:
        datasets[role] = result[role]
        datasets[f"{role}_ids"] = (np.array(result[f"{role}_ids"], dtype=object), h5py.string_dtype())
    write_hdf5(path, datasets)
