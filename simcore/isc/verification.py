"""Face verification as InsightFace measures it: the ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, ...),
10-fold accuracy and TAR at a fixed FAR.

- ``read_bin(path)``: a pickle of ``(bins, issame)``: ``bins`` 2·P encoded images (images 2p and 2p+1
  are pair p), ``issame`` P booleans. It is read with an unpickler that builds nothing but lists,
  tuples, bytes and booleans (a ``.bin`` from elsewhere cannot run code), Python 2 strings as bytes.
- ``kfold_accuracy(dist, issame)``: the pairs, in file order, in 10 contiguous folds (sklearn's
  ``KFold(shuffle=False)``). For each fold, the threshold on the squared L2 distance with the best
  accuracy on the other 9 folds (the first best of InsightFace's grid 0, 0.01, ..., 3.99; a pair is
  "same" when its distance is below it), then the accuracy of the held-out fold at that threshold.
  The result is the mean and standard deviation over the folds (InsightFace's ``calculate_roc``).
- ``tar_at_far(scores, issame, far)``: the true-accept rate at the lowest similarity threshold whose
  false-accept rate (impostor pairs with score ≥ threshold, over all impostor pairs) is ≤ ``far``
  (the ROC's best TPR with FPR ≤ far). With N impostor pairs a FAR below 1/N accepts none of them.
- ``VerificationValidator(path)``: the embedding of each image (with ``flip``, the sum of the
  embeddings of the image and its horizontal mirror, as InsightFace), L2-normalised; then the
  metrics above. ``evaluate(embed_fn)`` returns a dict of floats.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from simcore.isc.encoded import BytesDataset, embed_images
from simcore.isc.files import atomic_write

__all__ = ["VerificationFileError", "read_bin", "write_bin", "kfold_accuracy", "tar_at_far", "verification_metrics",
           "VerificationValidator", "INSIGHTFACE_THRESHOLDS"]

#: InsightFace's threshold grid on the squared L2 distance of unit embeddings (0 to 4).
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)


class VerificationFileError(ValueError):
    """A ``.bin`` file that is not InsightFace's ``(bins, issame)`` pickle."""


