"""simcore.isc.face_backbones: InsightFace's IResNet family and MobileFaceNet, by name."""
import pytest
import torch

from simcore.isc.backbones import BackboneError, backbone_spec, build_backbone
from simcore.isc.face_backbones import FACE_BACKBONES, FaceNormalize, IResNet, MobileFaceNet, build_face_backbone

# Parameter counts at 512 dims and 112 px, as InsightFace's arcface_torch models count them:
# r18 24.0M, r34 34.1M, r50 43.6M, r100 65.2M (its model table), mbf about 2.0M.
EXPECTED_MILLIONS = {"iresnet18": (23.9, 24.1), "iresnet34": (34.0, 34.2), "iresnet50": (43.5, 43.7),
                     "iresnet100": (65.1, 65.3), "mobilefacenet": (1.9, 2.2)}


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_parameter_counts(name):
    with torch.device("meta"):                       # counted without allocating 65M parameters
        model = build_backbone(backbone_spec(name, 512, 112))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    lo, hi = EXPECTED_MILLIONS[name]
    assert lo <= millions <= hi, millions


def test_iresnet_layout():
    m = build_face_backbone("iresnet50", 512)
    assert isinstance(m, IResNet) and isinstance(m.normalize, FaceNormalize)
    assert [len(s) for s in m.stages] == [3, 4, 14, 3]
    block = m.stages[1][0]
    assert [type(layer).__name__ for layer in block.body] == \
        ["BatchNorm2d", "Conv2d", "BatchNorm2d", "PReLU", "Conv2d", "BatchNorm2d"]
    assert block.body[4].stride == (2, 2) and block.body[1].stride == (1, 1)
    assert m.fc.in_features == 512 * 7 * 7 and not m.features.weight.requires_grad
    assert isinstance(m.dropout, torch.nn.Dropout)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_forward_shapes_and_gradients(name, seed):
    g = torch.Generator().manual_seed(seed)
    m = build_backbone(backbone_spec(name, 128, 112)).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 112, 112, generator=g)).shape == (2, 128)
    m = build_backbone(backbone_spec(name, 128, 32)).train()     # gradients at 32 px: seconds on a CPU
    y = m(torch.rand(3, 3, 32, 32, generator=g))
    assert y.shape == (3, 128) and torch.isfinite(y).all()
    y.square().sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    first = next(p for p in m.parameters() if p.requires_grad)
    assert first.grad.abs().sum() > 0                # the gradient reaches the first layer


def test_face_normalisation_is_insightfaces():
    pixels = torch.tensor([0.0, 127.5, 255.0])
    assert torch.equal(FaceNormalize()(pixels / 255), (pixels - 127.5) / 127.5)


def test_image_size_and_pretrained_are_checked():
    assert isinstance(build_backbone(backbone_spec("mobilefacenet", 64, 64)), MobileFaceNet)
    with pytest.raises(BackboneError, match="multiple of 16"):
        build_backbone(backbone_spec("iresnet18", 64, 100))
    with pytest.raises(BackboneError, match="no pretrained weights"):
        build_backbone(backbone_spec("iresnet18", 64, 112, pretrained=True))
