"""Images on disk for training and embedding: a folder (or a file list) of images, decoded with
Pillow, augmented one sample at a time in DataLoader workers, reproducibly.

- ``list_images(source)``: the image files of a folder (recursive; .jpg .jpeg .png .webp .bmp,
  sorted) or of a text file listing one path a line (relative paths are relative to the
  list's folder).
- ``scan_images(paths, strict=False)``: decodes each file with Pillow (JPEGs at a reduced scale);
  unreadable files are skipped (counted, with a warning) or, with ``strict=True``, refused. Each real
  file is listed once (link cycles and second paths to a file are skipped); images are decoded
  upright (their EXIF orientation applied).
- ``ImageDataset``: decodes an image, resizes it to ``image_size`` x ``image_size`` and, when
  asked, makes an augmented copy with a per-sample seed. Items are addressed by ``(index,
  seed)`` pairs: ``seed < 0`` is the clean image, otherwise the copy drawn with that seed,
  so a sample's pixels depend on neither the worker that makes it nor the number of workers.
- ``StageBatchSampler``: the batches of one training stage, each a list of ``(index, seed)``,
  computed from (run seed, stage, step) alone: a run resumes at any step by starting the
  sampler there, and a global batch is split between ranks by position.
- ``make_loader``: a DataLoader over those pieces (workers, persistent workers, pinned memory
  on CUDA).

Labels: ``labels="image"`` makes every image its own class (the ISC 2021 recipe);
``labels="folder"`` makes one class per sub-folder of the root (images directly in the root
are refused in that mode).
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "NoImagesError", "CorruptImageError", "DuplicateImageWarning", "LargeImageWarning",
           "list_images", "scan_images", "ImageSet",
           "load_image_set", "decode_image", "decode_image_bytes", "ImageDataset", "StageBatchSampler", "sample_seed", "make_loader",
           "collate", "ListBatchSampler"]

#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class NoImagesError(ValueError):
    """A folder or list without a single (readable) image."""


class CorruptImageError(ValueError):
    """An unreadable image file under ``strict``."""


class DuplicateImageWarning(UserWarning):
    """Paths that lead to an image file already listed (a link, a link cycle, a repeated line): skipped."""


class LargeImageWarning(UserWarning):
    """Images above Pillow's decompression-bomb limit: decoded, but slowly and with much memory."""


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading images needs Pillow: pip install 'simcore[isc]' (or pip install pillow)") from e
    return Image


def _walk_images(source):
    """The image files under folder ``source``, each real file once: a folder reached again through a
    link (a cycle, or a second way in) is not entered again, and of several paths to one file the first
    in sorted order is kept. Returns (paths, count of folders and files skipped as second ways in)."""
    paths, seen_dirs, skipped_dirs = [], set(), 0
    for root, dirs, files in os.walk(source, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:             # entered through a link to a folder already walked
            dirs[:] = []
            skipped_dirs += 1
            continue
        seen_dirs.add(real)
        visible = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in visible if os.path.realpath(os.path.join(root, d)) not in seen_dirs]
        skipped_dirs += len(visible) - len(dirs)          # links back to this folder or above it: cycles
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, f))
    paths.sort(key=lambda p: os.path.relpath(p, source).replace(os.sep, "/"))
    paths, skipped_files = _unique_files(paths)
    return paths, skipped_dirs + skipped_files


def _unique_files(paths):
    """(paths with each real file once, the first kept; how many were dropped)."""
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out, len(paths) - len(out)


