"""Descriptor post-processing for copy detection (ISC 2021, descriptor track).

- ``l2_normalize``; ``PCAWhitening`` (fitted on an external training set,
  eigenvalue power −0.5 as the 2nd-place team used) and ``ensemble``
  (concatenate several models' embeddings, then whiten-reduce to 256 dims).
- The three external-set normalisations of the top three teams, all driven by
  ``simcore.cosine_topk`` against the training descriptors:
  ``score_normalize`` (the official baseline: score'(q, r) = q·r − β·s_n(q)),
  ``negative_embedding_subtraction`` (1st place) and ``query_shift`` (2nd place);
  ``database_side_augmentation``, the 1st place's smoothing of the training set
  before their subtraction.
- ``match``: the matcher (per-query top-k, then a global cap on the number of
  pairs like the official one), with inner-product or −squared-L2 scores.

Every function here takes torch tensors (float32 or float64; other floating
types are computed in float32) and returns tensors of the same dtype where the
output is an embedding. No statistic is ever computed on the references.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from simcore import cosine_topk

__all__ = ["l2_normalize", "PCAWhitening", "ensemble", "nth_neighbor_similarity", "score_normalize",
           "negative_embedding_subtraction", "database_side_augmentation", "query_shift", "match", "Matches"]


def _float(x, name):
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = _float(x, "x")
    return F.normalize(x, dim=1, eps=eps)


class PCAWhitening:
    """PCA whitening fitted on a training set: y = normalise(((x − μ) V) · λ^power).

    V holds the top ``dim`` eigenvectors of the training covariance (columns, by
    decreasing eigenvalue λ); ``power=-0.5`` is full whitening (the 2nd-place
    team's choice), ``power=0`` plain PCA. Eigenvalues are floored at
    ``eps · λ_max`` so that near-null directions do not explode. The fit runs in
    float64; ``transform`` returns the input's dtype.
    """

    def __init__(self, dim: Optional[int] = 256, *, power: float = -0.5, eps: float = 1e-8,
                 normalize: bool = True):
        self.dim, self.power, self.eps, self.normalize = dim, power, eps, normalize
        self.mean = self.components = self.eigenvalues = None

    def fit(self, train: torch.Tensor) -> "PCAWhitening":
        x = _float(train, "train").double()
        n, d = x.shape
        dim = d if self.dim is None else self.dim
        if not 1 <= dim <= d:
            raise ValueError(f"PCA dim must be in [1, {d}] for {d}-dim inputs, got {dim}")
        if n < 2:
            raise ValueError(f"PCA needs at least 2 training rows, got {n}")
        self.mean = x.mean(0)
        xc = x - self.mean
        cov = xc.T @ xc / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)               # ascending
        evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
        # Fix each eigenvector's sign (largest-magnitude coordinate positive): deterministic output.
        sign = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
        evecs = evecs * torch.where(sign == 0, torch.ones_like(sign), sign)
        self.eigenvalues = evals
        self.components = evecs
        return self

    def varying_dims(self, rel: float = 1e-6) -> int:
        """How many of the fitted dims have a variance above ``rel`` times the largest: n training rows
        span at most n - 1 directions, and whitening the others scales their rounding noise up."""
        if self.eigenvalues is None:
            raise RuntimeError("PCAWhitening.varying_dims called before fit")
        return int((self.eigenvalues > rel * self.eigenvalues[0].clamp_min(1e-300)).sum())

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.components is None:
            raise RuntimeError("PCAWhitening.transform called before fit")
        x = _float(x, "x")
        if x.shape[1] != self.components.shape[0]:
            raise ValueError(f"x has {x.shape[1]} dims, the PCA was fitted on {self.components.shape[0]}")
        lam = self.eigenvalues.clamp_min(self.eps * self.eigenvalues[0].clamp_min(1e-300))
        proj = self.components * lam.pow(self.power)          # (D, dim), scaled columns
        y = (x.double() - self.mean) @ proj
        if self.normalize:
            y = F.normalize(y, dim=1)
        return y.to(x.dtype)

    def fit_transform(self, train: torch.Tensor) -> torch.Tensor:
        return self.fit(train).transform(train)

    __call__ = transform


def ensemble(embeddings: Sequence[torch.Tensor], dim: int = 256, *, train: Optional[Sequence[torch.Tensor]] = None,
             pca: Optional[PCAWhitening] = None, power: float = -0.5, return_pca: bool = False):
    """Combine several models' descriptors of the same images into one ``dim``-dim descriptor.

    Each model's embeddings are L2-normalised and concatenated; the concatenation
    is whitened and reduced by a ``PCAWhitening(dim, power)`` fitted on the same
    concatenation of the *training* set's embeddings (``train``: one tensor per
    model, in the same order), then L2-normalised. Pass ``pca`` (from an earlier
    call with ``return_pca=True``) to apply the same transform to another set.
    """
    if not embeddings:
        raise ValueError("ensemble needs at least one embedding tensor")
    x = torch.cat([l2_normalize(e) for e in embeddings], dim=1)
    if pca is None:
        if train is None:
            raise ValueError("ensemble needs train= (the external set's embeddings, one per model) or pca=")
        if len(train) != len(embeddings):
            raise ValueError(f"train has {len(train)} tensors, embeddings {len(embeddings)}: one per model")
        pca = PCAWhitening(dim, power=power).fit(torch.cat([l2_normalize(t) for t in train], dim=1))
    out = pca.transform(x)
    return (out, pca) if return_pca else out


# ------------------------------------------------------------------ external-set normalisations

def _neighbors(x, train, k, block_size=None):
    """(scores, indices) of each row's k nearest training descriptors (cosine)."""
    if k > train.shape[0]:
        raise ValueError(f"asked for {k} training neighbours but the training set has {train.shape[0]} rows")
    return cosine_topk(x, train, k, normalized=True, block_size=block_size)


