"""simcore: fused margin-softmax losses over sampled class subsets and exact
cosine top-k search, with a compiled C++/CUDA core.

Public API:
  arcface_partial, cosface_partial, margin_softmax_partial, PartialMarginHead
  cosine_topk, FlatIndex, faiss_index
  set_backend, get_backend, cuda_available
"""
import torch  # noqa: F401  (loads torch's libgomp before the extension: one OpenMP runtime)

from simcore._dispatch import cuda_available, get_backend, set_backend
from simcore.cosine_topk import FlatIndex, cosine_topk, faiss_index
from simcore.margin_softmax import (PartialMarginHead, arcface_partial, cosface_partial,
                                    margin_softmax_partial)
# The copy-detection pipeline (docs/isc.md); kornia/Pillow/h5py/matplotlib load only when used.
from simcore import augment, descriptors, metrics, training  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__", "cuda_available", "get_backend", "set_backend",
    "arcface_partial", "cosface_partial", "margin_softmax_partial", "PartialMarginHead",
    "cosine_topk", "FlatIndex", "faiss_index",
]
