"""WebDataset tar shards (the ``webdataset`` library): a training stream over a shard pattern, and the
shard writer behind converting an image folder or a RecordIO pair.

Reading (``ShardDataset``, an IterableDataset of ``EncodedImageDataset``-style items
``(image uint8 (3, S, S), label, index, ok)``):

- ``shards/train-{000000..000099}.tar`` is expanded with webdataset's brace expansion; every shard
  must be a local file. A sample is the tar members sharing a key: one image (``.jpg``, ``.jpeg``,
  ``.png``, ``.webp`` or ``.bmp``) and, with ``labels="cls"``, a ``.cls`` member holding the class
  index as text; with ``labels="stem"`` the label is the integer before the first ``_`` of the key's
  file name (``0042_000017`` -> 42; Market-1501 names give the person id).
- Epoch e visits the shards in an order drawn from (seed, e). Rank r of R takes every R-th shard of
  that order and DataLoader worker w of W every W-th of the rank's: ranks and workers read disjoint
  shards (at least R·W shards are needed). Each worker goes through its shards in order, epoch
  after epoch, without end: training is counted in steps.
- The sample at position p of shard k in epoch e is augmented with seed ``sample_seed(seed, e, k, p)``
  and carries ``index = encode_index(e, k, p)``: its pixels depend on neither the worker nor the
  worker count.

Resume (``ShardProgress``): the training loop passes each batch's indices to
``ShardProgress.update``; its ``state_dict()`` (the count of samples taken from each (epoch, shard))
goes into the checkpoint, and ``ShardDataset(..., resume=state)`` skips those samples. Since each
(epoch, shard) is read in order by one worker, what was trained on is a prefix of it, so a resumed
run trains on exactly the samples, with exactly the augmented pixels, that the interrupted run had
not reached, whatever the new worker count; nothing is replayed and nothing lost. How those
samples are grouped into batches after the resume is reproduced only with the same worker count:
the DataLoader takes batches from its workers in turn and restarts that turn at worker 0, so the
resumed run passes ``worker_offset`` (steps taken mod workers) to continue it; with another worker
count the batches, and so the losses, differ. Samples that workers had prefetched but the loop had
not trained on are read again.

Scanning (``scan_shards``): every shard's sample count and the readable samples' labels, read
once before training (``simcore.isc.training.sources.ShardSource``), shared between torchrun's ranks.

Writing (``write_shards``, ``shards_from_folder``, ``shards_from_records``): samples ``key.jpg`` (the
encoded bytes as they were, no re-encoding) + ``key.cls``, ``per_shard`` samples a shard, each
shard written whole or not at all (``files.atomic_write``) with webdataset's ``TarWriter``.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from simcore.isc import data as Dt
from simcore.isc.encoded import CorruptRecordError, decode_image_bytes
from simcore.isc.files import atomic_write
from simcore.isc.recordio import RecordDataset

__all__ = ["ShardError", "expand_shards", "encode_index", "decode_index", "ShardDataset", "ShardProgress",
           "ShardScan", "scan_shards", "is_shard_pattern",
           "write_shards", "shards_from_folder", "shards_from_records", "convert_to_shards", "IMAGE_MEMBERS"]

#: Tar member extensions read as the sample's image.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp")
_SHARD_BITS, _POS_BITS = 20, 28


class ShardError(ValueError):
    """A shard pattern, shard or sample that cannot be read."""


def _wds():
    try:
        import webdataset
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("WebDataset shards need the webdataset package: pip install 'simcore[isc]' "
                          "(or pip install webdataset)") from e
    return webdataset


def is_shard_pattern(location) -> bool:
    """Whether a training location names WebDataset shards: a ``.tar`` file or a pattern of them."""
    return os.fspath(location).endswith(".tar")


def expand_shards(pattern: str) -> List[str]:
    """The shard files of ``pattern`` (brace expansion ``{000000..000099}``; ``::`` separates patterns)."""
    paths = _wds().shardlists.expand_urls(os.fspath(pattern))
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise ShardError(f"{pattern}: {len(missing)} of {len(paths)} shard files are missing (first: "
                         f"{missing[0] if missing else 'none named'}); shards must be local files")
    return paths


def encode_index(epoch: int, shard: int, position: int) -> int:
    """One int64 naming a sample: epoch, shard number (< 2^20), position in the shard (< 2^28)."""
    if not (0 <= shard < 1 << _SHARD_BITS and 0 <= position < 1 << _POS_BITS and 0 <= epoch < 1 << 15):
        raise ShardError(f"epoch {epoch}, shard {shard}, position {position}: out of the index's range")
    return (epoch << (_SHARD_BITS + _POS_BITS)) | (shard << _POS_BITS) | position


def decode_index(index: int) -> Tuple[int, int, int]:
    """(epoch, shard, position) of ``encode_index``."""
    index = int(index)
    return index >> (_SHARD_BITS + _POS_BITS), (index >> _POS_BITS) & ((1 << _SHARD_BITS) - 1), \
        index & ((1 << _POS_BITS) - 1)


def _label(sample: dict, labels: str) -> int:
    if labels == "cls":
        if "cls" not in sample:
            raise ShardError("no .cls member")
        label = int(sample["cls"].decode("ascii").strip())
    else:
        label = int(os.path.basename(sample["__key__"]).split("_", 1)[0])
    if label < 0:
        raise ShardError(f"label {label} is not a class index (an integer >= 0)")
    return label


def _read_samples(path: str, handler):
    """The raw samples (dicts of member bytes, ``__key__``) of the shard file ``path``, in order, through
    webdataset's tar reader; ``handler(exception)`` decides about a broken tar (False: stop reading it)."""
    tars = _wds().tariterators
    with open(path, "rb") as stream:     # closed also when the reader stops early
        files = tars.tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        yield from tars.group_by_keys(files, handler=handler)


