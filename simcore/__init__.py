"""simcore: fused margin-softmax losses over sampled class subsets and exact
cosine top-k search, with a compiled C++/CUDA core.

Public API:
  arcface_partial, cosface_partial, margin_softmax_partial, PartialMarginHead, sample_classes
  the margin family: cam_softmax_partial, adaface_partial, magface_partial, curricularface_partial,
    subcenter_dominant, CamSchedule, and modules ArcFace, CamSoftmax, AdaFace, MagFace, CurricularFace
  cosine_topk, FlatIndex, FaissIndex, faiss_index
  set_backend, get_backend, cuda_available
  augment, descriptors, metrics, training: the ISC copy-detection pipeline (docs/isc.md)
  distributed (load_resharded; PartialMarginHead(..., process_group=g) shards the centres)
"""
import torch  # noqa: F401  (loads torch's libgomp before the extension: one OpenMP runtime)

from simcore import distributed  # noqa: F401  (class-sharded head: PartialMarginHead(..., process_group=))
from simcore._dispatch import cuda_available, get_backend, set_backend
from simcore.cosine_topk import FaissIndex, FlatIndex, cosine_topk, faiss_index
from simcore.margin_softmax import (PartialMarginHead, arcface_partial, cosface_partial,
                                    margin_softmax_partial, sample_classes)
from simcore.margin_family import (AdaFace, ArcFace, CamSchedule, CamSoftmax, CurricularFace, MagFace,
                                   adaface_partial, cam_softmax_partial, curricularface_partial, magface_partial,
                                   subcenter_dominant)
# The copy-detection pipeline (docs/isc.md); kornia/Pillow/h5py/matplotlib load only when used.
from simcore import augment, descriptors, metrics, training  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__", "cuda_available", "get_backend", "set_backend",
    "arcface_partial", "cosface_partial", "margin_softmax_partial", "PartialMarginHead", "sample_classes",
    "cam_softmax_partial", "adaface_partial", "magface_partial", "curricularface_partial", "subcenter_dominant",
    "CamSchedule", "ArcFace", "CamSoftmax", "AdaFace", "MagFace", "CurricularFace",
    "cosine_topk", "FlatIndex", "FaissIndex", "faiss_index",
]
