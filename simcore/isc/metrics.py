"""The Image Similarity Challenge 2021 metrics: micro-average precision and friends.

``evaluate(predictions, ground_truth)`` follows the challenge's evaluation code
(facebookresearch/isc2021, ``isc/metrics.py``) exactly:

- All predictions ``(query_id, reference_id, score)`` of all queries are pooled
  and sorted by score, descending. At equal scores, negatives come before
  positives (the worst case), so constant scores earn nothing.
- Duplicate ``(query_id, reference_id)`` predictions are an error.
- µAP = Σ_i (r_i − r_{i−1})·p_i over that order (r_0 = 0), where p_i is the
  precision of the top i predictions and r_i = (true positives in the top i) /
  (number of ground-truth pairs): ground-truth pairs that are never predicted
  lower the recall.
- recall@P90 = the highest recall at any point where precision ≥ 0.9, or 0 if
  precision never reaches 0.9 (the challenge code returns ``None`` there).
- recall@rank1 / recall@rank10: for each ground-truth pair (q, r), its rank is
  the number of q's predictions whose score is ≥ the score of (q, r), minus 1
  (ties count against it; an unpredicted pair has infinite rank).
  recall@rank-k = (pairs with rank < k) / (number of ground-truth pairs).
  This is ``find_tp_ranks`` in the challenge's code.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence, Tuple

import numpy as np

from simcore.isc.files import atomic_write, save_figure

__all__ = ["Metrics", "evaluate", "read_predictions", "read_ground_truth", "write_predictions",
           "FileFormatError", "plot_precision_recall"]


class FileFormatError(ValueError):
    """A predictions or ground-truth file is malformed; the message names the file and line."""


@dataclass
class Metrics:
    micro_ap: float
    recall_at_p90: float
    threshold_at_p90: Optional[float]
    recall_at_rank1: float
    recall_at_rank10: float
    num_predictions: int
    num_ground_truth: int
    num_true_positives: int
    # The precision-recall curve over the pooled, sorted predictions.
    precisions: np.ndarray = field(repr=False)
    recalls: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)

    def as_dict(self) -> dict:
        """The scalar metrics (JSON-friendly)."""
        return {
            "micro_ap": float(self.micro_ap),
            "recall_at_p90": float(self.recall_at_p90),
            "threshold_at_p90": None if self.threshold_at_p90 is None else float(self.threshold_at_p90),
            "recall_at_rank1": float(self.recall_at_rank1),
            "recall_at_rank10": float(self.recall_at_rank10),
            "num_predictions": int(self.num_predictions),
            "num_ground_truth": int(self.num_ground_truth),
            "num_true_positives": int(self.num_true_positives),
        }

    def plot(self, path, title: str = "precision-recall"):
        """Save the precision-recall curve as an image (PNG by extension); needs matplotlib."""
        plot_precision_recall(self, path, title=title)


def _ground_truth_pairs(ground_truth) -> set:
    pairs = set()
    for row in ground_truth:
        if len(row) != 2:
            raise ValueError(f"ground truth rows must be (query_id, reference_id), got {row!r}")
        q, r = row
        if r is None or r == "":          # a query with no match: no pair
            continue
        pairs.add((q, r))
    return pairs


def _true_positives_within_rank(qids, scores, y_true, ranks):
    """For each k of ``ranks``: how many true positives have fewer than k of their query's predictions
    scored above or equal to them, themselves not counted (ties count against them)."""
    n = len(qids)
    if not n:
        return tuple(0 for _ in ranks)
    codes = {}
    qcode = np.fromiter((codes.setdefault(q, len(codes)) for q in qids), dtype=np.int64, count=n)
    by_q = np.lexsort((-scores, qcode))                 # query asc, score desc
    qc, sc = qcode[by_q], scores[by_q]
    # run = maximal stretch of equal (query, score); its end index + 1 - group start = #(score >= s)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (qc[1:] != qc[:-1]) | (sc[1:] != sc[:-1])
    run_id = np.cumsum(new_run) - 1
    run_end = np.flatnonzero(np.append(new_run[1:], True))   # last index of each run
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = qc[1:] != qc[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = run_end[run_id] - group_start                 # (#preds with score >= s) - 1
    tp = y_true[by_q]
    return tuple(int(np.sum(tp & (rank < k))) for k in ranks)


def evaluate(predictions: Iterable[Tuple[Hashable, Hashable, float]],
             ground_truth: Iterable[Tuple[Hashable, Hashable]]) -> Metrics:
    """µAP, recall@P90, recall@rank1 and recall@rank10 as the challenge defines them.

    ``predictions``: (query_id, reference_id, score) triples, higher score = more
    similar. ``ground_truth``: (query_id, reference_id) pairs; a reference_id of
    ``None`` or ``""`` marks a query with no match (it adds no pair). Ids may be
    strings or ints (compared as given: ``1`` and ``"1"`` differ).
    """
    gt = _ground_truth_pairs(ground_truth)
    if not gt:
        raise ValueError("ground truth has no (query, reference) pairs: recall is undefined")
    preds = list(predictions)
    n = len(preds)
    qids = [None] * n
    y_true = np.zeros(n, dtype=bool)
    scores = np.empty(n, dtype=np.float64)
    seen = set()
    for i, row in enumerate(preds):
        if len(row) != 3:
            raise ValueError(f"predictions must be (query_id, reference_id, score) triples, got {row!r}")
        q, r, s = row
        key = (q, r)
        if key in seen:
            raise ValueError(f"duplicate prediction for the pair (query {q!r}, reference {r!r})")
        seen.add(key)
        s = float(s)
        if math.isnan(s):
            raise ValueError(f"prediction (query {q!r}, reference {r!r}) has a NaN score")
        qids[i], scores[i], y_true[i] = q, s, key in gt

    # Pooled order: score descending, negatives first among equal scores.
    order = np.lexsort((y_true, -scores))
    ys, ss = y_true[order], scores[order]
    ntp = np.cumsum(ys)
    precisions = ntp / np.arange(1, n + 1)
    recalls = ntp / len(gt)
    micro_ap = float(np.sum(np.diff(recalls, prepend=0.0) * precisions)) if n else 0.0
    ok = precisions >= 0.9
    if ok.any():
        best = int(np.argmax(np.where(ok, recalls, -1.0)))
        recall_p90, threshold_p90 = float(recalls[best]), float(ss[best])
    else:
        recall_p90, threshold_p90 = 0.0, None

    rank1, rank10 = _true_positives_within_rank(qids, scores, y_true, (1, 10))
    return Metrics(micro_ap=micro_ap, recall_at_p90=recall_p90, threshold_at_p90=threshold_p90,
                   recall_at_rank1=rank1 / len(gt), recall_at_rank10=rank10 / len(gt),
                   num_predictions=n, num_ground_truth=len(gt), num_true_positives=int(y_true.sum()),
                   precisions=precisions, recalls=recalls, thresholds=ss)


# ---------------------------------------------------------------------------- files

def _csv_rows(path, columns):
    """(line number, row) of each non-blank row of the CSV at ``path``, the header line skipped.

    The file must be UTF-8 text (a byte-order mark is allowed); a binary file, or
    anything the csv module rejects, is a ``FileFormatError`` naming the file.
    """
    what = ",".join(columns)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if reader.line_num == 1 and [c.strip() for c in row] == list(columns):
                    continue
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a UTF-8 text file (a binary file?); expected a CSV {what}") from None
    except csv.Error as e:
        raise FileFormatError(f"{path}: line {reader.line_num}: not a CSV {what} ({e})") from None


def _shorten(text, limit=40):
    return text if len(text) <= limit else text[:limit] + "..."


def _ends_mid_line(path) -> bool:
    """Whether the file's last byte is not a line end (a file cut short by a failed copy or write)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) not in (b"\n", b"\r")