class ShardDataset(torch.utils.data.IterableDataset):
    """The samples of a shard pattern, without end, as ``(image, label, index, ok)`` (module docstring).

    What the training tool adds (``simcore.isc.training.sources.ShardSource``): ``class_map`` (data
    label -> the label served; a label outside it is a bad sample), ``keep`` ((lo, hi): only served
    labels in [lo, hi) come out, the others are passed over before decoding), ``sizes`` (each shard's
    sample count: a shard wholly consumed by ``resume`` is not read again), ``worker_offset`` (worker
    w of W reads as worker (w + offset) mod W would: a resume continues the DataLoader's round-robin
    turn where it stopped), ``epochs`` (None: without end; n: n passes) and ``views`` (None: one item
    per sample; V: the clean image, then V copies augmented with ``sample_seed(seed, e, k, p, v)``)."""

    def __init__(self, pattern: str, image_size: int, augment=None, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, labels: str = "cls", strict: bool = False,
                 resume: Optional[dict] = None, class_map=None, keep=None, sizes=None, worker_offset: int = 0,
                 epochs: Optional[int] = None, views: Optional[int] = None):
        if labels not in ("cls", "stem"):
            raise ValueError(f"labels must be 'cls' or 'stem', got {labels!r}")
        self.shards = expand_shards(pattern)
        if not 0 <= rank < world_size or len(self.shards) < world_size:
            raise ShardError(f"{len(self.shards)} shards cannot feed {world_size} ranks (rank {rank}): "
                             "every rank needs its own shards")
        self.image_size, self.augment, self.seed = int(image_size), augment, int(seed)
        self.rank, self.world_size, self.labels, self.strict = int(rank), int(world_size), labels, bool(strict)
        self.consumed = ShardProgress.from_state(resume).consumed if resume else {}
        self.class_map = None if class_map is None else torch.as_tensor(class_map, dtype=torch.int64)
        self.keep, self.sizes, self.worker_offset = keep, sizes, int(worker_offset)
        self.epochs, self.views = epochs, views

    def shard_order(self, epoch: int, worker: int = 0, workers: int = 1) -> List[int]:
        """The shard numbers that ``worker`` of this rank reads in ``epoch``, in order."""
        g = torch.Generator().manual_seed(Dt.sample_seed(self.seed, epoch, 0x5A4D))
        mine = torch.randperm(len(self.shards), generator=g).tolist()[self.rank::self.world_size]
        if len(mine) < workers:
            raise ShardError(f"rank {self.rank} has {len(mine)} shards for {workers} DataLoader workers: use at "
                             f"most {len(mine)} workers or more shards")
        return mine[worker::workers]

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.worker_offset) % workers
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            served = 0
            for shard in self.shard_order(epoch, worker, workers):
                for item in self._shard_items(epoch, shard):
                    served += 1
                    yield item
            if served == 0 and self.epochs is None and not self._consumed_epoch(epoch, worker, workers):
                # an endless stream that serves nothing would make the training loop wait forever
                raise ShardError(f"rank {self.rank}, DataLoader worker {worker}: its shards of epoch {epoch} hold no "
                                 "sample" + (" of the stage's classes" if self.keep is not None else ""))
            epoch += 1

    def _consumed_epoch(self, epoch, worker, workers):
        """Whether ``resume`` had consumed every shard of this worker's ``epoch`` (nothing left to serve)."""
        return self.sizes is not None and all(self.consumed.get((epoch, k), 0) >= self.sizes[k]
                                              for k in self.shard_order(epoch, worker, workers))

    def _samples(self, shard: int):
        """The raw samples of one shard; a broken tar ends it with a warning (a sample cut by the break
        comes out incomplete and its item is not ok)."""
        def handler(exn):
            if self.strict:
                raise ShardError(f"{self.shards[shard]}: {exn}") from exn
            warnings.warn(f"{self.shards[shard]}: the rest of the shard skipped ({exn})", RuntimeWarning)
            return False                     # stop reading this shard

        return _read_samples(self.shards[shard], handler)

    def _shard_items(self, epoch: int, shard: int):
        skip = self.consumed.get((epoch, shard), 0)
        if self.sizes is not None and skip >= self.sizes[shard]:
            return
        for position, sample in enumerate(self._samples(shard)):
            if position < skip:
                continue
            index = encode_index(epoch, shard, position)
            try:
                label = self._served_label(sample)
            except Exception as e:  # noqa: BLE001 - a bad sample must not stop a run
                yield self._bad(sample, shard, index, e)
                continue
            if self.keep is None or self.keep[0] <= label < self.keep[1]:
                yield from self._items(sample, label, (epoch, shard, position), index)

    def _served_label(self, sample: dict) -> int:
        label = _label(sample, self.labels)
        if self.class_map is None:
            return label
        if not 0 <= label < len(self.class_map) or self.class_map[label] < 0:
            raise ShardError(f"label {label} is not one of the {len(self.class_map)} classes the scan found")
        return int(self.class_map[label])

    def _items(self, sample: dict, label: int, where: tuple, index: int):
        try:
            ext = next(e for e in IMAGE_MEMBERS if e in sample)
            x = decode_image_bytes(sample[ext], self.image_size)
        except Exception as e:  # noqa: BLE001 - a bad sample must not stop a run
            yield self._bad(sample, where[1], index, e)
            return
        y = torch.tensor(label)
        if self.views is None:
            if self.augment is not None:
                x = self.augment(x, generator=torch.Generator().manual_seed(Dt.sample_seed(self.seed, *where)))
            yield x, y, index, True
            return
        yield x, y, index, True
        for v in range(self.views):
            g = torch.Generator().manual_seed(Dt.sample_seed(self.seed, *where, v))
            yield self.augment(x, generator=g), y, index, True

    def _bad(self, sample: dict, shard: int, index: int, e: Exception):
        """A sample that cannot be served: a zero image with ``ok`` False, or under ``strict`` an error."""
        if self.strict:
            raise CorruptRecordError(f"{self.shards[shard]}: sample {sample.get('__key__')!r}: "
                                     f"{type(e).__name__}: {e}") from e
        zero = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return zero, torch.tensor(0), index, False


