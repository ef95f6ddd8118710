"""Exact cosine top-k search.

INTERIM: runs the plain-PyTorch reference; the fused kernel replaces it
(issue: cosine_topk).
"""
import torch

from simcore.reference.cosine_topk import cosine_topk as _reference


def cosine_topk(queries, database, k, *, normalized=False, exclude=None, block_size=None):
    return _reference(queries, torch.as_tensor(database), k, normalized=normalized, exclude=exclude)


class FlatIndex:
    def __init__(self, dim, dtype=torch.float32):
        self.dim, self.dtype = dim, dtype
        self._data = torch.empty(0, dim, dtype=dtype)

    def add(self, x):
        self._data = torch.cat([self._data, x.to(self.dtype)])

    def __len__(self):
        return self._data.shape[0]

    def search(self, queries, k):
        return cosine_topk(queries, self._data, k)


def faiss_index(*args, **kwargs):
    raise NotImplementedError("faiss_index: see the cosine_topk issue")
