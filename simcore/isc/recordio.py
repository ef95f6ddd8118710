"""InsightFace's MXNet RecordIO pair (``train.rec`` + ``train.idx``), read and written without MXNet.

The format (dmlc-core ``recordio``, MXNet ``recordio.pack``), little-endian throughout:

- A record on disk is a uint32 magic ``0xCED7230A``, a uint32 ``lrec`` whose low 29 bits are the
  part's length and whose top 3 bits its continuation flag, the part's bytes, then zero padding to
  a multiple of 4. Flag 0: a whole record. A payload holding the magic word at a 4-aligned offset
  is written in parts (flag 1 first, 2 middle, 3 last) split at each such word, which is dropped;
  a reader joins the parts with the magic word between them.
- The ``.idx`` file: one line ``key<TAB>byte offset of the record`` per record.
- A payload is MXNet's IR header ``struct {uint32 flag; float label; uint64 id; uint64 id2}`` (24
  bytes), then, when ``flag > 0``, ``flag`` float32 labels (the header's ``label`` is then unused),
  then the encoded image (JPEG/PNG).
- InsightFace's sets hold a header record at key 0 whose two labels ``(a, b)`` say that the images
  are keys ``1 .. a-1`` (keys ``a .. b-1`` hold per-identity records): a key-0 record with
  ``flag > 0`` and no image bytes is read so. Without it, every key of the index is an image.

``RecordDataset`` checks each image record's frame and header when it opens the pair (a bad magic,
a part running past the end of the file, a label that is not a class index): such records are
skipped with a count and a warning, or refused with ``strict=True``. An image that fails to decode
later gives ``ok = False`` as in ``EncodedImageDataset``. Training labels are the records' labels
(the first one when a record has several, as InsightFace reads them).
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from simcore.isc.encoded import CorruptRecordError, EncodedImageDataset
from simcore.isc.files import atomic_write

__all__ = ["MAGIC", "RecordIOError", "IRHeader", "pack_payload", "unpack_payload", "frame_record", "read_index",
           "index_path", "RecordFile", "RecordWriter", "RecordDataset"]

MAGIC = 0xCED7230A
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_MAGIC_BYTES = struct.pack("<I", MAGIC)


class RecordIOError(CorruptRecordError):
    """A record that breaks the RecordIO framing or the IR header."""


@dataclass
class IRHeader:
    flag: int
    label: Union[float, np.ndarray]   # a float when flag == 0, else ``flag`` float32 labels
    id: int = 0
    id2: int = 0


def pack_payload(label, image: bytes = b"", *, id: int = 0, id2: int = 0) -> bytes:
    """IR header (+ float32 labels when ``label`` is a sequence) + ``image``: MXNet's ``recordio.pack``."""
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), id, id2) + bytes(image)
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(image)


