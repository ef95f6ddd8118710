"""Reference exact cosine top-k: ``topk(normalize(q) @ normalize(db).T)``.

Ties are broken by the lower database index (a stable descending sort).
Excluded (query, index) pairs, and slots left when fewer than k candidates
remain, come back as score −inf and index −1. Rows are normalised in float64
(a float32 norm overflows for |x| above ~1.8e19), then rounded to the working dtype.
"""
import torch
import torch.nn.functional as F


def cosine_topk(queries, database, k, *, normalized=False, exclude=None):
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q, db = queries.to(dtype), database.to(dtype)
    if not normalized:
        q = F.normalize(queries.double(), dim=1).to(dtype)
        db = F.normalize(database.double(), dim=1).to(dtype)
    scores = q @ db.T                                               # (Q, N)
    if exclude is not None:                                         # (E, 2): (query row, db index)
        scores[exclude[:, 0], exclude[:, 1]] = float("-inf")
    scores, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    scores, indices = scores[:, :k].float(), indices[:, :k]
    return scores, indices.masked_fill(scores == float("-inf"), -1)
