"""simcore.isc.augment on CUDA tensors: every transform and RandomAugment take a CUDA batch, return it on
the device with its shape and dtype, are seeded, and draw the same parameters as on the CPU (the random
parameters come from the CPU generator), so the outputs agree with the CPU ones up to float rounding."""
import pytest
import torch

import simcore.isc.augment as A
from conftest import hardware_only  # noqa: E402


def batch(n=5, size=40):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@hardware_only("kornia's augmentations on GPU batches (torch ops, no simcore kernel)")
@pytest.mark.parametrize("name", sorted(A.TRANSFORMS))
def test_every_transform_runs_on_a_cuda_batch(name):
    t = A.TRANSFORMS[name]
    x = batch()
    inten = torch.linspace(0, 1, x.shape[0])
    y = t(x.cuda(), inten, generator=11)
    assert y.is_cuda and y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, t(x.cuda(), inten, generator=11))                 # seeded
    ref = t(x, inten, generator=11)
    assert (y.cpu() - ref).abs().mean() < 2e-3, name                        # the same edit as on the CPU
    x8 = (x * 255).round().to(torch.uint8).cuda()
    y8 = t(x8, 1.0, generator=5)
    assert y8.is_cuda and y8.dtype == torch.uint8 and y8.shape == x8.shape


@hardware_only("kornia's augmentations on GPU batches (torch ops, no simcore kernel)")
def test_random_augment_on_a_cuda_batch():
    x = batch(8)
    aug = A.RandomAugment(num_ops=(1, 3), weights={"overlay_text": 0.5, "screenshot": 0.5, "meme": 0.5})
    y = aug(x.cuda(), generator=4)
    assert y.is_cuda and y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, aug(x.cuda(), generator=torch.Generator().manual_seed(4)))
    assert (y.cpu() - aug(x, generator=4)).abs().mean() < 2e-3
    y8 = aug((x * 255).round().to(torch.uint8).cuda(), generator=4)
    assert y8.is_cuda and y8.dtype == torch.uint8
    bg = torch.zeros(2, 3, 40, 40, device="cuda")
    assert A.picture_in_picture(x.cuda(), 1.0, generator=0, backgrounds=bg).is_cuda
    assert A.overlay_image(x.cuda(), 1.0, generator=0, overlays=torch.ones(3, 20, 20)).is_cuda   # CPU overlays
