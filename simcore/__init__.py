"""simcore: fused margin-softmax losses over sampled class subsets and exact
cosine top-k search, with a compiled C++/CUDA core.

The package has two layers (docs/architecture.md):
  the ops — the names below, from simcore.margin (losses, head, sharded head),
    simcore.search (cosine top-k, indexes), simcore.dispatch and simcore.reference;
  the application — simcore.isc, the ISC 2021 copy-detection pipeline and the
    ``simcore`` command, which uses only the public names below.

Public API:
  arcface_partial, cosface_partial, margin_softmax_partial, PartialMarginHead, sample_classes
  the margin family: cam_softmax_partial, adaface_partial, magface_partial, curricularface_partial,
    subcenter_dominant, CamSchedule, and modules ArcFace, CamSoftmax, AdaFace, MagFace, CurricularFace
  ShardedPartialMarginHead, load_resharded, shard_bounds: the class-sharded head
    (PartialMarginHead(..., process_group=g) shards the centres)
  cosine_topk, FlatIndex, FaissIndex, faiss_index
  atomic_write, WriteError: the one way simcore writes a file (whole or not at all)
  set_backend, get_backend, cuda_available, cuda_status, implementation (which implementation runs the ops),
  cuda_emulation (CPU tensors take the CUDA path: csrc/cuda emulated on the host, for tests)
"""
import torch  # noqa: F401  (loads torch's libgomp before the extension: one OpenMP runtime)

from simcore.files import WriteError, atomic_write
from simcore.dispatch import cuda_available, cuda_emulation, cuda_status, get_backend, implementation, set_backend
from simcore.search.cosine_topk import cosine_topk
from simcore.search.faiss_index import FaissIndex, faiss_index
from simcore.search.flat_index import FlatIndex
from simcore.margin.sampling import sample_classes
from simcore.margin.functional import arcface_partial, cosface_partial, margin_softmax_partial
from simcore.margin.head import PartialMarginHead
from simcore.margin.family import (AdaFace, ArcFace, CamSchedule, CamSoftmax, CurricularFace, MagFace,
                                   adaface_partial, cam_softmax_partial, curricularface_partial, magface_partial,
                                   subcenter_dominant)
from simcore.margin.sharded import ShardedPartialMarginHead, load_resharded, shard_bounds

__version__ = "0.1.0"

__all__ = [
    "__version__", "cuda_available", "cuda_emulation", "cuda_status", "get_backend", "set_backend", "implementation",
    "arcface_partial", "cosface_partial", "margin_softmax_partial", "PartialMarginHead", "sample_classes",
    "cam_softmax_partial", "adaface_partial", "magface_partial", "curricularface_partial", "subcenter_dominant",
    "CamSchedule", "ArcFace", "CamSoftmax", "AdaFace", "MagFace", "CurricularFace",
    "ShardedPartialMarginHead", "load_resharded", "shard_bounds",
    "cosine_topk", "FlatIndex", "FaissIndex", "faiss_index", "atomic_write", "WriteError",
]
