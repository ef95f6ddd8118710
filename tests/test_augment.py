"""simcore.isc.augment: determinism, shapes and dtypes, intensity 0 = identity, intensity 1 changes the image."""
import pytest
import torch

import simcore.isc.augment as A
import PIL.Image as PIL


def photo_batch(n=4, size=48):
    """Small crops of a real photograph (smooth regions and edges, unlike noise)."""
    import skimage.data as skdata
    im = torch.from_numpy(skdata.astronaut().copy()).permute(2, 0, 1).float() / 255
    crops = [im[:, 30 + 70 * (i % 6): 30 + 70 * (i % 6) + 96, 100 + 40 * i: 100 + 40 * i + 96] for i in range(n)]
    return torch.nn.functional.interpolate(torch.stack(crops), size=(size, size), mode="area")


NAMES = sorted(A.TRANSFORMS)


def test_the_issue_list_is_covered():
    wanted = {"crop", "rescale", "hflip", "vflip", "rotate", "perspective", "pad", "color_jitter", "grayscale",
              "blur", "sharpen", "pixelize", "jpeg", "overlay_text", "overlay_emoji", "picture_in_picture",
              "overlay_image", "meme", "screenshot"}
    assert wanted <= set(A.TRANSFORMS)
    assert len(A.TRANSFORMS) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_transform_contract(name):
    t = A.TRANSFORMS[name]
    x = photo_batch()
    x0 = x.clone()
    # Deterministic for a seed (int or Generator), batched, shape and dtype kept.
    y1 = t(x, 1.0, generator=123)
    y2 = t(x, 1.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(y1, y2)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.isfinite(y1).all() and y1.min() >= 0 and y1.max() <= 1
    # Intensity 1 changes every image; intensity 0 leaves it unchanged.
    changed = (y1 - x).abs().flatten(1).mean(1)
    assert (changed > 1e-3).all(), f"{name} at intensity 1 left some image nearly unchanged: {changed}"
    torch.testing.assert_close(t(x, 0.0, generator=1), x)
    assert torch.equal(x, x0)
    # Per-image intensities: image 0 untouched, image 1 edited.
    y = t(x[:2], torch.tensor([0.0, 1.0]), generator=5)
    torch.testing.assert_close(y[0], x[0])
    assert (y[1] - x[1]).abs().mean() > 1e-3


@pytest.mark.parametrize("name", ["crop", "rotate", "jpeg", "overlay_text", "meme"])
def test_input_kinds(name):
    t = A.TRANSFORMS[name]
    x = photo_batch(2)
    # uint8 batches come back uint8; a single (3, H, W) image stays single.
    x8 = (x * 255).round().to(torch.uint8)
    y8 = t(x8, 0.7, generator=0)
    assert y8.dtype == torch.uint8 and y8.shape == x8.shape
    assert t(x[0], 0.7, generator=0).shape == x[0].shape
    # PIL in, PIL out (same size); lists of PIL images of different sizes.
    ims = [A.to_pil(x[0]), A.to_pil(torch.nn.functional.interpolate(x[1:2], size=(40, 56))[0])]
    out = t(ims, 0.7, generator=0)
    assert [o.size for o in out] == [im.size for im in ims]
    assert isinstance(t(ims[0], 0.7, generator=0), PIL.Image)


def test_bad_arguments():
    x = photo_batch(2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.blur(x, 1.5)
    with pytest.raises(ValueError, match="one value per image"):
        A.blur(x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        A.blur(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown transforms"):
        A.RandomAugment(["blur", "nope"])


def test_overlays_use_given_images():
    x = photo_batch(2)
    bg = torch.zeros(1, 3, 48, 48)
    y = A.picture_in_picture(x, 1.0, generator=0, backgrounds=bg)
    # The copy shrinks to 30% of the size: most of the frame is the black background.
    assert ((y == 0).all(1).float().mean(dim=(1, 2)) > 0.8).all()
    white = torch.ones(1, 3, 48, 48)
    z = A.overlay_image(x, 1.0, generator=0, overlays=white)
    assert ((z - x).abs().sum(1) > 0).float().mean() > 0.2


def test_random_augment_is_seeded_and_batched():
    x = photo_batch(6)
    x0 = x.clone()
    aug = A.RandomAugment(num_ops=(1, 3))
    a = aug(x, generator=7)
    assert torch.equal(x, x0)                         # the caller's tensor is never edited
    b = aug(x, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert ((a - x).abs().flatten(1).mean(1) > 1e-4).all()
    # num_ops=(0, 0) is the identity; 'always' transforms apply to every image.
    torch.testing.assert_close(A.RandomAugment(num_ops=(0, 0))(x, generator=0), x)
    flipped = A.RandomAugment(["blur"], num_ops=(0, 0), always={"hflip": (1.0, 1.0)})(x, generator=0)
    torch.testing.assert_close(flipped, x.flip(3))
    # uint8 and PIL inputs.
    x8 = (x * 255).round().to(torch.uint8)
    assert aug(x8, generator=1).dtype == torch.uint8
    assert isinstance(aug(A.to_pil(x[0]), generator=1), PIL.Image)