class ShardProgress:
    """How many samples of each (epoch, shard) training has taken; ``state_dict`` for checkpoints."""

    def __init__(self):
        self.consumed: Dict[Tuple[int, int], int] = {}

    def update(self, indices):
        """Count a trained batch's ``index`` values (tensor or sequence)."""
        for index in torch.as_tensor(indices).tolist():
            epoch, shard, position = decode_index(index)
            key = (epoch, shard)
            self.consumed[key] = max(self.consumed.get(key, 0), position + 1)

    def state_dict(self) -> dict:
        return {"consumed": [[e, s, n] for (e, s), n in sorted(self.consumed.items())]}

    @classmethod
    def from_state(cls, state: dict) -> "ShardProgress":
        p = cls()
        p.consumed = {(int(e), int(s)): int(n) for e, s, n in state["consumed"]}
        return p

    @classmethod
    def merge(cls, states) -> "ShardProgress":
        """The progress of several readers (ranks) together: each (epoch, shard) is read by one of them."""
        p = cls()
        for state in states:
            for key, n in cls.from_state(state).consumed.items():
                p.consumed[key] = max(p.consumed.get(key, 0), n)
        return p


@dataclass
class ShardScan:
    """What ``scan_shards`` found: the shard files, each one's sample count (the positions a stream
    numbers, bad samples included), the labels of the readable samples in order, and the skipped
    samples [(shard: key, reason)] and broken shards [(shard, reason)]."""
    paths: List[str]
    sizes: List[int]
    labels: List[int]
    skipped: list
    broken: list

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1


