"""FAISS behind simcore's search API, for approximate search at scale: ``faiss_index``
builds any ``faiss.index_factory`` index, ``FaissIndex`` wraps it. FAISS is optional."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from simcore.search.inputs import check_k, check_metric

__all__ = ["FaissIndex", "faiss_index"]


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("simcore.faiss_index needs FAISS: `pip install faiss-cpu` "
                          "(or faiss-gpu on a CUDA machine), or `pip install simcore[faiss]`") from exc
    return faiss


class FaissIndex:
    """A FAISS index behind simcore's search API: ``add``, ``search`` -> (float32 scores,
    int64 indices) tensors with missing results as (-inf, -1), ``len``."""

    def __init__(self, index, metric, device):
        self.index, self.metric, self.device = index, metric, device

    def __len__(self):
        return int(self.index.ntotal)

    def _as_float32_rows(self, x):
        faiss = _import_faiss()
        if isinstance(x, torch.Tensor):
            if not x.dtype.is_floating_point:
                raise TypeError(f"vectors must be floating point, got {x.dtype}")
            x = x.detach().float().cpu().numpy()
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise ValueError(f"expected shape (n, {self.index.d}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or Inf")
        if self.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def add(self, x) -> None:
        x = self._as_float32_rows(x)
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    def search(self, queries, k: int):
        k = check_k(k)
        if k > len(self):
            raise ValueError(f"k={k} exceeds the number of indexed vectors N={len(self)}")
        scores, index = self.index.search(self._as_float32_rows(queries), k)
        scores, index = torch.from_numpy(scores), torch.from_numpy(index)
        scores = scores.masked_fill(index < 0, float("-inf"))
        return scores.to(self.device), index.to(self.device)


def faiss_index(data, kind: str = "HNSW32", *, metric: str = "cosine", device=None, nprobe: Optional[int] = None,
                train_size: Optional[int] = None) -> FaissIndex:
    """Hand ``data`` ((N, D) tensor / array, or an iterable of chunks) to a FAISS index built by
    ``faiss.index_factory(D, kind, inner product)``: e.g. "Flat", "IVF4096,Flat", "IVF1024,PQ32",
    "HNSW32", "PQ32". ``metric="cosine"`` normalises vectors (and queries at search time);
    ``"ip"`` keeps them. IVF/PQ kinds are trained on the first ``train_size`` rows (default:
    the first chunk / all of an in-memory array). ``device="cuda"`` moves the index to the GPU
    where faiss-gpu is installed. FAISS is optional: ImportError says what to install.
    """
    faiss = _import_faiss()
    check_metric(metric)
    chunks = [data] if isinstance(data, (torch.Tensor, np.ndarray)) else list(data)
    if not chunks:
        raise ValueError("faiss_index: no data")
    first = chunks[0]
    if first.ndim != 2 or first.shape[0] == 0:
        raise ValueError(f"faiss_index: data must be (N, D) with N > 0, got shape {tuple(first.shape)}")
    dim = int(first.shape[1])
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    out_device = torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            raise ImportError("faiss_index(device='cuda') needs faiss-gpu; this faiss has no GPU support")
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, torch.device(device).index or 0, index)
        index._simcore_resources = res  # keep the resources alive with the index
        out_device = torch.device(device)
    wrapper = FaissIndex(index, metric, out_device)
    if not index.is_trained:
        sample = wrapper._as_float32_rows(first)
        if train_size is not None:
            sample = sample[:train_size]
        index.train(sample)
    if nprobe is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    for c in chunks:
        wrapper.add(c)
    return wrapper
