"""Face-recognition backbones with InsightFace's layer layout (``recognition/arcface_torch``), written
here: the IResNet family (``iresnet18/34/50/100``) and MobileFaceNet (``mobilefacenet``).

- IResNet: a 3x3 stem (64 channels, BN, PReLU), four stages of 64/128/256/512 channels whose first
  block has stride 2, each block BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN plus the shortcut (a strided
  1x1 convolution + BN where the shape changes); then BN, dropout, a linear layer from the 512 x 7 x 7
  map (at 112 px) to the embedding, and a BatchNorm1d whose scale is fixed at 1.
- MobileFaceNet (InsightFace's ``mbf``, width scale 2): depthwise-separable bottlenecks (1x1
  expansion, depthwise 3x3, linear 1x1, residual where the shape allows), a 1x1 convolution to 512
  channels, then the global depthwise convolution (a 7x7 depthwise linear convolution), a linear layer
  without bias and BatchNorm1d.

Every model takes float images (N, 3, S, S) in [0, 1], like simcore's other backbones, and starts
with ``FaceNormalize``: (255·x − 127.5) / 127.5, the (x − 127.5)/127.5 of 8-bit pixels InsightFace
uses. Faces are aligned 112 x 112 crops; other sizes that are multiples of 16 work too (the last
map is S/16 square).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["FaceNormalize", "IResNet", "MobileFaceNet", "FACE_BACKBONES", "build_face_backbone"]

#: IResNet depth -> blocks per stage (InsightFace's iresnet18/34/50/100).
IRESNET_LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
                  "iresnet100": (3, 13, 30, 3)}
FACE_BACKBONES = tuple(IRESNET_LAYERS) + ("mobilefacenet",)


class FaceNormalize(nn.Module):
    """[0, 1] images -> (255·x − 127.5) / 127.5 in [−1, 1] (InsightFace's face normalisation)."""

    def forward(self, x):
        return (x * 255.0 - 127.5) / 127.5


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3 (stride) - BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), _conv3x3(cin, cout), nn.BatchNorm2d(cout, eps=1e-5),
                                  nn.PReLU(cout), _conv3x3(cout, cout, stride), nn.BatchNorm2d(cout, eps=1e-5))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """InsightFace's IResNet: stem, four stages of ``IBasicBlock``, BN, dropout, FC, BatchNorm1d."""

    def __init__(self, layers: Sequence[int], dim: int = 512, *, image_size: int = 112, dropout: float = 0.0):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"IResNet needs an image size that is a multiple of 16 (112 for faces), got {image_size}")
        self.normalize = FaceNormalize()
        self.stem = nn.Sequential(_conv3x3(3, 64), nn.BatchNorm2d(64, eps=1e-5), nn.PReLU(64))
        stages, cin = [], 64
        for width, n in zip((64, 128, 256, 512), layers):
            stages.append(nn.Sequential(*[IBasicBlock(cin if i == 0 else width, width, 2 if i == 0 else 1)
                                          for i in range(n)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        side = image_size // 16
        self.bn = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * side * side, dim)
        self.features = nn.BatchNorm1d(dim, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)       # InsightFace fixes the last BN's scale at 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        x = self.stages(self.stem(self.normalize(x)))
        x = self.dropout(torch.flatten(self.bn(x), 1))
        return self.features(self.fc(x))


def _conv_bn(cin, cout, kernel=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.PReLU(cout)) if act else nn.Sequential(*layers)


class DepthWise(nn.Module):
    """1x1 expansion to ``groups`` channels, depthwise 3x3 (stride), linear 1x1; residual when asked."""

    def __init__(self, cin, cout, groups, stride=1, residual=False):
        super().__init__()
        self.residual = residual
        self.body = nn.Sequential(_conv_bn(cin, groups), _conv_bn(groups, groups, 3, stride, groups=groups),
                                  _conv_bn(groups, cout, act=False))

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """InsightFace's MobileFaceNet (``mbf``): blocks (1, 4, 6, 2), width scale 2, GDC head."""

    def __init__(self, dim: int = 512, *, image_size: int = 112, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"MobileFaceNet needs an image size that is a multiple of 16 (112 for faces), "
                             f"got {image_size}")
        c1, c2 = 64 * scale, 128 * scale
        layers = [_conv_bn(3, c1, 3, 2), _conv_bn(c1, c1, 3, 1, groups=c1) if blocks[0] == 1 else
                  self._residual(c1, blocks[0], 128)]
        layers += [DepthWise(c1, c1, 128, 2), self._residual(c1, blocks[1], 128),
                   DepthWise(c1, c2, 256, 2), self._residual(c2, blocks[2], 256),
                   DepthWise(c2, c2, 512, 2), self._residual(c2, blocks[3], 256),
                   _conv_bn(c2, 512)]
        self.normalize = FaceNormalize()
        self.body = nn.Sequential(*layers)
        side = image_size // 16
        self.gdc = _conv_bn(512, 512, side, groups=512, act=False)   # global depthwise convolution
        self.gdc[0].padding = (0, 0)
        self.fc = nn.Linear(512, dim, bias=False)
        self.features = nn.BatchNorm1d(dim)

    @staticmethod
    def _residual(c, n, groups):
        return nn.Sequential(*[DepthWise(c, c, groups, residual=True) for _ in range(n)])

    def forward(self, x):
        x = self.gdc(self.body(self.normalize(x)))
        return self.features(self.fc(torch.flatten(x, 1)))


def build_face_backbone(name: str, dim: int, image_size: int = 112) -> nn.Module:
    """The model called ``name`` (one of ``FACE_BACKBONES``) with ``dim``-dimensional embeddings."""
    if name in IRESNET_LAYERS:
        return IResNet(IRESNET_LAYERS[name], dim, image_size=image_size)
    if name == "mobilefacenet":
        return MobileFaceNet(dim, image_size=image_size)
    raise ValueError(f"unknown face backbone {name!r}; one of {', '.join(FACE_BACKBONES)}")