def read_predictions(path) -> list:
    """Read a ``query_id,reference_id,score`` CSV (header optional) into triples of (str, str, float).
    A text file whose last line has no line end is refused: a file cut mid-line would otherwise give
    its last score with digits missing."""
    truncated = os.path.isfile(path) and _ends_mid_line(path)
    try:
        rows = _prediction_rows(path)
    except FileFormatError as e:
        if not truncated or "UTF-8" in str(e):
            raise
        rows = None                       # a broken last row of a truncated file: say it is truncated
    if truncated:
        raise FileFormatError(f"{path}: the last line does not end with a line break: the file looks truncated "
                              "mid-line (if it is whole, end it with a newline)")
    return rows


def _prediction_rows(path) -> list:
    rows = []
    for lineno, row in _csv_rows(path, ("query_id", "reference_id", "score")):
        if len(row) != 3:
            raise FileFormatError(f"{path}: line {lineno}: expected 3 columns "
                                  f"query_id,reference_id,score, got {len(row)}")
        q, r, s = (c.strip() for c in row)
        try:
            score = float(s)
        except ValueError:
            raise FileFormatError(f"{path}: line {lineno}: score {_shorten(s)!r} is not a number") from None
        if math.isnan(score):
            raise FileFormatError(f"{path}: line {lineno}: score is NaN")
        if not q or not r:
            raise FileFormatError(f"{path}: line {lineno}: empty query_id or reference_id")
        rows.append((q, r, score))
    return rows


def read_ground_truth(path) -> list:
    """Read the challenge's ``query_id,reference_id`` CSV; an empty reference_id = no match."""
    rows = []
    for lineno, row in _csv_rows(path, ("query_id", "reference_id")):
        if len(row) != 2:
            raise FileFormatError(f"{path}: line {lineno}: expected 2 columns query_id,reference_id, "
                                  f"got {len(row)}")
        q, r = (c.strip() for c in row)
        if not q:
            raise FileFormatError(f"{path}: line {lineno}: empty query_id")
        rows.append((q, r))
    return rows


def write_predictions(path, predictions: Sequence[Tuple[Hashable, Hashable, float]]):
    """Write triples as the challenge's ``query_id,reference_id,score`` CSV, whole or not at all
    (``simcore.WriteError`` when the write fails; an existing file is then left as it was)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "reference_id", "score"])
        for q, r, s in predictions:
            w.writerow([q, r, repr(float(s))])


def plot_precision_recall(metrics: Metrics, path, title: str = "precision-recall"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting the precision-recall curve needs matplotlib: "
                          "pip install 'simcore[isc]' (or pip install matplotlib)") from e
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(np.concatenate([[0.0], metrics.recalls]),
            np.concatenate([[1.0], metrics.precisions]), lw=1.5)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title}: µAP {metrics.micro_ap:.4f}, recall@P90 {metrics.recall_at_p90:.4f}")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