def nth_neighbor_similarity(x: torch.Tensor, train: torch.Tensor, n: int = 10) -> torch.Tensor:
    """s_n(x): cosine similarity of each row of x to its n-th nearest training descriptor (1-based)."""
    x, train = l2_normalize(x), l2_normalize(train).to(_float(x, "x").dtype)
    scores, _ = _neighbors(x, train, n)
    return scores[:, n - 1].to(x.dtype)


def score_normalize(scores: torch.Tensor, queries: torch.Tensor, train: torch.Tensor, *,
                    beta: float = 2.0, n: int = 10) -> torch.Tensor:
    """The official baseline's score normalisation: score'(q, r) = score(q, r) − β·s_n(q).

    ``scores`` (Q, k) are inner-product similarities of the queries (rows, in the
    same order as ``queries``) with their candidates; −inf entries stay −inf.
    Defaults β = 2.0, n = 10: the baseline run in the challenge's docs
    (``--factor 2.0 --n 10``). The script itself, ``score_normalization.py``,
    defaults to factor 1.0 and n = −1, so it has to be given both.
    """
    s_n = nth_neighbor_similarity(queries, train, n)
    if scores.dim() != 2 or scores.shape[0] != s_n.shape[0]:
        raise ValueError(f"scores must be (Q, k) with Q = {s_n.shape[0]} queries, got {tuple(scores.shape)}")
    return scores - beta * s_n.to(scores.dtype)[:, None]


def negative_embedding_subtraction(x: torch.Tensor, train: torch.Tensor, *, beta: float = 0.35,
                                   k: int = 10) -> torch.Tensor:
    """1st place: x' = normalise(x − β·mean of x's k nearest training descriptors).

    Inputs are L2-normalised first (x and train); apply it to queries and
    references alike. The 1st place's final script first smooths the training
    set: pass ``train=database_side_augmentation(train)`` (computed once, for
    queries and references both) to do the same.
    """
    x = l2_normalize(x)
    train = l2_normalize(train).to(x.dtype)
    _, idx = _neighbors(x, train, k)
    return F.normalize(x - beta * train[idx].mean(1), dim=1)


def database_side_augmentation(train: torch.Tensor, k: int = 10, alpha: float = 3.0) -> torch.Tensor:
    """Database-side augmentation (DBA) of the training set, as the 1st place's final script.

    t_i' = normalise(Σ_j (t_i·t_j)^α · t_j) over t_i's k nearest training
    descriptors (cosine, found with ``simcore.cosine_topk``), t_i itself
    included, as their script searches the set against itself: k = 10, α = 3.
    Like the script, the weights are not clipped (an odd α keeps the sign of a
    negative similarity) and the sum is not divided by the total weight. The
    search only picks the neighbours; the weights are computed in the input
    dtype. A result that sums to zero stays a zero row.
    """
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    t = l2_normalize(train)
    _, idx = _neighbors(t, t, k)
    out = torch.zeros_like(t)
    for j in range(idx.shape[1]):               # one neighbour rank at a time: no (N, k, D) tensor
        nb = t[idx[:, j]]
        w = (t * nb).sum(1, keepdim=True).pow(alpha)
        if torch.isnan(w).any():
            raise ValueError(f"alpha={alpha} is not an integer and a neighbour similarity is negative: "
                             "sim^alpha is undefined there")
        out += w * nb
    return F.normalize(out, dim=1)


