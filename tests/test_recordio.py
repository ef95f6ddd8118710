"""simcore.isc.recordio: InsightFace's RecordIO pair, written by the test, read back without MXNet."""
import io
import os
import struct

import numpy as np
import pytest
import torch

from simcore.isc import data as Dt
from simcore.isc.encoded import CorruptRecordError, decode_image_bytes
from simcore.isc.recordio import (MAGIC, RecordDataset, RecordFile, RecordIOError, RecordWriter, frame_record,
                                  pack_payload, read_index, unpack_payload)

M = struct.pack("<I", MAGIC)


def jpeg(seed, size=24):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_frame_record_follows_dmlc_write_record():
    # no magic word: one part, flag 0, padded to 4 bytes
    assert frame_record(b"abcde") == M + struct.pack("<I", 5) + b"abcde\0\0\0"
    # a magic word at offset 4 splits the record; the word itself is dropped (the reader puts it back)
    rec = frame_record(b"ab\0\0" + M + b"xyz")
    assert rec == M + struct.pack("<I", (1 << 29) | 4) + b"ab\0\0" + M + struct.pack("<I", (3 << 29) | 3) + b"xyz\0"
    # two magic words in a row and one at the start: empty parts, flags 1, 2, 3
    rec = frame_record(M + M + b"q")
    assert rec == (M + struct.pack("<I", 1 << 29) + M + struct.pack("<I", 2 << 29)
                   + M + struct.pack("<I", (3 << 29) | 1) + b"q\0\0\0")
    # an unaligned magic word is data
    assert frame_record(b"a" + M) == M + struct.pack("<I", 5) + b"a" + M + b"\0\0\0"


def test_payload_header_round_trip():
    h, img = unpack_payload(pack_payload(7, b"IMG", id=3, id2=4))
    assert (h.flag, h.label, h.id, h.id2, img) == (0, 7.0, 3, 4, b"IMG")
    h, img = unpack_payload(pack_payload([2.0, 5.5], b"X"))
    assert h.flag == 2 and h.label.tolist() == [2.0, 5.5] and img == b"X"
    assert len(pack_payload(1.0)) == 24                     # the 24-byte IR header of struct IfQQ
    with pytest.raises(RecordIOError, match="announces 3 labels"):
        unpack_payload(struct.pack("<IfQQ", 3, 0, 0, 0) + b"\0" * 4)


def write_set(path, n=6, header=True, identities=0, seed=0):
    """n images (key 1..n with a header, 0..n-1 without), labels i % 3; record 2 is a multi-part record."""
    images = [jpeg(seed + i) for i in range(n)]
    with RecordWriter(path) as w:
        if header:
            w.write_header(n, identity_end=n + 1 + identities)
        for i, im in enumerate(images):
            key = i + 1 if header else i
            if i == 2:      # the magic word at 4-aligned offsets of the payload: in the ids and after the image
                im = im + b"\0" * (-(24 + len(im)) % 4) + M + M + b"tail"
                w.write_image(key, i % 3, im, id=MAGIC, id2=MAGIC | (MAGIC << 32))
            elif i == 3:
                w.write_image(key, [i % 3, 42.0], im)
            else:
                w.write_image(key, i % 3, im)
        for j in range(identities):
            w.write(n + 1 + j, pack_payload([0, 1]))
    return images


@pytest.mark.parametrize("header", [True, False])
def test_dataset_reads_what_the_writer_wrote(tmp_path, header):
    rec = str(tmp_path / "train.rec")
    images = write_set(rec, header=header, identities=2 if header else 0)
    f = RecordFile(rec)
    offsets = dict(read_index(tmp_path / "train.idx"))
    assert f.read(offsets[3 if header else 2])[:24] == pack_payload(2, id=MAGIC, id2=MAGIC | (MAGIC << 32))
    ds = RecordDataset(rec, image_size=24)
    assert len(ds) == 6 and ds.skipped == [] and ds.num_classes == 3
    assert ds.header == ((7, 9) if header else None)
    assert ds.labels.tolist() == [i % 3 for i in range(6)]
    for i in range(6):
        x, y, idx, ok = ds[i]
        assert ok and idx == i and int(y) == i % 3 and x.dtype == torch.uint8
        assert torch.equal(x, decode_image_bytes(images[i], 24))