def _read_list(source):
    base = os.path.dirname(os.path.abspath(source))
    try:
        with open(source, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise NoImagesError(f"{source}: not a folder nor a UTF-8 text file listing images, one a line") from None
    paths = [line if os.path.isabs(line) else os.path.join(base, line)
             for line in lines if line and not line.startswith("#")]
    if not paths:
        raise NoImagesError(f"{source}: the list names no images")
    return _unique_files(paths)


def list_images(source) -> List[str]:
    """The image files under folder ``source`` (recursive, sorted by relative path; hidden files and
    folders skipped) or listed in text file ``source`` (one path a line; blank lines and lines
    starting with '#' skipped). Each real file is listed once: links and repeated lines that lead to
    a file already listed are skipped, with a ``DuplicateImageWarning``. Raises NoImagesError when
    there are none."""
    source = os.fspath(source)
    if os.path.isdir(source):
        paths, repeats = _walk_images(source)
        if not paths:
            raise NoImagesError(f"{source}: no images (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
    elif os.path.isfile(source):
        paths, repeats = _read_list(source)
    else:
        raise NoImagesError(f"{source}: no such folder or file")
    if repeats:
        warnings.warn(f"{source}: skipped {repeats} link(s) or line(s) leading to folders or image files already "
                      f"listed (each file is read once); {len(paths)} distinct image files", DuplicateImageWarning,
                      stacklevel=2)
    return paths


#: The EXIF tag of the orientation (how to turn the stored pixels upright): ExifTags.Base.Orientation.
_EXIF_ORIENTATION = 0x0112
#: The size the scan decodes JPEGs at: the whole file is still read (a truncation shows), at a fraction of the cost.
_CHECK_SIZE = 64


def _open_decoded(path, size=None):
    """The decoded image of the file ``path`` (``_open_bytes``)."""
    with open(path, "rb") as f:
        return _open_bytes(f.read(), size)


def _open_bytes(data: bytes, size=None):
    """The decoded image of the encoded bytes ``data``, upright (EXIF orientation applied), RGB; ``size``:
    a JPEG may be decoded at a reduced scale no smaller than ``size``. The callers silence Pillow's
    decompression-bomb warning (``scan_images`` reports large images once, as a ``LargeImageWarning``)."""
    Image = _pil()
    from PIL import ImageOps
    im = Image.open(io.BytesIO(data))
    if size is not None and im.format == "JPEG":
        im.draft("RGB", (size, size))
    im.load()                                  # a truncated file fails here
    if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def _check_one(path):
    """(None if ``path`` decodes whole, else the reason; (width, height) or None)."""
    try:
        return None, _open_decoded(path, size=_CHECK_SIZE).size
    except Exception as e:  # noqa: BLE001 - any failure to decode is an unreadable image
        from PIL import UnidentifiedImageError
        if isinstance(e, UnidentifiedImageError):            # its message names our in-memory buffer
            return "not an image file Pillow can identify (empty, or another format)", None
        return f"{type(e).__name__}: {e}", None


def scan_images(paths: Sequence[str], *, strict: bool = False, workers: int = 0, log=None):
    """(readable paths, [(path, reason) of the skipped ones]). Each file is decoded whole (a JPEG at a
    reduced scale), so that a file truncated after its header is dropped here, before the classes are
    fixed. ``strict``: the first unreadable file raises CorruptImageError. Images above Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) give one ``LargeImageWarning``."""
    Image = _pil()
    with warnings.catch_warnings():            # Pillow's warning (two lines per file) is replaced by ours, below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if workers and workers > 1 and len(paths) > 64:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(workers) as ex:
                checked = list(ex.map(_check_one, paths, chunksize=64))
        else:
            checked = [_check_one(p) for p in paths]
    good, bad, large = [], [], []
    for p, (reason, wh) in zip(paths, checked):
        if reason is None:
            good.append(p)
            if Image.MAX_IMAGE_PIXELS and wh[0] * wh[1] > Image.MAX_IMAGE_PIXELS:
                large.append((p, wh))
        elif strict:
            raise CorruptImageError(f"{p}: unreadable image ({reason}); without --strict it would be skipped")
        else:
            bad.append((p, reason))
    if large:
        (p, (w, h)), more = large[0], f" and {len(large) - 1} more" if len(large) > 1 else ""
        warnings.warn(f"{p} ({w}x{h} pixels){more}: larger than Pillow's decompression-bomb limit of "
                      f"{Image.MAX_IMAGE_PIXELS} pixels; decoded anyway (slowly, with much memory)",
                      LargeImageWarning, stacklevel=2)
    if bad:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3])
        msg = f"skipped {len(bad)} unreadable image file(s) of {len(paths)}: {shown}{' ...' if len(bad) > 3 else ''}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if log is not None:
            log(msg)
    return good, bad


@dataclass
class ImageSet:
    """Readable image paths, their class labels and the class names; ``skipped``: [(path, reason)]."""
    root: str
    paths: List[str]
    labels: List[int]
    class_names: List[str]
    skipped: list

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids(self) -> List[str]:
        """Image ids: the path relative to the root (or list folder), without its extension, '/'-separated
        (the file name's stem for a flat folder, as the DISC21 ids Q00001, R000001, T000001)."""
        base = self.root if os.path.isdir(self.root) else os.path.dirname(os.path.abspath(self.root))
        out = []
        for p in self.paths:
            rel = os.path.relpath(os.path.abspath(p), os.path.abspath(base))
            if rel.startswith(".."):
                rel = os.path.basename(p)
            out.append(os.path.splitext(rel)[0].replace(os.sep, "/"))
        return out