def _scan_one(path: str, labels: str, strict: bool):
    """(sample count, readable labels, skipped [(where, reason)], broken reason or None) of one shard."""
    broken = []

    def handler(exn):
        if strict:
            raise ShardError(f"{path}: a broken tar ({exn}); without --strict the rest of it would be skipped") \
                from exn
        broken.append(f"{type(exn).__name__}: {exn}")
        return False

    count, good, skipped = 0, [], []
    for sample in _read_samples(path, handler):
        count += 1
        try:
            if not any(e in sample for e in IMAGE_MEMBERS):
                raise ShardError(f"no image member ({', '.join(IMAGE_MEMBERS)})")
            good.append(_label(sample, labels))
        except (ShardError, ValueError, UnicodeDecodeError) as e:
            where = f"{path}: {sample.get('__key__')}"
            if strict:
                raise ShardError(f"{where}: {e}; without --strict the sample would be skipped") from None
            skipped.append((where, str(e)))
    return count, good, skipped, (broken[0] if broken else None)


def scan_shards(pattern: str, *, labels: str = "cls", strict: bool = False, threads: int = 1, log=None,
                part: Tuple[int, int] = (0, 1), gather=None) -> ShardScan:
    """Read every shard of ``pattern`` once (the tar members, not decoding the images): each shard's
    samples and their labels (``.cls`` or the key's stem). A sample without an image or a label, and
    the rest of a broken tar, are skipped with a count and a warning, or refused with ``strict``. A shard
    without a single sample, or a pattern without a readable sample, is a ShardError.

    Several processes (torchrun's ranks) share the reading: ``part=(r, R)`` reads every R-th shard from
    the r-th, and ``gather(obj)`` (e.g. ``torch.distributed.all_gather_object``'s) returns every
    process's ``obj``; each process then holds the whole scan, or raises the error of any of them."""
    paths = expand_shards(pattern)
    mine = list(range(part[0], len(paths), part[1]))
    found, error = {}, None
    try:
        with ThreadPoolExecutor(max(1, min(threads, len(mine) or 1))) as ex:
            found = dict(zip(mine, ex.map(lambda i: _scan_one(paths[i], labels, strict), mine)))
    except (ShardError, OSError) as e:
        if gather is None:
            raise
        error = e
    if gather is not None:
        parts = gather((found, error))
        errors = [e for _, e in parts if e is not None]
        if errors:
            raise error if error is not None else errors[0]
        for f, _ in parts:
            found.update(f)
    return _assemble_scan(pattern, paths, [found[i] for i in range(len(paths))], labels, log)


def _assemble_scan(pattern, paths, found, labels, log) -> ShardScan:
    empty = [p for p, (count, *_rest) in zip(paths, found) if count == 0]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ShardError(f"{empty[0]}: an empty shard (no sample){more}: every shard must hold samples (every "
                         "DataLoader worker streams its own shards)")
    scan = ShardScan(paths, [f[0] for f in found], [y for f in found for y in f[1]],
                     [s for f in found for s in f[2]], [(p, f[3]) for p, f in zip(paths, found) if f[3]])
    if not scan.labels:
        raise ShardError(f"{pattern}: none of the {sum(scan.sizes)} samples of {len(paths)} shard(s) has an image "
                         f"and a label ({'a .cls member' if labels == 'cls' else 'a key starting with the class'})")
    _report_scan(scan, log)
    return scan


