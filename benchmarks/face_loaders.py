"""Loader throughput for 112 x 112 faces: an image folder, a RecordIO pair and WebDataset shards, in
images/s per worker, against the floor of decoding the same JPEGs from memory in one loop (issue 25).

Run (a few minutes on 2 shared cores; the data is cut from scikit-image's photographs into a
temporary folder):
    python benchmarks/face_loaders.py [--images 2000] [--rounds 3] [--workers 0,1,2]

Each round times every (format, workers) pair once, in an order that rotates from round to round,
so that the ratios compare runs made minutes apart at most; the median of the rounds is printed.
Every loader yields uint8 (B, 3, 112, 112) batches of 128 through a torch DataLoader (workers as
given; 0 = in the main process), resizing nothing (the images are 112 px already).
"""
import argparse
import io
import itertools
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from simcore.isc import data as Dt
from simcore.isc.encoded import decode_image_bytes
from simcore.isc.recordio import RecordDataset, RecordWriter
from simcore.isc.shards import ShardDataset, write_shards

SIZE, BATCH = 112, 128


def faces(n):
    """n JPEG crops (quality 90) of 112 px from scikit-image's photographs."""
    import skimage.data as data
    from PIL import Image
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        im = np.asarray(getattr(data, name)())
        photos.append(im[..., :3])
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        y, x = rng.integers(0, im.shape[0] - 160), rng.integers(0, im.shape[1] - 160)
        buf = io.BytesIO()
        Image.fromarray(im[y:y + 160, x:x + 160]).resize((SIZE, SIZE)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_formats(images, root):
    os.makedirs(os.path.join(root, "folder"))
    for i, b in enumerate(images):
        with open(os.path.join(root, "folder", f"{i:06d}.jpg"), "wb") as f:
            f.write(b)
    with RecordWriter(os.path.join(root, "train.rec")) as w:
        w.write_header(len(images))
        for i, b in enumerate(images):
            w.write_image(i + 1, i % 100, b)
    n_shards = 8
    write_shards(((f"{i % 100:04d}_{i:06d}", b, "jpg", i % 100) for i, b in enumerate(images)),
                 os.path.join(root, "shards", "train-%06d.tar"), per_shard=-(-len(images) // n_shards))
    return n_shards


def map_loader(dataset, workers):
    sampler = Dt.ListBatchSampler(range(len(dataset)), BATCH)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=Dt.collate)


def rate(make_loader, n):
    """Images/s of one pass over n images (worker start-up included, as a stage's first epoch)."""
    t = time.perf_counter()
    seen = 0
    for x, *_ in make_loader():
        seen += x.shape[0]
        if seen >= n:
            break
    return seen / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = faces(args.images)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as root:
        n_shards = write_formats(images, root)
        folder = Dt.ImageDataset(Dt.list_images(os.path.join(root, "folder")), [0] * len(images), SIZE)
        records = RecordDataset(os.path.join(root, "train.rec"), image_size=SIZE)
        pattern = os.path.join(root, "shards", "train-{000000..%06d}.tar" % (n_shards - 1))
        cases = {"floor: decode from memory": lambda w: (lambda: ((torch.stack([decode_image_bytes(b, SIZE) for b in
                                                                                 images[i:i + BATCH]]),)
                                                                  for i in range(0, len(images), BATCH)))}
        cases["image folder"] = lambda w: (lambda: map_loader(folder, w))
        cases["RecordIO"] = lambda w: (lambda: map_loader(records, w))
        cases["WebDataset"] = lambda w: (lambda: torch.utils.data.DataLoader(
            ShardDataset(pattern, SIZE), batch_size=BATCH, num_workers=w, collate_fn=Dt.collate))
        runs = [(name, w) for name in cases for w in (workers if not name.startswith("floor") else [0])]
        results = {r: [] for r in runs}
        for k in range(args.rounds):
            for name, w in runs[k % len(runs):] + runs[:k % len(runs)]:
                results[(name, w)].append(rate(cases[name](w), len(images)))
        floor = statistics.median(results[("floor: decode from memory", 0)])
        print(f"{len(images)} JPEGs of {SIZE} px, batches of {BATCH}, torch {torch.__version__}, "
              f"{args.rounds} rounds (median)")
        print(f"{'loader':28s} {'workers':>7s} {'images/s':>9s} {'per worker':>10s} {'/ floor':>8s}")
        for (name, w), rs in results.items():
            r = statistics.median(rs)
            print(f"{name:28s} {w:7d} {r:9.0f} {r / max(w, 1):10.0f} {r / floor:8.2f}")


if __name__ == "__main__":
    main()
