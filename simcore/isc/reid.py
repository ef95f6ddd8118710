"""Person re-identification metrics with the Market-1501 conventions: CMC rank-k and mAP.

- File names ``PPPP_cCsS_FFFFFF_NN.jpg`` give the person id ``PPPP`` and the camera ``C``
  (``parse_market_name``). Id -1 marks junk images, left out entirely; id 0 marks distractors,
  which stay in the gallery as non-matches.
- For each query, the gallery images of the same person *and* the same camera are removed; the rest
  is ranked by cosine similarity of the L2-normalised embeddings, descending, equal scores in
  gallery order (a stable sort). A query without a true match left is not counted
  (``queries_without_match``), as in Market's evaluation code and torchreid.
- CMC rank-k: the share of counted queries with a true match among the first k.
- AP of a query: the mean, over its true matches, of the precision at each match's rank; mAP is
  the mean over the counted queries.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from simcore.isc import data as Dt
from simcore.isc.encoded import embed_images

__all__ = ["ReidNameError", "parse_market_name", "reid_metrics", "ReidValidator"]

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


class ReidNameError(ValueError):
    """A file name without Market-1501's ``PPPP_cC`` person and camera."""


def parse_market_name(path) -> Tuple[int, int]:
    """(person id, camera) of a Market-1501 file name (``0002_c1s1_000451_03.jpg`` -> (2, 1))."""
    m = _MARKET_NAME.match(os.path.basename(os.fspath(path)))
    if m is None:
        raise ReidNameError(f"{path}: not a Market-1501 name PPPP_cC... (person id, then _c and the camera)")
    return int(m.group(1)), int(m.group(2))


def reid_metrics(query, gallery, q_pids, q_cams, g_pids, g_cams, *, ranks: Sequence[int] = (1, 5, 10),
                 chunk: int = 256) -> Dict[str, float]:
    """{'rank1', 'rank5', 'rank10', 'mAP', 'queries', 'queries_without_match'} of embeddings ``query``
    (Q, D) against ``gallery`` (G, D) (compared by cosine; junk images must already be left out)."""
    q = F.normalize(torch.as_tensor(query).double(), dim=1)
    g = F.normalize(torch.as_tensor(gallery).double(), dim=1)
    q_pids, q_cams, g_pids, g_cams = (np.asarray(a, dtype=np.int64) for a in (q_pids, q_cams, g_pids, g_cams))
    if q.shape[0] != q_pids.size or g.shape[0] != g_pids.size or q.shape[1] != g.shape[1]:
        raise ValueError(f"embeddings {tuple(q.shape)} / {tuple(g.shape)} do not match {q_pids.size} query and "
                         f"{g_pids.size} gallery ids")
    first_hit, ap = [], []
    for s in range(0, q.shape[0], chunk):
        sim = (q[s:s + chunk] @ g.T).numpy()
        order = np.argsort(-sim, axis=1, kind="stable")
        pid, cam = g_pids[order], g_cams[order]
        qp, qc = q_pids[s:s + chunk, None], q_cams[s:s + chunk, None]
        keep = ~((pid == qp) & (cam == qc))
        hit = (pid == qp) & keep
        rank = np.cumsum(keep, axis=1)                       # 1-based rank among the kept images
        n_rel = hit.sum(1)
        precision = np.where(hit, np.cumsum(hit, axis=1) / np.maximum(rank, 1), 0.0)
        ap.append(precision.sum(1) / np.maximum(n_rel, 1))
        first_hit.append(np.where(n_rel > 0, np.where(hit, rank, np.iinfo(np.int64).max).min(1), 0))
    first_hit, ap = np.concatenate(first_hit), np.concatenate(ap)
    valid = first_hit > 0
    out = {f"rank{k}": float(np.mean(first_hit[valid] <= k)) if valid.any() else 0.0 for k in ranks}
    out["mAP"] = float(ap[valid].mean()) if valid.any() else 0.0
    out["queries"] = float(valid.sum())
    out["queries_without_match"] = float((~valid).sum())
    return out


class _Split:
    """The images of a Market-style folder with their person ids and cameras, junk (-1) left out."""

    def __init__(self, folder, image_size):
        paths = Dt.list_images(folder)
        ids = [parse_market_name(p) for p in paths]
        kept = [i for i, (pid, _) in enumerate(ids) if pid != -1]
        self.paths = [paths[i] for i in kept]
        self.pids = np.array([ids[i][0] for i in kept], dtype=np.int64)
        self.cams = np.array([ids[i][1] for i in kept], dtype=np.int64)
        self.junk = len(paths) - len(kept)
        if not self.paths:
            raise Dt.NoImagesError(f"{folder}: only junk images (person id -1)")
        self.dataset = Dt.ImageDataset(self.paths, self.pids.clip(min=0).tolist(), image_size)


class ReidValidator:
    """A Market-style query and gallery folder as a validation set: ``evaluate(embed_fn)`` -> dict of floats.

    ``embed_fn(images)`` takes float32 images (N, 3, S, S) in [0, 1] and returns embeddings (N, D); it
    is called under ``torch.no_grad``. ``flip``: each embedding plus its mirror image's, before normalising."""

    name = "reid"

    def __init__(self, query_dir, gallery_dir, *, image_size: int = 128, flip: bool = False, batch_size: int = 64,
                 workers: int = 0):
        self.query, self.gallery = _Split(query_dir, image_size), _Split(gallery_dir, image_size)
        self.flip, self.batch_size, self.workers = bool(flip), int(batch_size), int(workers)

    def _embed(self, split, embed_fn):
        return embed_images(split.dataset, embed_fn, batch_size=self.batch_size, workers=self.workers, flip=self.flip)

    def evaluate(self, embed_fn: Callable) -> Dict[str, float]:
        q, g = self._embed(self.query, embed_fn), self._embed(self.gallery, embed_fn)
        out = reid_metrics(q, g, self.query.pids, self.query.cams, self.gallery.pids, self.gallery.cams)
        out["junk"] = float(self.query.junk + self.gallery.junk)
        return out