def _report_scan(scan: ShardScan, log):
    msgs = []
    if scan.skipped:
        shown = "; ".join(f"{w} ({r})" for w, r in scan.skipped[:3])
        msgs.append(f"skipped {len(scan.skipped)} unreadable sample(s) of {sum(scan.sizes)}: {shown}"
                    f"{' ...' if len(scan.skipped) > 3 else ''}")
    if scan.broken:
        path, reason = scan.broken[0]
        msgs.append(f"{len(scan.broken)} broken shard(s), read up to the break: {path} ({reason})"
                    f"{' ...' if len(scan.broken) > 1 else ''}")
    for msg in msgs:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if log is not None:
            log(msg)


def write_shards(samples: Iterable[Tuple[str, bytes, str, int]], pattern: str, *, per_shard: int = 1000) -> List[str]:
    """Write ``(key, encoded image, extension, label)`` samples as shards ``pattern % k`` (e.g.
    ``shards/train-%06d.tar``), ``per_shard`` a shard; returns the shard paths."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be ≥ 1, got {per_shard}")
    try:
        pattern % 0
    except TypeError:
        raise ValueError(f"{pattern}: the output pattern needs one %d field (e.g. train-%06d.tar)") from None
    wds, paths, chunk = _wds(), [], []

    def flush():
        path = pattern % len(paths)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # an integer mtime: no pax header per member (reading one costs about as much as decoding a
        # 112 px JPEG), and the same samples give byte-identical shards
        with atomic_write(path) as tmp, open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as w:
            for key, image, ext, label in chunk:
                w.write({"__key__": key, ext: image, "cls": str(int(label)).encode("ascii")})
        paths.append(path)
        chunk.clear()

    for sample in samples:
        chunk.append(sample)
        if len(chunk) == per_shard:
            flush()
    if chunk:
        flush()
    return paths


def _image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    raise ShardError("not a JPEG, PNG, WebP or BMP image")


def shards_from_folder(folder, pattern: str, *, labels: str = "folder", per_shard: int = 1000,
                       strict: bool = False, log=None) -> List[str]:
    """An image folder (``data.load_image_set``: unreadable files skipped or refused) as shards."""
    images = Dt.load_image_set(folder, labels=labels, strict=strict, log=log)

    def samples():
        for i, (path, label) in enumerate(zip(images.paths, images.labels)):
            with open(path, "rb") as f:
                data = f.read()
            yield f"{label:07d}_{i:09d}", data, _image_extension(data), label

    return write_shards(samples(), pattern, per_shard=per_shard)


def shards_from_records(rec_path, pattern: str, *, per_shard: int = 1000, strict: bool = False,
                        log=None) -> List[str]:
    """A RecordIO pair (``recordio.RecordDataset``: bad records skipped or refused) as shards."""
    records = RecordDataset(rec_path, strict=strict, log=log)

    def samples():
        for i in range(len(records)):
            data, label = records.read(i), int(records.labels[i])
            try:
                ext = _image_extension(data)
            except ShardError as e:
                if strict:
                    raise ShardError(f"{records.describe(i)}: {e}") from None
                warnings.warn(f"{records.describe(i)}: skipped ({e})", RuntimeWarning)
                continue
            yield f"{label:07d}_{int(records.keys[i]):09d}", data, ext, label

    return write_shards(samples(), pattern, per_shard=per_shard)


def convert_to_shards(source, pattern: str, *, labels: str = "folder", per_shard: int = 1000, strict: bool = False,
                      log=None) -> List[str]:
    """``simcore convert``'s work: a ``.rec`` file (its ``.idx`` beside it; the records' labels) or an image
    folder (``labels``: "folder" or "image") as shards ``pattern`` (e.g. ``shards/train-%06d.tar``)."""
    if os.fspath(source).endswith(".rec"):
        return shards_from_records(source, pattern, per_shard=per_shard, strict=strict, log=log)
    return shards_from_folder(source, pattern, labels=labels, per_shard=per_shard, strict=strict, log=log)