def unpack_payload(payload: bytes) -> Tuple[IRHeader, bytes]:
    """(IR header, image bytes) of a record payload; RecordIOError when it is too short."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"a payload of {len(payload)} bytes is shorter than the 24-byte IR header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    end = _IR_HEADER.size + 4 * flag
    if flag > 0:
        if len(payload) < end:
            raise RecordIOError(f"the IR header announces {flag} labels but the payload holds {len(payload)} bytes")
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR_HEADER.size).astype(np.float32)
    return IRHeader(flag, label, id_, id2), payload[end:]


def _lrec(flag: int, length: int) -> bytes:
    return _FRAME.pack(MAGIC, (flag << _LENGTH_BITS) | length)


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record (dmlc-core's ``WriteRecord``): split at each 4-aligned magic word."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds at most {_LENGTH_MASK} bytes, got {len(payload)}")
    parts, start = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            parts.append(_lrec(1 if start == 0 else 2, i - start) + payload[start:i])
            start = i + 4
    tail = payload[start:]
    parts.append(_lrec(3 if start else 0, len(tail)) + tail + _padding(len(payload)))
    return b"".join(parts)


def index_path(rec_path) -> str:
    """The ``.idx`` beside a ``.rec`` file (``train.rec`` -> ``train.idx``)."""
    root, _ = os.path.splitext(os.fspath(rec_path))
    return root + ".idx"


def read_index(idx_path) -> List[Tuple[int, int]]:
    """[(key, offset)] of an ``.idx`` file, in file order; a malformed line is a RecordIOError naming it."""
    out = []
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}: line {lineno}: expected 'key<TAB>offset', got {line.strip()[:60]!r}") \
                    from None
            if offset < 0:
                raise RecordIOError(f"{idx_path}: line {lineno}: negative offset {offset}")
            out.append((key, offset))
    return out


class RecordFile:
    """Random access to the records of a ``.rec`` file by byte offset. The file is opened lazily in
    each process (``os.pread``: no shared file position), so the object can go to DataLoader workers."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)
        self._fd, self._pid = None, None

    def __getstate__(self):
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": None}

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise RecordIOError(f"{self.path}: offset {offset}: the file ends {length - len(data)} bytes early")
        return data

    def _part(self, offset: int, limit: Optional[int] = None):
        """(continuation flag, part bytes (the first ``limit`` only, if given), its full length, offset of the
        next part). The frame is checked whole: a part running past the end of the file is an error."""
        if offset + 8 > self.size:
            raise RecordIOError(f"{self.path}: offset {offset}: no record header before the end of the file")
        magic, lrec = _FRAME.unpack(self._read(offset, 8))
        if magic != MAGIC:
            raise RecordIOError(f"{self.path}: offset {offset}: bad magic {magic:#010x} (expected {MAGIC:#010x})")
        flag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if flag > 3:
            raise RecordIOError(f"{self.path}: offset {offset}: continuation flag {flag} (0 to 3 allowed)")
        end = offset + 8 + length
        if end > self.size:
            raise RecordIOError(f"{self.path}: offset {offset}: a record of {length} bytes runs past the end of "
                                f"the file ({self.size} bytes): truncated")
        data = self._read(offset + 8, length if limit is None else min(limit, length))
        return flag, data, length, end + (-length % 4)

    def read(self, offset: int) -> bytes:
        """The payload of the record at ``offset``, its parts joined; RecordIOError when it is broken."""
        flag, data, _, offset = self._part(offset)
        if flag == 0:
            return data
        if flag != 1:
            raise RecordIOError(f"{self.path}: the record starts with a continuation part (flag {flag})")
        parts = [data]
        while flag != 3:
            flag, data, _, offset = self._part(offset)
            if flag not in (2, 3):
                raise RecordIOError(f"{self.path}: a multi-part record is cut by a part with flag {flag}")
            parts.append(data)
        return _MAGIC_BYTES.join(parts)

    def head(self, offset: int, n: int) -> Tuple[bytes, int]:
        """(the first ``n`` bytes of the payload at ``offset``, the payload's length), reading only those
        bytes of a one-part record (opening a large set reads its records' headers alone)."""
        flag, data, length, _ = self._part(offset, n)
        if flag == 0:
            return data, length
        payload = self.read(offset)
        return payload[:n], len(payload)

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class RecordWriter:
    """Writes a ``.rec``/``.idx`` pair, both files whole or not at all (``files.atomic_write``)::

        with RecordWriter("train.rec") as w:
            w.write_header(num_images=2)           # optional: InsightFace's key-0 header record
            w.write_image(1, label=0, image=jpeg_bytes)
            w.write_image(2, label=[0, 7], image=jpeg_bytes)
    """

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else index_path(rec_path)
        self._stack, self._rec, self._idx, self._offset, self._keys = None, None, None, 0, set()

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            rec_tmp = self._stack.enter_context(atomic_write(self.rec_path))
            idx_tmp = self._stack.enter_context(atomic_write(self.idx_path))
            self._rec = self._stack.enter_context(open(rec_tmp, "wb"))
            self._idx = self._stack.enter_context(open(idx_tmp, "w", encoding="ascii", newline="\n"))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def write(self, key: int, payload: bytes):
        """One record with index key ``key`` (unique, ≥ 0)."""
        key = int(key)
        if key < 0 or key in self._keys:
            raise ValueError(f"record key {key}: keys must be unique and ≥ 0")
        self._keys.add(key)
        data = frame_record(payload)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(data)

    def write_image(self, key: int, label, image: bytes, *, id: int = 0, id2: int = 0):
        """An image record: IR header with ``label`` (a number, or a sequence of numbers) + encoded ``image``."""
        self.write(key, pack_payload(label, image, id=id, id2=id2))

    def write_header(self, num_images: int, identity_end: Optional[int] = None):
        """InsightFace's header record at key 0: images are keys 1..num_images."""
        end = num_images + 1 if identity_end is None else identity_end
        self.write(0, pack_payload([num_images + 1, end]))


