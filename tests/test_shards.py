"""simcore.isc.shards: WebDataset shards written by the test (from a folder and from a RecordIO pair),
read back with disjoint shards per rank and worker, and resumed."""
import io
import itertools
import os
import tarfile

import numpy as np
import pytest
import torch

from simcore.isc import data as Dt
from simcore.isc.encoded import decode_image_bytes
from simcore.isc.recordio import RecordWriter
from simcore.isc.shards import (ShardDataset, ShardError, ShardProgress, decode_index, encode_index, expand_shards,
                                write_shards, convert_to_shards)


def jpeg(seed, size=20):
    from PIL import Image
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(tmp_path, n=40, per_shard=5):
    images = [jpeg(i) for i in range(n)]
    paths = write_shards(((f"{i % 7:04d}_{i:06d}", im, "jpg", i % 7) for i, im in enumerate(images)),
                         str(tmp_path / "shards" / "train-%06d.tar"), per_shard=per_shard)
    return images, paths


def flip_augment(x, generator):
    return x.flip(2) if torch.rand((), generator=generator) < 0.5 else x


def test_index_round_trip():
    assert decode_index(encode_index(3, 1000, 12345)) == (3, 1000, 12345)
    with pytest.raises(ShardError, match="out of the index's range"):
        encode_index(0, 1 << 20, 0)


@pytest.mark.parametrize("labels", ["cls", "stem"])
def test_samples_and_labels(tmp_path, labels):
    images, paths = make_shards(tmp_path)
    assert len(paths) == 8 and expand_shards(str(tmp_path / "shards" / "train-{000000..000007}.tar")) == paths
    ds = ShardDataset(str(tmp_path / "shards" / "train-{000000..000007}.tar"), 20, labels=labels)
    items = list(itertools.islice(iter(ds), 40))
    seen = set()
    for x, y, index, ok in items:
        _, shard, position = decode_index(index)
        i = shard * 5 + position
        assert ok and int(y) == i % 7 and torch.equal(x, decode_image_bytes(images[i], 20))
        seen.add(i)
    assert seen == set(range(40))                      # one epoch: every sample once


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    make_shards(tmp_path)
    pattern = str(tmp_path / "shards" / "train-{000000..000007}.tar")
    owners = {}
    for rank in range(2):
        ds = ShardDataset(pattern, 20, rank=rank, world_size=2, seed=1)
        for worker in range(2):
            for shard in ds.shard_order(0, worker, 2):
                assert shard not in owners
                owners[shard] = (rank, worker)
    assert sorted(owners) == list(range(8))
    # through a DataLoader with 2 workers: each batch comes from one worker's shards
    ds = ShardDataset(pattern, 20, rank=1, world_size=2, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=Dt.collate)
    batches = list(itertools.islice(iter(loader), 4))
    shards = {decode_index(i)[1] for b in batches for i in b[2].tolist()}
    assert shards == {s for s, (r, _) in owners.items() if r == 1}
    with pytest.raises(ShardError, match="cannot feed 9 ranks"):
        ShardDataset(pattern, 20, rank=0, world_size=9)


def take(ds, workers, batches):
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=Dt.collate)
    return list(itertools.islice(iter(loader), batches))


def test_resume_trains_on_exactly_the_samples_not_reached(tmp_path):
    make_shards(tmp_path)
    pattern = str(tmp_path / "shards" / "train-{000000..000007}.tar")

    def samples(batches):
        return {(i, x.numpy().tobytes()) for b in batches for x, i in zip(b[0], b[2].tolist())}

    whole = take(ShardDataset(pattern, 20, flip_augment, seed=4), 2, 20)        # 60 samples: 1.5 epochs
    first = take(ShardDataset(pattern, 20, flip_augment, seed=4), 2, 7)         # interrupted after 7 steps
    progress = ShardProgress()
    for b in first:
        progress.update(b[2])
    state = ShardProgress.from_state(progress.state_dict()).state_dict()       # through the checkpoint
    rest = take(ShardDataset(pattern, 20, flip_augment, seed=4, resume=state), 1, 13)   # another worker count
    before, after = samples(first), samples(rest)
    assert not before & after                                                  # nothing replayed
    n = len(before) + len(after)
    assert n == 60
    # the same samples with the same pixels as the uninterrupted run, up to the epoch boundary's order
    epoch0 = lambda s: {t for t in s if decode_index(t[0])[0] == 0}            # noqa: E731
    assert epoch0(before | after) == epoch0(samples(whole)) and len(epoch0(samples(whole))) == 40


def test_bad_samples_and_broken_shards(tmp_path):
    images, paths = make_shards(tmp_path, n=10, per_shard=5)
    # a third shard: a good sample, an undecodable image, then the tar cut in the middle of a member
    bad = str(tmp_path / "shards" / "bad-%06d.tar")
    p = write_shards([("0001_a", images[0], "jpg", 1), ("0002_b", b"garbage", "jpg", 2),
                      ("0003_c", images[1], "jpg", 3)], bad, per_shard=10)[0]
    with tarfile.open(p) as t:
        cut = t.getmember("0003_c.jpg").offset_data + 100
    open(p, "r+b").truncate(cut)
    ds = ShardDataset(p, 20)
    with pytest.warns(RuntimeWarning, match="the rest of the shard skipped"):
        items = list(itertools.islice(iter(ds), 3))
    assert [ok for *_, ok in items] == [True, False, False] and int(items[0][1]) == 1   # garbage; cut sample
    with pytest.raises(Exception, match="cannot identify|garbage|UnidentifiedImageError"):
        list(itertools.islice(iter(ShardDataset(p, 20, strict=True)), 3))
    with pytest.raises(ShardError, match="1 of 2 shard files are missing"):
        ShardDataset(str(tmp_path / "shards" / "train-{000001..000002}.tar"), 20)


def test_convert_from_folder_and_records(tmp_path):
    from PIL import Image
    for c in range(3):
        os.makedirs(tmp_path / "faces" / f"person{c}")
        for k in range(2):
            Image.fromarray((np.random.default_rng(c * 10 + k).random((16, 16, 3)) * 255).astype(np.uint8)) \
                .save(tmp_path / "faces" / f"person{c}" / f"{k}.png")
    out = convert_to_shards(tmp_path / "faces", str(tmp_path / "f" / "s-%03d.tar"), per_shard=4)
    assert [os.path.basename(p) for p in out] == ["s-000.tar", "s-001.tar"]
    with tarfile.open(out[0]) as t:
        assert sorted(t.getnames()[:2]) == ["0000000_000000000.cls", "0000000_000000000.png"]
    items = list(itertools.islice(iter(ShardDataset(str(tmp_path / "f" / "s-{000..001}.tar"), 16)), 6))
    assert sorted(int(y) for _, y, _, _ in items) == [0, 0, 1, 1, 2, 2]
    rec = tmp_path / "train.rec"
    with RecordWriter(rec) as w:
        w.write_header(3)
        for k in range(3):
            w.write_image(k + 1, [k * 2, 9], jpeg(k))
    out = convert_to_shards(rec, str(tmp_path / "r" / "s-%03d.tar"), per_shard=10)
    items = list(itertools.islice(iter(ShardDataset(out[0], 20)), 3))
    assert sorted(int(y) for _, y, _, _ in items) == [0, 2, 4]
    assert all(torch.equal(x, decode_image_bytes(jpeg(int(y) // 2), 20)) for x, y, _, _ in items)
