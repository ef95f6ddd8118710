"""Seedable, batched image augmentations of the kinds used to make copies on social media.

Every transform has the signature ``t(images, intensity=1.0, *, generator=None)``:

- ``images``: a float tensor (N, 3, H, W) in [0, 1] (or (3, H, W), or uint8
  0..255: the output has the input's dtype), a PIL image, or a list of PIL
  images / tensors (images of different sizes are processed one by one).
- ``intensity``: a number in [0, 1] or one per image. 0 leaves the image
  unchanged (JPEG at quality 100 is the one near-identity) and 1 is the
  strongest edit; flips are binary (applied when intensity > 0).
- ``generator``: a ``torch.Generator`` (or an int seed) drawing every random
  parameter, so a seed reproduces the output exactly.

Tensors may live on any device (CPU or CUDA): the output stays there. Random
parameters are drawn on the CPU from ``generator`` and moved to the images'
device, so a seed draws the same edit on every device (the pixels agree up to
float rounding); the Pillow-drawn transforms copy the images that draw them to
the CPU and back.

Transforms keep the image size: geometric edits that change it (crops, pads,
frames, picture-in-picture) are rescaled back to the input size, as a model
resizes its input anyway. Geometry, colour and blur run batched on tensors
through kornia; JPEG, text, emoji and meme/screenshot framing draw with Pillow.

``RandomAugment`` composes them like the 2nd-place ISC 2021 team's pipeline:
per image, a random number of randomly chosen transforms with random
intensities, in random order.
"""
from __future__ import annotations

import io
import math
import string
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "crop", "rescale", "hflip", "vflip", "rotate", "perspective", "pad", "color_jitter", "grayscale",
    "blur", "sharpen", "pixelize", "noise", "pixel_shuffle", "jpeg", "overlay_text", "overlay_emoji",
    "overlay_image", "picture_in_picture", "meme", "screenshot", "TRANSFORMS", "RandomAugment",
    "to_tensor", "to_pil",
]


# ------------------------------------------------------------------------------ plumbing

def _kornia():
    try:
        import kornia
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("simcore.isc.augment needs kornia: pip install 'simcore[isc]' (or pip install kornia)") from e
    return kornia


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:  # pragma: no cover
        raise ImportError("simcore.isc.augment needs Pillow: pip install 'simcore[isc]' (or pip install pillow)") from e
    return Image, ImageDraw, ImageFont


def _generator(generator) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _on(t, x):
    """``t`` on ``x``'s device (a no-op on the CPU). Random parameters are drawn on the CPU with the
    CPU generator, then moved: a seed gives the same parameters on every device."""
    return t.to(x.device)