def _class_label(header: IRHeader) -> int:
    value = float(header.label if header.flag == 0 else header.label[0])
    if not math.isfinite(value) or value < 0 or value != int(value) or value >= 2 ** 31:
        raise RecordIOError(f"label {value!r} is not a class index (an integer ≥ 0)")
    return int(value)


class RecordDataset(EncodedImageDataset):
    """The images of a ``.rec``/``.idx`` pair with the records' labels (``EncodedImageDataset`` items).

    Attributes: ``keys`` and ``offsets`` of the readable image records (index order), ``labels``,
    ``num_classes`` (max label + 1), ``header`` ((a, b) of InsightFace's key-0 record, or None) and
    ``skipped`` ([(key, reason)]; with ``strict`` the first bad record raises RecordIOError)."""

    def __init__(self, rec_path, idx_path=None, image_size: int = 112, augment=None, *, strict: bool = False,
                 log=None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else index_path(rec_path)
        for p, what in ((self.rec_path, "record file"), (self.idx_path, "index")):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such RecordIO {what}")
        self.file = RecordFile(self.rec_path)
        entries, self.header = self._image_entries(read_index(self.idx_path), strict)
        keys, offsets, labels, skipped = [], [], [], []
        for key, offset in entries:
            try:
                label = self._check(offset)
            except RecordIOError as e:
                if strict:
                    raise RecordIOError(f"{self.rec_path}: record {key}: {e}; without --strict it would be "
                                        "skipped") from None
                skipped.append((key, str(e)))
                continue
            keys.append(key)
            offsets.append(offset)
            labels.append(label)
        self._report(skipped, len(entries), log)
        if not keys:
            raise RecordIOError(f"{self.rec_path}: none of its {len(entries)} image records can be read")
        super().__init__(labels, image_size, augment, strict=strict)
        self.keys, self.offsets, self.skipped = np.asarray(keys), np.asarray(offsets), skipped
        self.num_classes = int(self.labels.max()) + 1

    def _image_entries(self, index, strict):
        """[(key, offset)] of the image records, and InsightFace's (a, b) header when key 0 holds one."""
        offsets = dict(index)
        if 0 in offsets:
            try:
                head, image = unpack_payload(self.file.read(offsets[0]))
            except RecordIOError:
                head, image = None, b""          # a broken record 0 is checked (and skipped) as an image
            if head is not None and head.flag >= 2 and not image:
                a, b = int(head.label[0]), int(head.label[1])
                missing = [k for k in range(1, a) if k not in offsets]
                if missing and strict:
                    raise RecordIOError(f"{self.idx_path}: the header record names images 1..{a - 1} but key "
                                        f"{missing[0]} is not in the index")
                return [(k, offsets[k]) for k in range(1, a) if k in offsets], (a, b)
        return list(index), None

    def _check(self, offset) -> int:
        """The record's class label, from its header alone; RecordIOError when the record is broken."""
        head, length = self.file.head(offset, 64)
        flag = _IR_HEADER.unpack_from(head)[0] if len(head) >= _IR_HEADER.size else 0
        if _IR_HEADER.size + 4 * flag > len(head) and length > len(head):
            head, length = self.file.head(offset, _IR_HEADER.size + 4 * flag)
        header, _ = unpack_payload(head)
        if length <= _IR_HEADER.size + 4 * header.flag:
            raise RecordIOError("no image bytes after the IR header")
        return _class_label(header)

    def _report(self, skipped, total, log):
        if not skipped:
            return
        shown = "; ".join(f"key {k} ({r})" for k, r in skipped[:3])
        msg = f"{self.rec_path}: skipped {len(skipped)} unreadable record(s) of {total}: {shown}" \
              f"{' ...' if len(skipped) > 3 else ''}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if log is not None:
            log(msg)

    def read(self, index):
        return unpack_payload(self.file.read(int(self.offsets[index])))[1]

    def describe(self, index):
        return f"{self.rec_path}: record {int(self.keys[index])}"