def query_shift(queries: torch.Tensor, train: torch.Tensor, *, k: int = 100, top: int = 3,
                alpha: float = 1.8) -> torch.Tensor:
    """2nd place: shift each query away from its training neighbourhood.

    With t_1..t_k the query's k = 100 nearest training descriptors (cosine),
    d = normalise(mean_i normalise(q − t_i)), c = mean cosine of the ``top`` = 3
    nearest, q' = q + α·√max(c, 0)·d with α = 1.8, *not* re-normalised
    (references are unchanged). Match the result with ``metric="l2"``
    (−squared L2, the official matcher's score): the shift lengthens queries in
    dense regions, which is what lowers their scores.
    """
    q = l2_normalize(queries)
    train = l2_normalize(train).to(q.dtype)
    sims, idx = _neighbors(q, train, k)
    d = F.normalize(F.normalize(q[:, None, :] - train[idx], dim=2).mean(1), dim=1)
    c = sims[:, :top].to(q.dtype).mean(1).clamp_min(0)
    return q + alpha * c.sqrt()[:, None] * d


# ------------------------------------------------------------------------------- matching

@dataclass
class Matches:
    """Matched pairs, sorted by score descending: query row, reference row, score."""
    query: torch.Tensor       # int64 (P,)
    reference: torch.Tensor   # int64 (P,)
    score: torch.Tensor       # float32 (P,)

    def __len__(self):
        return int(self.query.numel())

    def to_triples(self, query_ids=None, reference_ids=None) -> list:
        """[(query_id, reference_id, score)] with the given id lists (default: row numbers)."""
        qi, ri, sc = self.query.tolist(), self.reference.tolist(), self.score.tolist()
        qn = (lambda i: i) if query_ids is None else query_ids.__getitem__
        rn = (lambda i: i) if reference_ids is None else reference_ids.__getitem__
        return [(qn(a), rn(b), s) for a, b, s in zip(qi, ri, sc)]


def match(queries: torch.Tensor, references: torch.Tensor, k: int = 10, *, max_results: Optional[int] = 500_000,
          metric: str = "ip", train: Optional[torch.Tensor] = None, score_norm: Optional[dict] = None,
          block_size: Optional[int] = None, progress: bool = False) -> Matches:
    """Per-query top-k references, pooled and capped to the globally best ``max_results`` pairs.

    ``metric="ip"``: score = q·r (cosine for normalised descriptors).
    ``metric="l2"``: score = −‖q − r‖², the official matcher's score; for
    unit-norm descriptors it ranks exactly like "ip", and it is the right one
    after ``query_shift`` (queries no longer unit-norm).
    References are L2-normalised; queries are used as given (normalise them
    first unless they were shifted on purpose).
    ``score_norm``: e.g. ``{"beta": 2.0, "n": 10}`` applies ``score_normalize``
    against ``train`` to the inner products before pooling.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    q = _float(queries, "queries")
    refs = l2_normalize(references).to(q.dtype)
    k = min(int(k), refs.shape[0])
    if k < 1:
        raise ValueError("match needs k >= 1 and a non-empty reference set")
    chunk = 4096
    all_s, all_i = [], []
    rows = range(0, q.shape[0], chunk)
    if progress:
        from tqdm.auto import tqdm
        rows = tqdm(rows, desc="search", unit="chunk", total=len(rows))
    for start in rows:
        s, i = cosine_topk(q[start:start + chunk], refs, k, normalized=True, block_size=block_size)
        all_s.append(s)
        all_i.append(i)
    scores = torch.cat(all_s) if all_s else torch.empty(0, k)
    idx = torch.cat(all_i) if all_i else torch.empty(0, k, dtype=torch.int64)
    if score_norm is not None:
        if train is None:
            raise ValueError("score_norm needs train= (the external training descriptors)")
        scores = score_normalize(scores, q, train, **score_norm)
    if metric == "l2":
        qn2 = (q.double() ** 2).sum(1, keepdim=True).float()
        scores = 2 * scores - qn2 - 1.0                     # −‖q − r‖² with ‖r‖ = 1
    qrow = torch.arange(q.shape[0])[:, None].expand_as(idx)
    valid = idx >= 0
    qrow, idx, scores = qrow[valid], idx[valid], scores[valid].float()
    order = torch.sort(scores, descending=True, stable=True).indices
    if max_results is not None:
        order = order[:max_results]
    return Matches(query=qrow[order].contiguous(), reference=idx[order].contiguous(),
                   score=scores[order].contiguous())
