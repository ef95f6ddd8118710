"""Backbones for copy-detection descriptors, by name.

- ``"smallcnn"``: :class:`SmallCNN` (in-house, CPU-friendly: stages of 3x3 convolutions, GeM, a
  linear layer; the tests' and the demo's model).
- ``"iresnet18"``, ``"iresnet34"``, ``"iresnet50"``, ``"iresnet100"``, ``"mobilefacenet"``: the
  face-recognition backbones of :mod:`simcore.isc.face_backbones` (InsightFace's layout, 112 px).
- any other name: a `timm <https://github.com/huggingface/pytorch-image-models>`_ model
  (``timm.create_model(name, pretrained=..., num_classes=0, global_pool="")``, its feature map)
  followed by GeM pooling (p = 3, fixed, as the 2nd-place ISC 2021 team) and a linear layer to
  ``dim``, with the model's own input normalisation. timm is imported only when such a name
  is asked for; without it the error names the fix (``pip install timm``).

``pretrained=True`` never downloads: it loads the weights timm would fetch only from where an
earlier download left them (the Hugging Face cache, or torch.hub's ``checkpoints`` folder), and
otherwise raises :class:`BackboneError` saying where it looked.

Every backbone's ``forward`` takes float images (N, 3, H, W) in [0, 1] and returns unnormalised
embeddings (N, dim); the margin loss normalises them in training and ``embed`` L2-normalises at
inference. ``build_backbone(spec)`` rebuilds one from the ``spec`` dict stored in checkpoints.
"""
from __future__ import annotations

from typing import Optional, Sequence

import os
from urllib.parse import urlparse

import torch
from torch import nn

from simcore.isc.face_backbones import FACE_BACKBONES, build_face_backbone

__all__ = ["GeM", "SmallCNN", "TimmBackbone", "build_backbone", "backbone_spec", "BackboneError"]


class BackboneError(ValueError):
    """An unknown backbone name or a missing optional dependency."""


class GeM(nn.Module):
    """Generalised-mean pooling (p = 3 as the 2nd-place team used)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):
        return x.clamp_min(self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CPU-friendly CNN: stages of 3x3 convolutions (the first of each with stride 2), GeM pooling,
    a linear projection. Each image's channel means are removed and it is scaled to unit standard
    deviation first (invariance to brightness and contrast for free). ``forward`` returns unnormalised
    embeddings (the margin loss normalises them)."""

    def __init__(self, embedding_dim: int = 128, widths: Sequence[int] = (32, 64, 128, 256), depth: int = 1):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers.append(_block(cin, w, 2))
            layers += [_block(w, w, 1) for _ in range(depth - 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = GeM()
        self.fc = nn.Linear(cin, embedding_dim)

    def forward(self, x):
        x = x - x.mean((2, 3), keepdim=True)  # per image: channel means removed, unit overall std
        x = x / (x.std((1, 2, 3), keepdim=True) + 1e-2)
        return self.fc(self.pool(self.features(x)))


def _timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing to import inside timm
        raise BackboneError(f"backbones other than 'smallcnn' come from timm, which cannot be imported here "
                            f"({type(e).__name__}: {e}); install it beside your torch (pip install timm, which "
                            f"needs a torchvision matching that torch) or use --backbone smallcnn") from None
    return timm


def local_pretrained_file(name: str) -> str:
    """The file of timm's pretrained weights for ``name`` already on this machine; never downloads."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise BackboneError(f"timm knows no pretrained weights for {name!r} (an unknown model, or one without weights)")
    looked = []
    if getattr(cfg, "file", None):
        looked.append(cfg.file)
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return hit
        looked.append(f"the Hugging Face cache (repository {repo})")
    if getattr(cfg, "url", None):
        looked.append(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path)))
    for path in looked:
        if os.path.isfile(path):
            return path
    raise BackboneError(f"the pretrained weights of {name!r} are not on this machine (looked in: {'; '.join(looked)}); "
                        "simcore never downloads: fetch them once where there is a network "
                        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), "
                        "or train without --pretrained")


class TimmBackbone(nn.Module):
    """A timm model's feature map -> GeM (p = 3, fixed) -> linear to ``dim``."""

    def __init__(self, name: str, dim: int, *, pretrained: bool = False, gem_p: float = 3.0):
        super().__init__()
        timm = _timm()
        weights = {}
        if pretrained:
            weights = dict(pretrained=True, pretrained_cfg_overlay={"file": local_pretrained_file(name)})
        try:
            self.body = timm.create_model(name, num_classes=0, global_pool="", **weights)
        except RuntimeError as e:            # timm: "Unknown model (name)"
            raise BackboneError(f"unknown backbone {name!r}: {e} (timm.list_models() lists them)") from None
        self.pool = GeM(gem_p)
        self.fc = nn.Linear(int(self.body.num_features), dim)
        cfg = getattr(self.body, "pretrained_cfg", None) or getattr(self.body, "default_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        f = self.body.forward_features(x) if hasattr(self.body, "forward_features") else self.body(x)
        if f.dim() == 3:                     # (N, tokens, C) of a transformer: pool the tokens
            f = f.transpose(1, 2).unsqueeze(-1)
        return self.fc(self.pool(f.float()))


def backbone_spec(name: str, dim: int, image_size: int, *, pretrained: bool = False,
                  widths=(32, 64, 128, 256), depth: int = 1) -> dict:
    """The dict that ``build_backbone`` (and a checkpoint) needs to rebuild the model."""
    spec = {"name": name, "dim": int(dim), "image_size": int(image_size)}
    if name == "smallcnn":
        spec.update(widths=list(widths), depth=int(depth))
    else:
        spec.update(pretrained=bool(pretrained))
    return spec


def build_backbone(spec: dict, *, pretrained: Optional[bool] = None) -> nn.Module:
    """The model of a ``backbone_spec`` dict (``pretrained`` overrides the spec's; checkpoints load
    their own weights, so rebuilding never downloads)."""
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise BackboneError(f"a backbone spec needs a name, got {spec!r}")
    dim = int(spec["dim"])
    if name == "smallcnn":
        return SmallCNN(dim, widths=tuple(spec.get("widths", (32, 64, 128, 256))), depth=int(spec.get("depth", 1)))
    if name in FACE_BACKBONES:
        if spec.get("pretrained") if pretrained is None else pretrained:
            raise BackboneError(f"{name} has no pretrained weights in simcore: train it without --pretrained")
        try:
            return build_face_backbone(name, dim, int(spec.get("image_size", 112)))
        except ValueError as e:
            raise BackboneError(str(e)) from None
    return TimmBackbone(name, dim, pretrained=spec.get("pretrained", False) if pretrained is None else pretrained)