def _uniform(g, n, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _signs(g, n):
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def to_tensor(image) -> torch.Tensor:
    """PIL image -> float (3, H, W) in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def to_pil(x: torch.Tensor):
    """float (3, H, W) in [0, 1] (or uint8) -> PIL RGB image."""
    Image, _, _ = _pil()
    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _intensity(intensity, n) -> torch.Tensor:
    t = torch.as_tensor(intensity, dtype=torch.float32).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"intensity must be a number or one value per image ({n}), got {t.numel()} values")
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise ValueError("intensity must lie in [0, 1]")
    return t.clone()


def _batched(fn):
    """Wrap a batch transform (N,3,H,W float, intensity (N,), generator) for every accepted input."""

    def wrapper(images, intensity=1.0, *, generator=None, **kwargs):
        g = _generator(generator)
        Image, _, _ = _pil() if not isinstance(images, torch.Tensor) else (None, None, None)
        if Image is not None and isinstance(images, Image.Image):
            return to_pil(wrapper(to_tensor(images), intensity, generator=g, **kwargs))
        if isinstance(images, (list, tuple)):
            n = len(images)
            inten = _intensity(intensity, n)
            if n and all(isinstance(im, torch.Tensor) for im in images) and \
                    len({tuple(im.shape) for im in images}) == 1:
                return list(wrapper(torch.stack(list(images)), inten, generator=g, **kwargs).unbind(0))
            return [wrapper(im, inten[i], generator=g, **kwargs) for i, im in enumerate(images)]
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, a PIL image or a list of them, got {type(images).__name__}")
        x = images
        single = x.dim() == 3
        if single:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        dtype = x.dtype
        if dtype == torch.uint8:
            x = x.float() / 255
        elif not x.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1] or uint8, got {dtype}")
        else:
            x = x.float()
        inten = _intensity(intensity, x.shape[0])
        out = fn(x, inten, g, **kwargs) if x.shape[0] else x
        out = out.clamp(0, 1)
        if dtype == torch.uint8:
            out = (out * 255).round().to(torch.uint8)
        else:
            out = out.to(dtype)
        return out[0] if single else out

    wrapper.__name__ = fn.__name__.lstrip("_")
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _paste_scaled(canvas, img, scale_hw, top_left):
    """Paste ``img`` (3,h,w) resized to scale_hw (h', w') into canvas (3,H,W) at top_left (in place)."""
    h, w = scale_hw
    y, x0 = top_left
    canvas[:, y:y + h, x0:x0 + w] = _resize(img[None], (h, w))[0]
    return canvas


# ------------------------------------------------------------------------------ geometry

@_batched
def _crop(x, inten, g):
    """Random crop keeping an area fraction 1 − 0.85·intensity (aspect jittered), rescaled to the input size."""
    n, _, H, W = x.shape
    area = 1 - 0.85 * inten
    log_ar = _uniform(g, n, -1, 1) * math.log(1.5) * inten
    ar = torch.exp(log_ar)
    hs = (torch.sqrt(area / ar) * H).clamp(2, H).round().long()
    ws = (torch.sqrt(area * ar) * W).clamp(2, W).round().long()
    ys, xs = torch.rand(n, generator=g), torch.rand(n, generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        h, w = int(hs[i]), int(ws[i])
        y0, x0 = int(ys[i] * (H - h + 1)), int(xs[i] * (W - w + 1))
        y0, x0 = min(y0, H - h), min(x0, W - w)
        patch = x[i:i + 1, :, y0:y0 + h, x0:x0 + w]
        out[i] = patch[0] if (h, w) == (H, W) else _resize(patch, (H, W))[0]
    return out


@_batched
def _rescale(x, inten, g):
    """Resolution loss: downscale by 1 − 0.85·intensity, then back up to the input size."""
    n, _, H, W = x.shape
    out = x.clone()
    for i in range(n):
        f = 1 - 0.85 * float(inten[i])
        h, w = max(2, round(H * f)), max(2, round(W * f))
        if (h, w) != (H, W):
            out[i] = _resize(_resize(x[i:i + 1], (h, w)), (H, W))[0]
    return out


@_batched
def _hflip(x, inten, g):
    """Horizontal flip (binary: applied where intensity > 0)."""
    return torch.where(_on(inten > 0, x)[:, None, None, None], x.flip(3), x)


@_batched
def _vflip(x, inten, g):
    """Vertical flip (binary: applied where intensity > 0)."""
    return torch.where(_on(inten > 0, x)[:, None, None, None], x.flip(2), x)


def _fill_colours(g, n):
    return torch.rand(n, 3, generator=g)


def _warp(x, M, fill):
    """Warp with per-image 3x3 homographies; outside pixels get the per-image fill colour."""
    K = _kornia()
    n, _, H, W = x.shape
    ones = torch.ones(n, 1, H, W, device=x.device)
    warped = K.geometry.transform.warp_perspective(torch.cat([x, ones], 1), _on(M, x), (H, W), align_corners=True)
    img, mask = warped[:, :3], warped[:, 3:].clamp(0, 1)
    return img + (1 - mask) * _on(fill, x)[:, :, None, None]


@_batched
def _rotate(x, inten, g):
    """Rotation by a random angle of up to ±180°·intensity about the centre; corners get a random colour."""
    K = _kornia()
    n, _, H, W = x.shape
    angle = _signs(g, n) * _uniform(g, n) * 180 * inten
    fill = _fill_colours(g, n)
    centre = torch.tensor([(W - 1) / 2, (H - 1) / 2]).expand(n, 2)
    A = K.geometry.transform.get_rotation_matrix2d(centre, angle, torch.ones(n, 2))
    M = torch.cat([A, torch.tensor([0.0, 0.0, 1.0]).expand(n, 1, 3)], 1)
    out = _warp(x, M, fill)
    return torch.where(_on(inten > 0, x)[:, None, None, None], out, x)


@_batched
def _perspective(x, inten, g):
    """Perspective warp: each corner moves inwards/outwards by up to 0.35·intensity of the size."""
    K = _kornia()
    n, _, H, W = x.shape
    src = torch.tensor([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]], dtype=torch.float32).expand(n, 4, 2)
    jitter = (torch.rand(n, 4, 2, generator=g) * 2 - 1) * 0.35 * inten[:, None, None]
    dst = src + jitter * torch.tensor([W, H], dtype=torch.float32)
    M = K.geometry.transform.get_perspective_transform(src, dst)
    out = _warp(x, M, _fill_colours(g, n))
    return torch.where(_on(inten > 0, x)[:, None, None, None], out, x)


@_batched
def _pad(x, inten, g):
    """Pad each side by up to 0.5·intensity of the size with a random colour, rescaled to the input size."""
    n, _, H, W = x.shape
    sides = torch.rand(n, 4, generator=g) * 0.5 * inten[:, None]
    fill = _fill_colours(g, n)
    out = x.clone()
    for i in range(n):
        t, b = round(float(sides[i, 0]) * H), round(float(sides[i, 1]) * H)
        left, r = round(float(sides[i, 2]) * W), round(float(sides[i, 3]) * W)
        if t == b == left == r == 0:
            continue
        canvas = _on(fill[i], x)[:, None, None].expand(3, H + t + b, W + left + r).clone()
        canvas[:, t:t + H, left:left + W] = x[i]
        out[i] = _resize(canvas[None], (H, W))[0]
    return out


# ------------------------------------------------------------------------------ colour and pixels

@_batched
def _color_jitter(x, inten, g):
    """Brightness ±0.4, contrast and saturation ×(1 ± 0.6), hue ±0.4π, all scaled by intensity."""
    K = _kornia()
    n = x.shape[0]
    b = _signs(g, n) * _uniform(g, n) * 0.4 * inten
    c = 1 + _signs(g, n) * _uniform(g, n) * 0.6 * inten
    s = 1 + _signs(g, n) * _uniform(g, n) * 0.6 * inten
    h = _signs(g, n) * _uniform(g, n) * 0.4 * math.pi * inten
    x = K.enhance.adjust_brightness(x, _on(b, x))
    x = K.enhance.adjust_contrast(x, _on(c, x))
    x = K.enhance.adjust_saturation(x, _on(s, x))
    return K.enhance.adjust_hue(x, _on(h, x))


@_batched
def _grayscale(x, inten, g):
    """Blend towards grayscale: (1 − intensity)·x + intensity·gray(x)."""
    gray = _kornia().color.rgb_to_grayscale(x).expand_as(x)
    w = _on(inten, x)[:, None, None, None]
    return (1 - w) * x + w * gray


def _gaussian(x, sigma):
    K = _kornia()
    smax = float(sigma.max())
    k = int(2 * math.ceil(3 * smax) + 1)
    k = max(3, min(k, 2 * (min(x.shape[-2:]) // 2) - 1))
    return K.filters.gaussian_blur2d(x, (k, k), _on(torch.stack([sigma, sigma], 1), x),
                                     border_type="reflect")


@_batched
def _blur(x, inten, g):
    """Gaussian blur with σ up to 4% of the image size (times intensity)."""
    H, W = x.shape[-2:]
    sigma = (inten * 0.04 * min(H, W)).clamp_min(1e-3)
    out = _gaussian(x, sigma)
    return torch.where(_on(inten > 0, x)[:, None, None, None], out, x)


@_batched
def _sharpen(x, inten, g):
    """Unsharp mask: x + 3·intensity·(x − blur(x)), blur σ = 1 px."""
    soft = _gaussian(x, torch.ones(x.shape[0]))
    return x + 3 * _on(inten, x)[:, None, None, None] * (x - soft)


@_batched
def _pixelize(x, inten, g):
    """Pixelisation: blocks of 1 + intensity·(size/8 − 1) pixels (averaged, then nearest-upsampled)."""
    n, _, H, W = x.shape
    out = x.clone()
    block = (1 + inten * (min(H, W) / 8 - 1)).round().long().clamp_min(1)
    for b in block.unique().tolist():
        if b <= 1:
            continue
        idx = _on((block == b).nonzero().squeeze(1), x)
        small = F.interpolate(x[idx], size=(max(1, H // b), max(1, W // b)), mode="area")
        out[idx] = F.interpolate(small, size=(H, W), mode="nearest")
    return out


@_batched
def _noise(x, inten, g):
    """Additive Gaussian noise, σ = 0.15·intensity."""
    return x + _on(torch.randn(x.shape, generator=g), x) * 0.15 * _on(inten, x)[:, None, None, None]


@_batched
def _pixel_shuffle(x, inten, g):
    """Each pixel swapped with one up to round(4·intensity) pixels away (random displacement field)."""
    n, _, H, W = x.shape
    r = (inten * 4).round()
    dy = ((torch.rand(n, H, W, generator=g) * 2 - 1) * r[:, None, None]).round().long()
    dx = ((torch.rand(n, H, W, generator=g) * 2 - 1) * r[:, None, None]).round().long()
    yy = (torch.arange(H)[None, :, None] + dy).clamp(0, H - 1)
    xx = (torch.arange(W)[None, None, :] + dx).clamp(0, W - 1)
    flat = _on((yy * W + xx).view(n, 1, H * W), x).expand(n, 3, H * W)
    return x.reshape(n, 3, H * W).gather(2, flat).view(n, 3, H, W)


# ------------------------------------------------------------------------------ Pillow-drawn edits

def _per_image_pil(x, inten, fn):
    Image, _, _ = _pil()
    out = x.clone()
    todo = [i for i in range(x.shape[0]) if float(inten[i]) > 0]
    if not todo:
        return out
    # One conversion for the batch (numpy: cheaper than many small torch ops).
    # Pillow draws on the CPU: a CUDA batch's drawn images go there and back.
    arr = (x[todo].clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    res = np.empty_like(arr)
    for j, i in enumerate(todo):
        res[j] = np.asarray(fn(Image.fromarray(arr[j], "RGB"), float(inten[i]), i).convert("RGB"))
    out[todo] = _on(torch.from_numpy(res).permute(0, 3, 1, 2).float() / 255, x)
    return out


@_batched
def _jpeg(x, inten, g):
    """JPEG re-encoding at quality round(100 − 95·intensity) (none at intensity 0)."""
    Image, _, _ = _pil()

    def _jpeg_one(im, t, i):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(round(100 - 95 * t)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")

    return _per_image_pil(x, inten, _jpeg_one)


_FONT_CACHE: Dict[int, object] = {}


def _font(size):
    _, _, ImageFont = _pil()
    size = max(6, int(size))
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType
        except (TypeError, OSError, ImportError):                  # pragma: no cover
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


_ALPHABET = string.ascii_letters + string.digits + "!?#@&%"


def _random_text(g, lo, hi):
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    return "".join(_ALPHABET[int(j)] for j in torch.randint(0, len(_ALPHABET), (n,), generator=g))


def _colour(g):
    return tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))


@_batched
def _overlay_text(x, inten, g):
    """Random text: 1 + round(2·intensity) lines, font height (0.1 + 0.25·intensity)·H, random colour and place."""
    _, ImageDraw, _ = _pil()

    def one(im, t, i):
        W, H = im.size
        draw = ImageDraw.Draw(im)
        for _ in range(1 + round(2 * t)):
            font = _font((0.1 + 0.25 * t) * H)
            text = _random_text(g, 3, 10)
            x0 = int(torch.randint(0, max(1, W // 2), (1,), generator=g))
            y0 = int(torch.randint(0, max(1, H - H // 8), (1,), generator=g))
            draw.text((x0, y0), text, fill=_colour(g), font=font)
        return im

    return _per_image_pil(x, inten, one)


def _draw_emoji(draw, kind, box, colour):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == 0:        # smiley
        draw.ellipse(box, fill=(255, 204, 0), outline=(0, 0, 0))
        e = max(1, w // 8)
        draw.ellipse((x0 + w * 0.3 - e, y0 + h * 0.35 - e, x0 + w * 0.3 + e, y0 + h * 0.35 + e), fill=(0, 0, 0))
        draw.ellipse((x0 + w * 0.7 - e, y0 + h * 0.35 - e, x0 + w * 0.7 + e, y0 + h * 0.35 + e), fill=(0, 0, 0))
        draw.arc((x0 + w * 0.25, y0 + h * 0.35, x0 + w * 0.75, y0 + h * 0.8), 20, 160, fill=(0, 0, 0),
                 width=max(1, w // 12))
    elif kind == 1:      # heart
        r = w / 4
        draw.ellipse((x0, y0, x0 + 2 * r, y0 + 2 * r), fill=colour)
        draw.ellipse((x0 + 2 * r, y0, x1, y0 + 2 * r), fill=colour)
        draw.polygon([(x0, y0 + r * 1.2), (x1, y0 + r * 1.2), (x0 + w / 2, y1)], fill=colour)
    elif kind == 2:      # star
        cx, cy, R = x0 + w / 2, y0 + h / 2, w / 2
        pts = [(cx + (R if k % 2 == 0 else R * 0.45) * math.sin(k * math.pi / 5),
                cy - (R if k % 2 == 0 else R * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=colour, outline=(0, 0, 0))
    else:                # sticker disc
        draw.ellipse(box, fill=colour, outline=(255, 255, 255), width=max(1, w // 10))


@_batched
def _overlay_emoji(x, inten, g):
    """Emoji-like stickers (smiley, heart, star, disc): 1 + round(2·intensity) of size (0.15 + 0.35·intensity)·min(H, W)."""
    _, ImageDraw, _ = _pil()

    def one(im, t, i):
        W, H = im.size
        draw = ImageDraw.Draw(im)
        for _ in range(1 + round(2 * t)):
            s = max(4, int((0.15 + 0.35 * t) * min(W, H)))
            x0 = int(torch.randint(-s // 4, max(1, W - s + s // 4), (1,), generator=g))
            y0 = int(torch.randint(-s // 4, max(1, H - s + s // 4), (1,), generator=g))
            _draw_emoji(draw, int(torch.randint(0, 4, (1,), generator=g)), (x0, y0, x0 + s, y0 + s), _colour(g))
        return im

    return _per_image_pil(x, inten, one)


def _others(x, g, others):
    """Images to combine with: ``others`` if given, else the batch rolled by one (noise for a single image)."""
    n = x.shape[0]
    if others is not None:
        o = others
        if isinstance(o, (list, tuple)):
            o = torch.stack([to_tensor(im) if not isinstance(im, torch.Tensor) else im for im in o])
        if o.dtype == torch.uint8:
            o = o.float() / 255
        o = _on(o.float(), x)
        if o.dim() == 3:
            o = o[None]
        pick = torch.randint(0, o.shape[0], (n,), generator=g)
        o = o[_on(pick, x)]
        if o.shape[-2:] != x.shape[-2:]:
            o = _resize(o, tuple(x.shape[-2:]))
        return o
    if n > 1:
        return x.roll(1, 0)
    return _resize(_on(torch.rand(1, 3, 8, 8, generator=g), x), tuple(x.shape[-2:]))


@_batched
def _picture_in_picture(x, inten, g, backgrounds=None):
    """Overlay onto another image: the copy shrinks to 1 − 0.7·intensity of the size, pasted at a random place
    onto a background (``backgrounds=`` images, or another image of the batch)."""
    n, _, H, W = x.shape
    bg = _others(x, g, backgrounds)
    out = x.clone()
    scale = 1 - 0.7 * inten
    pos = torch.rand(n, 2, generator=g)
    for i in range(n):
        if float(inten[i]) == 0:
            continue
        h, w = max(2, round(H * float(scale[i]))), max(2, round(W * float(scale[i])))
        y0, x0 = int(pos[i, 0] * (H - h)), int(pos[i, 1] * (W - w))
        out[i] = _paste_scaled(bg[i].clone(), x[i], (h, w), (y0, x0))
    return out


@_batched
def _overlay_image(x, inten, g, overlays=None):
    """Another image pasted onto the copy: size 0.5·intensity of the copy, opacity 0.5 + 0.5·intensity."""
    n, _, H, W = x.shape
    ov = _others(x, g, overlays)
    out = x.clone()
    pos = torch.rand(n, 2, generator=g)
    for i in range(n):
        t = float(inten[i])
        h, w = round(H * 0.5 * t), round(W * 0.5 * t)
        if h < 2 or w < 2:
            continue
        y0, x0 = int(pos[i, 0] * (H - h)), int(pos[i, 1] * (W - w))
        a = 0.5 + 0.5 * t
        patch = _resize(ov[i:i + 1], (h, w))[0]
        out[i, :, y0:y0 + h, x0:x0 + w] = (1 - a) * out[i, :, y0:y0 + h, x0:x0 + w] + a * patch
    return out


@_batched
def _meme(x, inten, g):
    """Meme framing: a white caption band of (0.15 + 0.35·intensity)·H above the image, with black text."""
    Image, ImageDraw, _ = _pil()

    def one(im, t, i):
        W, H = im.size
        band = max(2, int((0.15 + 0.35 * t) * H))
        canvas = Image.new("RGB", (W, H + band), (255, 255, 255))
        canvas.paste(im, (0, band))
        draw = ImageDraw.Draw(canvas)
        font = _font(band * 0.45)
        draw.text((max(1, W // 20), band // 4), _random_text(g, 4, 9).upper(), fill=(0, 0, 0), font=font)
        return canvas.resize((W, H), Image.BILINEAR)

    return _per_image_pil(x, inten, one)


@_batched
def _screenshot(x, inten, g):
    """Screenshot framing: the image inside an app window (title bar with buttons and a caption, grey margins,
    a status bar), margins growing with intensity."""
    Image, ImageDraw, _ = _pil()

    def one(im, t, i):
        W, H = im.size
        top = max(2, int((0.08 + 0.2 * t) * H))
        side = int(0.12 * t * W)
        bottom = max(1, int((0.04 + 0.16 * t) * H))
        shade = int(torch.randint(200, 250, (1,), generator=g))
        canvas = Image.new("RGB", (W + 2 * side, H + top + bottom), (shade, shade, shade))
        canvas.paste(im, (side, top))
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, 0, canvas.size[0], top - 1), fill=(40, 40, 48))
        r = max(1, top // 5)
        for j, c in enumerate([(255, 95, 86), (255, 189, 46), (39, 201, 63)]):
            cx = (2 + 3 * j) * r
            draw.ellipse((cx - r, top // 2 - r, cx + r, top // 2 + r), fill=c)
        draw.text((12 * r, top // 4), _random_text(g, 3, 8), fill=(230, 230, 230), font=_font(top * 0.45))
        draw.rectangle((0, top + H, canvas.size[0], canvas.size[1]), fill=(shade - 30,) * 3)
        return canvas.resize((W, H), Image.BILINEAR)

    return _per_image_pil(x, inten, one)


crop, rescale, hflip, vflip, rotate, perspective, pad = _crop, _rescale, _hflip, _vflip, _rotate, _perspective, _pad
color_jitter, grayscale, blur, sharpen, pixelize, noise = _color_jitter, _grayscale, _blur, _sharpen, _pixelize, _noise
pixel_shuffle, jpeg, overlay_text, overlay_emoji = _pixel_shuffle, _jpeg, _overlay_text, _overlay_emoji
overlay_image, picture_in_picture, meme, screenshot = _overlay_image, _picture_in_picture, _meme, _screenshot

#: Every transform by name (21 of them), as used by ``RandomAugment``.
TRANSFORMS: Dict[str, Callable] = {
    "crop": crop, "rescale": rescale, "hflip": hflip, "vflip": vflip, "rotate": rotate,
    "perspective": perspective, "pad": pad, "color_jitter": color_jitter, "grayscale": grayscale,
    "blur": blur, "sharpen": sharpen, "pixelize": pixelize, "noise": noise, "pixel_shuffle": pixel_shuffle,
    "jpeg": jpeg, "overlay_text": overlay_text, "overlay_emoji": overlay_emoji, "overlay_image": overlay_image,
    "picture_in_picture": picture_in_picture, "meme": meme, "screenshot": screenshot,
}


#: The transforms that combine a copy with other images, and the keyword that passes them.
_OTHERS_KEYWORD = {"overlay_image": "overlays", "picture_in_picture": "backgrounds"}


class RandomAugment:
    """A random composition of transforms per image, like the 2nd-place ISC 2021 pipeline.

    For each image: draw a number of transforms in ``num_ops`` (inclusive range),
    pick that many distinct transforms from ``ops`` (names; weights optional),
    each with an intensity uniform in ``intensity``, and apply them in a random
    order. The batch is processed transform by transform over the images that
    drew it, so tensors stay batched. ``always`` names transforms applied first
    to every image (e.g. ``{"crop": (0.0, 0.5)}``).

    >>> aug = RandomAugment(num_ops=(1, 3))
    >>> copies = aug(images, generator=torch.Generator().manual_seed(0))   # doctest: +SKIP
    """

    def __init__(self, ops: Optional[Sequence[str]] = None, *, num_ops=(1, 3), intensity=(0.2, 1.0),
                 weights: Optional[Dict[str, float]] = None, always: Optional[Dict[str, tuple]] = None):
        self.ops = list(TRANSFORMS) if ops is None else list(ops)
        unknown = [o for o in self.ops if o not in TRANSFORMS] + [o for o in (always or {}) if o not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown}; known: {sorted(TRANSFORMS)}")
        lo, hi = num_ops
        if not 0 <= lo <= hi <= len(self.ops):
            raise ValueError(f"num_ops must satisfy 0 <= lo <= hi <= {len(self.ops)}, got {num_ops}")
        if not 0 <= intensity[0] <= intensity[1] <= 1:
            raise ValueError(f"intensity range must lie in [0, 1], got {intensity}")
        self.num_ops, self.intensity, self.always = (lo, hi), tuple(intensity), dict(always or {})
        w = torch.tensor([float((weights or {}).get(o, 1.0)) for o in self.ops])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.weights = w

    def __repr__(self):
        return f"RandomAugment(ops={self.ops}, num_ops={self.num_ops}, intensity={self.intensity})"

    def __call__(self, images: torch.Tensor, *, generator=None, others=None) -> torch.Tensor:
        """Augment a float/uint8 batch (N, 3, H, W) (or (3, H, W); PIL images go through ``to_tensor``).

        ``others``: the images that ``overlay_image`` and ``picture_in_picture`` combine
        the copies with (a tensor (M, 3, h, w) or (3, h, w), or a list), or a function of
        no arguments returning them, called only when one of those transforms is drawn
        (a data loader that augments one image at a time can then decode a second image
        only when it is needed). Default: the batch rolled by one, or noise for a single image."""
        g = _generator(generator)
        Image = None if isinstance(images, torch.Tensor) else _pil()[0]
        if Image is not None and isinstance(images, Image.Image):
            return to_pil(self(to_tensor(images), generator=g, others=others))
        if isinstance(images, (list, tuple)):
            return [self(im, generator=g, others=others) for im in images]
        single = images.dim() == 3
        x = images[None] if single else images
        dtype = x.dtype
        x = x.float() / 255 if dtype == torch.uint8 else x.float().clone()   # never edit the caller's tensor
        n = x.shape[0]
        resolved = []

        def extra(name):               # the keyword that hands ``others`` to a transform combining images
            key = _OTHERS_KEYWORD.get(name)
            if key is None or others is None:
                return {}
            if not resolved:
                resolved.append(others() if callable(others) else others)
            return {key: resolved[0]}

        for name, (lo, hi) in self.always.items():
            x = TRANSFORMS[name](x, _uniform(g, n, lo, hi), generator=g, **extra(name))
        lo, hi = self.num_ops
        counts = torch.randint(lo, hi + 1, (n,), generator=g)
        # plan[i] = this image's ops in order; drawn without replacement by weight
        plan = []
        for i in range(n):
            c = int(counts[i])
            picks = torch.multinomial(self.weights, c, replacement=False, generator=g).tolist() if c else []
            plan.append(picks)
        steps = int(counts.max()) if n else 0
        for step in range(steps):
            for j, name in enumerate(self.ops):
                idx = [i for i in range(n) if len(plan[i]) > step and plan[i][step] == j]
                if not idx:
                    continue
                idx_t = torch.tensor(idx, device=x.device)
                inten = _uniform(g, len(idx), *self.intensity)
                x[idx_t] = TRANSFORMS[name](x[idx_t], inten, generator=g, **extra(name))
        x = x.clamp(0, 1)
        if dtype == torch.uint8:
            x = (x * 255).round().to(torch.uint8)
        else:
            x = x.to(dtype)
        return x[0] if single else x