def load_image_set(source, *, labels: str = "image", strict: bool = False, workers: int = 0, log=None) -> ImageSet:
    """The images of ``source`` (``list_images``), checked (``scan_images``), labelled: ``"image"``
    (class i = image i in sorted order) or ``"folder"`` (class = first path component under the root,
    classes sorted by name)."""
    if labels not in ("image", "folder"):
        raise ValueError(f"labels must be 'image' or 'folder', got {labels!r}")
    source = os.fspath(source)
    paths, skipped = scan_images(list_images(source), strict=strict, workers=workers, log=log)
    if not paths:
        raise NoImagesError(f"{source}: none of the {len(skipped)} image files could be read "
                            f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if labels == "image":
        names = list(range(len(paths)))
        return ImageSet(source, paths, names, [os.path.basename(p) for p in paths], skipped)
    if not os.path.isdir(source):
        raise ValueError(f"{source}: labels='folder' needs a folder whose sub-folders are the classes")
    groups = []
    for p in paths:
        rel = os.path.relpath(p, source).replace(os.sep, "/")
        if "/" not in rel:
            raise ValueError(f"{p}: with one class per sub-folder, every image must lie in a sub-folder of {source}")
        groups.append(rel.split("/", 1)[0])
    names = sorted(set(groups))
    index = {n: i for i, n in enumerate(names)}
    return ImageSet(source, paths, [index[g] for g in groups], names, skipped)


def decode_image(path, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the image file ``path`` through ``decode_image_bytes``."""
    with open(path, "rb") as f:
        return decode_image_bytes(f.read(), size)


def decode_image_bytes(data: bytes, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the encoded image ``data`` (a file's bytes, a record, a tar member), whole,
    upright (EXIF orientation applied, as photo viewers show it), RGB, resized (bilinear, antialiased) to
    a square. simcore's one image decoder."""
    Image = _pil()
    with warnings.catch_warnings():            # reported once by scan_images, not at every decode
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open_bytes(data, size)
    im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def sample_seed(*key: int) -> int:
    """A 62-bit seed determined by the integers ``key`` (e.g. run seed, stage, step, slot)."""
    a, b = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, np.uint32)
    return (int(a) << 30) ^ int(b)


class ImageDataset(torch.utils.data.Dataset):
    """Items ``(index, seed)`` -> ``(image uint8 (3, S, S), label, index, ok)``.

    ``seed < 0``: the clean image; otherwise ``augment(image, generator=seed)`` (one image,
    on the CPU, in the worker), with ``others`` (for the overlay and picture-in-picture
    transforms) a second image of the set chosen by the same seed and decoded only when
    such a transform is drawn. A file that fails to decode gives ``ok = False`` (a zero
    image; the training loop drops it and counts it) or, with ``strict``, raises."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], image_size: int, augment=None, *,
                 strict: bool = False):
        self.paths, self.labels = list(paths), torch.as_tensor(list(labels), dtype=torch.int64)
        self.image_size, self.augment, self.strict = int(image_size), augment, strict
        self._takes_others = augment is not None and "others" in _parameters(augment)

    def __len__(self):
        return len(self.paths)

    def _decode(self, index):
        try:
            return decode_image(self.paths[index], self.image_size)
        except Exception as e:  # noqa: BLE001 - truncated or otherwise undecodable files
            if self.strict:
                raise CorruptImageError(f"{self.paths[index]}: cannot decode ({type(e).__name__}: {e})") from e
            return None

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, -1)
        index = int(index)
        x = self._decode(index)
        ok = x is not None
        if not ok:
            x = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        elif seed >= 0 and self.augment is not None:
            g = torch.Generator().manual_seed(int(seed))
            other_index = int(np.random.default_rng(int(seed)).integers(len(self.paths)))

            def others():
                o = self._decode(other_index) if other_index != index else None
                return x if o is None else o

            x = self.augment(x, generator=g, others=others) if self._takes_others else self.augment(x, generator=g)
        return x, self.labels[index], index, ok


def _parameters(fn):
    import inspect
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def collate(items):
    """Stack ``ImageDataset`` items: (images (B, 3, S, S) uint8, labels, indices, ok) tensors."""
    xs, ys, idx, ok = zip(*items)
    return torch.stack(xs), torch.stack(list(ys)), torch.tensor(idx), torch.tensor(ok)


class StageBatchSampler(torch.utils.data.Sampler):
    """Batches ``[(index, seed), ...]`` of one training stage.

    Each epoch of the stage visits the stage's items (``items``: dataset indices) in a
    permutation drawn from (run seed, stage, epoch); batch ``step`` of the stage is the slice
    ``[step·B, (step+1)·B)`` of the concatenated epochs (an epoch's short tail is dropped:
    ``B ≤ len(items)``), and the sample at slot j gets augmentation seed
    ``sample_seed(run seed, stage, step, j)``. Rank r of ``world_size`` takes slots
    ``j ≡ r (mod world_size)`` of each global batch. Everything follows from the
    position, so ``configure(start=k)`` resumes exactly at step k."""

    def __init__(self, items: Sequence[int], batch_size: int, *, seed: int = 0, stage: int = 0, start: int = 0,
                 steps: Optional[int] = None, rank: int = 0, world_size: int = 1, augment: bool = True):
        self.configure(items, batch_size, seed=seed, stage=stage, start=start, steps=steps, rank=rank,
                       world_size=world_size, augment=augment)

    def configure(self, items, batch_size, *, seed=0, stage=0, start=0, steps=None, rank=0, world_size=1,
                  augment=True):
        items = torch.as_tensor(list(items) if not isinstance(items, torch.Tensor) else items, dtype=torch.int64)
        if items.numel() == 0:
            raise ValueError("a stage needs at least one item")
        self.items = items
        self.batch_size = min(int(batch_size), items.numel())
        if self.batch_size < world_size:
            raise ValueError(f"a global batch of {self.batch_size} cannot be split between {world_size} ranks")
        self.seed, self.stage, self.start, self.steps = int(seed), int(stage), int(start), steps
        self.rank, self.world_size, self.augment = int(rank), int(world_size), augment
        self._perm_cache = {}

    @property
    def per_epoch(self) -> int:
        return self.items.numel() // self.batch_size

    def _perm(self, epoch):
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.stage, epoch, 0x5EED))
            self._perm_cache = {epoch: self.items[torch.randperm(self.items.numel(), generator=g)]}
        return self._perm_cache[epoch]

    def batch(self, step: int):
        """The global batch of ``step``: [(index, seed)] for every slot (all ranks)."""
        epoch, k = divmod(step, self.per_epoch)
        idx = self._perm(epoch)[k * self.batch_size:(k + 1) * self.batch_size].tolist()
        return [(i, sample_seed(self.seed, self.stage, step, j) if self.augment else -1) for j, i in enumerate(idx)]

    def __iter__(self):
        step = self.start
        while self.steps is None or step < self.start + self.steps:
            yield self.batch(step)[self.rank::self.world_size]
            step += 1

    def __len__(self):
        if self.steps is None:
            raise TypeError("an unbounded stage sampler has no length")
        return self.steps


def make_loader(dataset, batch_sampler, *, workers: int = 0, device: str = "cpu", prefetch: int = 2):
    """A DataLoader of ``dataset`` over ``batch_sampler`` (a StageBatchSampler or any sampler of
    item lists): ``workers`` processes (persistent when > 0, so that reconfiguring the sampler for
    the next stage keeps them), pinned memory when ``device`` is CUDA."""
    kwargs = dict(num_workers=workers, collate_fn=collate, batch_sampler=batch_sampler,
                  pin_memory=str(device).startswith("cuda") and torch.cuda.is_available())
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch)
    return torch.utils.data.DataLoader(dataset, **kwargs)


class ListBatchSampler(torch.utils.data.Sampler):
    """Consecutive batches of ``[(index, -1)]`` (clean images) or given (index, seed) items, in order."""

    def __init__(self, items, batch_size: int):
        self.items, self.batch_size = list(items), int(batch_size)

    def __iter__(self):
        for i in range(0, len(self.items), self.batch_size):
            yield [it if isinstance(it, tuple) else (int(it), -1) for it in self.items[i:i + self.batch_size]]

    def __len__(self):
        return math.ceil(len(self.items) / self.batch_size)

