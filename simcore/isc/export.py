"""A trained backbone as a deployable model: the backbone, its embedding layer and L2 normalisation,
exported to ONNX (for onnxruntime, TensorRT, Triton, ...) or as a ``torch.export`` program, with a
dynamic batch size.

The exported model takes float32 RGB images (N, 3, S, S) in [0, 1] (the input of simcore's backbones;
the face backbones normalise to [−1, 1] inside) and returns L2-normalised float32 embeddings (N, D).
Batch-norm layers are in inference mode. Files are written whole or not at all (``files.atomic_write``).
"""
from __future__ import annotations

import io
import os

import torch
import torch.nn.functional as F
from torch import nn

from simcore.isc.files import atomic_write

__all__ = ["EmbeddingModel", "EXPORT_FORMATS", "export_model", "export_checkpoint", "load_exported_program"]

EXPORT_FORMATS = ("onnx", "torch.export")


class EmbeddingModel(nn.Module):
    """``backbone`` followed by L2 normalisation: what ``simcore embed`` computes (without flips)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return F.normalize(self.backbone(images).float(), dim=1)


def _example(image_size: int, batch: int = 2):
    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def export_model(backbone: nn.Module, path, *, image_size: int, format: str = "onnx", opset: int = 18) -> str:
    """Write ``EmbeddingModel(backbone)`` (in eval mode, on the CPU) to ``path`` in ``format``
    ("onnx": input ``images``, output ``embeddings``, dynamic batch axis; "torch.export": a
    ``torch.export.save`` archive, loaded with ``load_exported_program``). Returns ``path``."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    model = EmbeddingModel(backbone).cpu().eval()
    example = (_example(int(image_size)),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    path = os.fspath(path)
    with torch.no_grad(), atomic_write(path) as tmp:
        if format == "onnx":
            program = torch.onnx.export(model, example, input_names=["images"], output_names=["embeddings"],
                                        dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                        verbose=False)
            program.save(tmp)
        else:
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
            buffer = io.BytesIO()                  # torch.export.save wants a .pt2 name, or a buffer
            torch.export.save(program, buffer)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
    return path


def load_exported_program(path) -> nn.Module:
    """The module of a ``torch.export`` archive written by ``export_model`` (a pickle-free format)."""
    return torch.export.load(os.fspath(path)).module()


def export_checkpoint(checkpoint, path, *, format: str = "onnx") -> str:
    """Export the model of a ``simcore train`` checkpoint (its backbone spec gives the image size)."""
    from simcore.isc.embed import load_model
    backbone, spec = load_model(checkpoint)
    return export_model(backbone, path, image_size=int(spec["image_size"]), format=format)