def test_truncated_and_corrupt_records_are_skipped_or_refused(tmp_path):
    rec = str(tmp_path / "train.rec")
    write_set(rec, n=6, header=True)
    offsets = dict(read_index(tmp_path / "train.idx"))
    raw = bytearray(open(rec, "rb").read())
    raw[offsets[4]:offsets[4] + 4] = b"\xde\xad\xbe\xef"             # key 4: bad magic
    raw = raw[:offsets[6] + 40]                                       # key 6: truncated after 40 bytes
    open(rec, "wb").write(bytes(raw))
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable record"):
        ds = RecordDataset(rec, image_size=24)
    assert len(ds) == 4 and ds.keys.tolist() == [1, 2, 3, 5]
    assert [k for k, _ in ds.skipped] == [4, 6]
    assert "bad magic" in ds.skipped[0][1] and "truncated" in ds.skipped[1][1]
    with pytest.raises(RecordIOError, match="record 4: .*bad magic"):
        RecordDataset(rec, image_size=24, strict=True)


def test_undecodable_image_and_bad_labels(tmp_path):
    rec = str(tmp_path / "train.rec")
    with RecordWriter(rec) as w:
        w.write_image(0, 0, jpeg(0))
        w.write_image(1, 1, b"not an image at all")
        w.write_image(2, -1, jpeg(2))             # not a class index: skipped when the set is opened
        w.write_image(3, 2.5, jpeg(3))
        w.write_image(4, 3, b"")                  # no image bytes
    with pytest.warns(RuntimeWarning, match="skipped 3"):
        ds = RecordDataset(rec, image_size=16)
    assert ds.keys.tolist() == [0, 1]
    x, _, _, ok = ds[1]
    assert not ok and not x.any()
    with pytest.warns(RuntimeWarning):
        strict_late = RecordDataset(rec, image_size=16)
    strict_late.strict = True
    with pytest.raises(CorruptRecordError, match="record 1: cannot decode"):
        strict_late[1]


def test_bad_index_and_missing_files(tmp_path):
    rec = tmp_path / "a.rec"
    with RecordWriter(rec) as w:
        w.write_image(0, 0, jpeg(0))
    with pytest.raises(FileNotFoundError, match="no such RecordIO index"):
        RecordDataset(rec, tmp_path / "b.idx")
    (tmp_path / "a.idx").write_text("0\t0\nbroken line\n")
    with pytest.raises(RecordIOError, match="line 2: expected 'key<TAB>offset'"):
        RecordDataset(rec)
    with pytest.raises(ValueError, match="keys must be unique"):
        with RecordWriter(tmp_path / "c.rec") as w:
            w.write(1, b"x")
            w.write(1, b"y")
    assert not (tmp_path / "c.rec").exists() and not (tmp_path / "c.idx").exists()   # nothing half-written


def flip_augment(x, generator):
    # a seeded augmentation: the flip and the brightness are drawn from the sample's generator
    x = x.flip(2) if torch.rand((), generator=generator) < 0.5 else x
    return (x.float() * (0.5 + torch.rand((), generator=generator))).clamp(0, 255).to(torch.uint8)


def test_seeded_augmentation_is_the_same_in_workers(tmp_path):
    rec = str(tmp_path / "train.rec")
    write_set(rec, n=6)
    ds = RecordDataset(rec, image_size=24, augment=flip_augment)
    sampler = Dt.StageBatchSampler(range(len(ds)), 4, seed=3, steps=3)
    main = [b for b in Dt.make_loader(ds, sampler, workers=0)]
    sampler = Dt.StageBatchSampler(range(len(ds)), 4, seed=3, steps=3)
    workers = [b for b in Dt.make_loader(ds, sampler, workers=2)]
    for a, b in zip(main, workers):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    clean = torch.stack([ds[int(i)][0] for i in main[0][2]])
    assert not torch.equal(main[0][0], clean)                        # the copies are augmented
    assert torch.equal(ds[(0, 11)][0], ds[(0, 11)][0])               # by the sample's seed alone