class _PairUnpickler(pickle.Unpickler):
    """Builds only plain containers: anything that names a class or a function is refused, except
    ``_codecs.encode`` (how Python 3 writes bytes in pickle protocol 2) and the builtins below."""
    ALLOWED = {("builtins", "list"), ("builtins", "tuple"), ("builtins", "bytes"), ("builtins", "bool"),
               ("builtins", "bytearray"), ("_codecs", "encode"), ("__builtin__", "bytearray")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise VerificationFileError(f"the pickle asks for {module}.{name}, which a verification .bin never holds")
        return super().find_class(module, name)


def read_bin(path) -> Tuple[List[bytes], np.ndarray]:
    """(2·P encoded images, P booleans) of an InsightFace verification ``.bin``."""
    try:
        with open(path, "rb") as f:
            obj = _PairUnpickler(f, encoding="bytes").load()
    except VerificationFileError as e:
        raise VerificationFileError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise VerificationFileError(f"{path}: not a verification .bin pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
            and isinstance(obj[1], (list, tuple))):
        raise VerificationFileError(f"{path}: expected a pickled pair (list of images, list of issame flags)")
    bins, issame = obj
    if not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise VerificationFileError(f"{path}: the image list holds something other than encoded image bytes")
    if not all(isinstance(s, (bool, int)) for s in issame):
        raise VerificationFileError(f"{path}: the issame list holds something other than booleans")
    if len(bins) != 2 * len(issame) or not issame:
        raise VerificationFileError(f"{path}: {len(bins)} images for {len(issame)} pairs (2 per pair expected)")
    return [bytes(b) for b in bins], np.asarray(issame, dtype=bool)


def write_bin(path, bins: Sequence[bytes], issame: Sequence[bool]):
    """Write ``(bins, issame)`` as InsightFace's ``.bin`` (pickle protocol 4), whole or not at all."""
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{len(bins)} images for {len(issame)} pairs (2 per pair expected)")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(s) for s in issame]), f, protocol=4)


def _fold_slices(n: int, folds: int):
    """sklearn ``KFold(folds, shuffle=False)``: contiguous, the first n % folds one item longer."""
    sizes = np.full(folds, n // folds)
    sizes[:n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def kfold_accuracy(dist, issame, *, folds: int = 10, thresholds=INSIGHTFACE_THRESHOLDS) -> Dict[str, float]:
    """{'accuracy', 'accuracy_std', 'threshold'} of InsightFace's k-fold verification on squared
    distances ``dist`` (P,) and labels ``issame`` (P,); 'threshold' is the mean of the folds' thresholds."""
    dist, issame = np.asarray(dist, dtype=np.float64), np.asarray(issame, dtype=bool)
    if dist.shape != issame.shape or dist.ndim != 1:
        raise ValueError(f"distances {dist.shape} and issame {issame.shape} must be matching vectors")
    if not 2 <= folds <= dist.size:
        raise ValueError(f"folds must be in [2, {dist.size}] (the number of pairs), got {folds}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]        # (T, P)
    accs, best = [], []
    for test in _fold_slices(dist.size, folds):
        train = np.ones(dist.size, dtype=bool)
        train[test] = False
        k = int(np.argmax(correct[:, train].mean(1)))                      # first best, as np.argmax there
        accs.append(correct[k, test].mean())
        best.append(thresholds[k])
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "threshold": float(np.mean(best))}


def tar_at_far(scores, issame, far: float) -> Tuple[float, float]:
    """(TAR, threshold): the best true-accept rate over similarity thresholds t (accept: score ≥ t)
    whose false-accept rate is ≤ ``far``; the threshold is inf when no impostor pair may be accepted
    and no genuine pair scores above every impostor."""
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame, dtype=bool)
    pos, neg = int(issame.sum()), int((~issame).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs, got {pos} and {neg}")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last = np.append(s[1:] != s[:-1], True)          # the last pair of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    ok = fp / neg <= far
    if not ok.any():
        return 0.0, float("inf")
    k = int(np.flatnonzero(ok)[-1])                  # tp grows with the index: the last allowed is the best
    return float(tp[k] / pos), float(s[last][k])


def verification_metrics(emb1, emb2, issame, *, folds: int = 10, fars=(1e-3, 1e-4)) -> Dict[str, float]:
    """k-fold accuracy (squared L2 of the L2-normalised embeddings) and TAR at each FAR (cosine)."""
    e1 = F.normalize(torch.as_tensor(emb1, dtype=torch.float64), dim=1)
    e2 = F.normalize(torch.as_tensor(emb2, dtype=torch.float64), dim=1)
    cos = (e1 * e2).sum(1).numpy()
    out = kfold_accuracy(((e1 - e2) ** 2).sum(1).numpy(), issame, folds=folds)
    for far in fars:
        out[f"tar@far={far:g}"] = tar_at_far(cos, issame, far)[0]
    out["pairs"] = float(len(cos))
    return out


class VerificationValidator:
    """One InsightFace ``.bin`` as a validation set: ``evaluate(embed_fn)`` -> dict of floats.

    ``embed_fn(images)`` takes float32 images (N, 3, S, S) in [0, 1] (the input of simcore's
    backbones) and returns embeddings (N, D); it is called under ``torch.no_grad``, batch by batch."""

    def __init__(self, path, *, image_size: int = 112, flip: bool = True, folds: int = 10, batch_size: int = 64,
                 workers: int = 0, fars=(1e-3, 1e-4)):
        self.path = os.fspath(path)
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        bins, self.issame = read_bin(self.path)
        self.dataset = BytesDataset(bins, [0] * len(bins), image_size, name=f"{self.path}: image")
        self.flip, self.folds, self.fars = bool(flip), int(folds), tuple(fars)
        self.batch_size, self.workers = int(batch_size), int(workers)

    def embeddings(self, embed_fn: Callable) -> torch.Tensor:
        """float64 (2P, D): each image's embedding (plus its mirror's, with ``flip``), L2-normalised."""
        return embed_images(self.dataset, embed_fn, batch_size=self.batch_size, workers=self.workers, flip=self.flip)

    def evaluate(self, embed_fn: Callable) -> Dict[str, float]:
        e = self.embeddings(embed_fn)
        return verification_metrics(e[0::2], e[1::2], self.issame, folds=self.folds, fars=self.fars)
