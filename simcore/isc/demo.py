"""A small copy-detection benchmark on real photographs, end to end, on the CPU.

    simcore demo [--seed 0] [--steps N] [--threads T] [--out DIR] [--json] [--quick]

(``python -m simcore.isc.demo`` is the same, for a source checkout with an in-place build.)
The first line of the output names the implementation that runs simcore's ops,
``simcore 0.1.0: compiled kernels (simcore._C, cpu)`` or the plain-PyTorch references.

1. Photographs that ship inside scikit-image and scikit-learn (no downloads)
   are cut into 96-px cells (non-overlapping; the training photographs: 64, 96
   and 128-px cells with overlap, at most 40 per photograph), resized to 64 px;
   near-constant cells are dropped. The photographs are split in three disjoint groups:
   *reference* photographs (the references), *distractor* photographs (the
   sources of queries that match nothing) and *training* photographs (the
   external training set: the CNN's classes, and the set every normalisation
   and PCA is fitted on). No statistic is computed on the references.
2. Queries: one augmented copy of every reference (``simcore.isc.augment``, a
   random composition of 1-3 transforms) and three augmented copies of every
   distractor cell. The ground truth pairs each copy with its reference.
3. A small CNN is trained from scratch with ``simcore.arcface_partial``
   (every training cell its own class, positives = augmented copies).
4. The table: µAP and recall@P90 of raw pixels (16x16 thumbnails), of the
   trained descriptors, of trained descriptors with PCA whitening and with
   each of the three external-set normalisations, and the training throughput.

The query transformations come from the same family as the training ones
(different seeds, different images): that flatters learned descriptors more
than the real challenge does, where the query edits were partly manual.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import simcore
from simcore.isc import augment as A
from simcore.isc import descriptors as D
from simcore.isc.metrics import evaluate, write_predictions
from simcore.isc.training import SmallCNN, TrainStats, embed, train_arcface

#: Photographs shipped inside the scikit-image wheel (no pooch download) and scikit-learn, in three
#: disjoint groups: references, distractors (queries that match nothing) and the external training set.
REFERENCE_PHOTOS = ["astronaut", "rocket", "motorcycle", "china", "camera", "coins", "clock",
                    "immunohistochemistry", "colorwheel", "page"]
DISTRACTOR_PHOTOS = ["coffee", "logo", "text"]
#: Training cells: 64/96/128-px squares with overlap, at most 40 per photograph. Non-overlapping 96-px cells
#: gave 398 classes of which 264 came from two photographs (retina, hubble_deep_field); balancing the
#: photographs at the same class count raised the trained row's µAP by ~0.05 (400 steps).
TRAIN_SCALES = ((64, 48), (96, 64), (128, 96))
TRAIN_PER_PHOTO = 40
TRAINING_PHOTOS = ["hubble_deep_field", "retina", "chelsea", "flower", "moon", "brick", "gravel", "grass", "cell",
                   "horse"]


def _load_photo(name):
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    import skimage.data as data
    if name == "motorcycle":
        im = data.stereo_motorcycle()[0]          # the left view only: the right one is a near-copy
    else:
        im = getattr(data, name)()
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=2)
    return im[..., :3].astype(np.uint8)


def load_cells(names, cell=96, size=64, min_std=0.04, stride=None):
    """``cell``-px squares of the named photographs every ``stride`` px (default ``cell``: non-overlapping),
    resized to ``size``: uint8 (N, 3, size, size)."""
    stride = cell if stride is None else stride
    out, sources = [], []
    for name in names:
        try:
            im = _load_photo(name)
        except Exception as e:  # noqa: BLE001 - a missing optional image must not stop the demo
            print(f"[demo] skipping photograph {name!r}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        t = torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255
        H, W = t.shape[1:]
        ny, nx = (H - cell) // stride + 1, (W - cell) // stride + 1
        if ny < 1 or nx < 1:
            continue
        oy, ox = (H - (ny - 1) * stride - cell) // 2, (W - (nx - 1) * stride - cell) // 2
        # All cells of the photograph at once (row-major), as one batch: thousands of cells per photograph
        # at the training strides make a per-cell loop slow.
        c = t[:, oy:, ox:].unfold(1, cell, stride).unfold(2, cell, stride)[:, :ny, :nx]
        c = c.permute(1, 2, 0, 3, 4).reshape(ny * nx, 3, cell, cell)
        c = c[c.flatten(1).std(1) >= min_std]
        out.append(torch.nn.functional.interpolate(c, size=(size, size), mode="area"))
        sources += [name] * c.shape[0]
    x = (torch.cat(out) * 255).round().to(torch.uint8) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return x, sources


def load_training_cells(names, scales=((96, 96),), *, per_photo=None, size=64, seed=0):
    """Cells of every (cell, stride) in ``scales`` from each photograph, at most ``per_photo`` of them per
    photograph (a seeded random subset), so that no photograph dominates the classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        x = torch.cat([load_cells([name], cell=c, stride=st, size=size)[0] for c, st in scales])
        if per_photo is not None and x.shape[0] > per_photo:
            x = x[torch.randperm(x.shape[0], generator=g)[:per_photo].sort().values]
        out.append(x)
    return torch.cat(out)


@dataclass
class Benchmark:
    references: torch.Tensor      # uint8 (R, 3, S, S)
    queries: torch.Tensor         # uint8 (Q, 3, S, S)
    training: torch.Tensor        # uint8 (T, 3, S, S)
    query_ids: list
    reference_ids: list
    ground_truth: list            # (query_id, reference_id or "")


def build_benchmark(seed=0, *, distractor_views=3, max_references=None, max_training=None, size=64,
                    train_scales=TRAIN_SCALES, per_photo=TRAIN_PER_PHOTO):
    g = torch.Generator().manual_seed(seed)
    ref_cells, _ = load_cells(REFERENCE_PHOTOS, size=size)
    dis_cells, _ = load_cells(DISTRACTOR_PHOTOS, size=size)
    train_cells = load_training_cells(TRAINING_PHOTOS, train_scales, per_photo=per_photo, size=size, seed=seed)
    ref_idx = torch.randperm(ref_cells.shape[0], generator=g)
    dis_idx = torch.randperm(dis_cells.shape[0], generator=g)
    if max_references is not None:
        ref_idx = ref_idx[:max_references]
        dis_idx = dis_idx[:max(1, max_references // 2)]
    references = ref_cells[ref_idx]
    aug = A.RandomAugment(num_ops=(1, 3), intensity=(0.3, 1.0))
    copies = aug(references, generator=g)
    distractors = aug(dis_cells[dis_idx].repeat(distractor_views, 1, 1, 1), generator=g)
    queries = torch.cat([copies, distractors])
    order = torch.randperm(queries.shape[0], generator=g)        # ids do not reveal copies
    queries = queries[order]
    query_ids = [f"Q{i:05d}" for i in range(queries.shape[0])]
    reference_ids = [f"R{i:05d}" for i in range(references.shape[0])]
    # Shuffled last, so that the queries do not depend on the size of the training set.
    training = train_cells[torch.randperm(train_cells.shape[0], generator=g)]
    if max_training is not None:
        training = training[:max_training]
    gt = []
    for qpos in range(queries.shape[0]):
        src = int(order[qpos])
        gt.append((query_ids[qpos], reference_ids[src] if src < references.shape[0] else ""))
    return Benchmark(references, queries, training, query_ids, reference_ids, gt)


def raw_pixels(images, thumb=16):
    x = images.float() / 255
    x = torch.nn.functional.interpolate(x, size=(thumb, thumb), mode="area").flatten(1)
    return D.l2_normalize(x - x.mean(1, keepdim=True))


def score(queries, references, bench, *, k=10, metric="ip", train=None, score_norm=None):
    m = D.match(queries, references, k=k, metric=metric, train=train, score_norm=score_norm)
    return evaluate(m.to_triples(bench.query_ids, bench.reference_ids), bench.ground_truth), m


TRAIN_OPS_WEIGHTS = {"overlay_text": 0.5, "screenshot": 0.5, "meme": 0.5}


def run(seed=0, *, steps=1600, train_seconds=None, batch_size=128, embedding_dim=128,
        widths=(32, 64, 128, 256), depth=1, input_size=32, lr=3e-3, head_lr=3e-2, margin=0.2, scale=30.0,
        max_references=None, max_training=None, train_scales=TRAIN_SCALES, per_photo=TRAIN_PER_PHOTO,
        out=None, progress=True, quiet=False):
    """Build the benchmark, train, evaluate; returns a dict with the table rows and training figures."""
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    bench = build_benchmark(seed, max_references=max_references, max_training=max_training, train_scales=train_scales,
                            per_photo=per_photo)
    t_built = time.perf_counter()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    log(f"[demo] {bench.references.shape[0]} references, {bench.queries.shape[0]} queries "
        f"({sum(1 for _, r in bench.ground_truth if r)} copies), {bench.training.shape[0]} training images "
        f"(built in {t_built - t_start:.1f} s)")

    g = torch.Generator().manual_seed(seed + 1)
    model = SmallCNN(embedding_dim, widths=widths, depth=depth, input_size=input_size)
    weight = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(bench.training.shape[0], embedding_dim,
                                                                          generator=g), dim=1))
    train_aug = A.RandomAugment(num_ops=(1, 3), intensity=(0.2, 1.0), weights=TRAIN_OPS_WEIGHTS)
    stats = TrainStats()
    if train_seconds is not None:
        # A time budget: estimate the step count from a short timed run (not reproducible across machines).
        probe = 5
        train_arcface(model, bench.training, weight, steps=probe, batch_size=batch_size, augment=train_aug,
                      lr=lr, head_lr=head_lr, margin=margin, scale=scale, generator=g, stats=stats, warmup=probe)
        per_step = (stats.seconds + stats.augment_seconds) / probe
        steps = int(max(1, (train_seconds - per_step * probe) / per_step))
    log(f"[demo] training {steps} steps of {batch_size} images")
    train_arcface(model, bench.training, weight, steps=steps, batch_size=batch_size, augment=train_aug,
                  lr=lr, head_lr=head_lr, margin=margin, scale=scale, generator=g, stats=stats, progress=progress,
                  warmup=min(50, steps // 10))

    q_emb, r_emb, t_emb = (embed(model, x, flip=True) for x in (bench.queries, bench.references, bench.training))
    rows = []

    def add(name, metrics):
        rows.append({"descriptors": name, "micro_ap": metrics.micro_ap, "recall_at_p90": metrics.recall_at_p90,
                     "recall_at_rank1": metrics.recall_at_rank1, "recall_at_rank10": metrics.recall_at_rank10})

    add("raw pixels (16x16)", score(raw_pixels(bench.queries), raw_pixels(bench.references), bench)[0])
    add("trained CNN (flip-symmetrised)", score(q_emb, r_emb, bench)[0])
    pca = D.PCAWhitening(min(embedding_dim, 64 if bench.training.shape[0] > 128 else bench.training.shape[0] // 2))
    pca.fit(t_emb)
    add(f"+ PCA whitening ({pca.components.shape[1]}d, fit on training)",
        score(pca.transform(q_emb), pca.transform(r_emb), bench)[0])
    n = min(10, t_emb.shape[0])
    add("+ score normalisation (beta=2, n=10)",
        score(q_emb, r_emb, bench, train=t_emb, score_norm={"beta": 2.0, "n": n})[0])
    k_neg = min(10, t_emb.shape[0])
    add("+ negative-embedding subtraction (beta=0.35, k=10)",
        score(D.negative_embedding_subtraction(q_emb, t_emb, k=k_neg),
              D.negative_embedding_subtraction(r_emb, t_emb, k=k_neg), bench)[0])
    k_shift = min(100, t_emb.shape[0])
    add("+ query shift (K=100, top-3, 1.8*sqrt(c), L2 scores)",
        score(D.query_shift(q_emb, t_emb, k=k_shift), r_emb, bench, metric="l2")[0])

    result = {
        "seed": seed, "rows": rows,
        "references": int(bench.references.shape[0]), "queries": int(bench.queries.shape[0]),
        "copies": sum(1 for _, r in bench.ground_truth if r), "training_images": int(bench.training.shape[0]),
        "train_steps": stats.steps, "train_images_seen": stats.images,
        "train_seconds": stats.seconds, "augment_seconds": stats.augment_seconds,
        "train_images_per_second": stats.images_per_second,
        "end_to_end_images_per_second": stats.end_to_end_images_per_second,
        "final_loss": float(np.mean(stats.losses[-20:])) if stats.losses else float("nan"),
        "threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t_start,
    }
    if out is not None:
        write_outputs(out, bench, q_emb, r_emb, t_emb, result)
    return result


def write_outputs(out, bench, q_emb, r_emb, t_emb, result):
    """The demo's files, for ``simcore match`` / ``simcore eval``: descriptors.h5 (challenge layout),
    train.npy, ground_truth.csv, results.json."""
    import h5py
    os.makedirs(out, exist_ok=True)
    with h5py.File(os.path.join(out, "descriptors.h5"), "w") as f:
        f.create_dataset("query", data=q_emb.numpy().astype(np.float32))
        f.create_dataset("reference", data=r_emb.numpy().astype(np.float32))
        f.create_dataset("query_ids", data=np.array(bench.query_ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("reference_ids", data=np.array(bench.reference_ids, dtype=object),
                         dtype=h5py.string_dtype())
    np.save(os.path.join(out, "train.npy"), t_emb.numpy().astype(np.float32))
    with open(os.path.join(out, "ground_truth.csv"), "w") as f:
        f.write("query_id,reference_id\n")
        for q, r in bench.ground_truth:
            f.write(f"{q},{r}\n")
    m = D.match(q_emb, r_emb, k=10)
    write_predictions(os.path.join(out, "predictions.csv"), m.to_triples(bench.query_ids, bench.reference_ids))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)


def format_table(result) -> str:
    w = max(len(r["descriptors"]) for r in result["rows"])
    lines = [f"{'descriptors':<{w}}  {'µAP':>7}  {'recall@P90':>10}  {'recall@1':>8}",
             f"{'-' * w}  {'-' * 7}  {'-' * 10}  {'-' * 8}"]
    for r in result["rows"]:
        lines.append(f"{r['descriptors']:<{w}}  {r['micro_ap']:7.4f}  {r['recall_at_p90']:10.4f}  "
                     f"{r['recall_at_rank1']:8.4f}")
    lines.append("")
    lines.append(f"benchmark: {result['references']} references, {result['queries']} queries "
                 f"({result['copies']} copies), {result['training_images']} training images (classes)")
    lines.append(f"training: {result['train_steps']} steps, {result['train_images_seen']} images, "
                 f"{result['train_images_per_second']:.0f} images/s forward+backward "
                 f"({result['end_to_end_images_per_second']:.0f} images/s with augmentation), "
                 f"{result['threads']} threads; final loss {result['final_loss']:.3f}; "
                 f"total {result['total_seconds']:.0f} s")
    return "\n".join(lines)


#: ``--quick``: a tiny configuration (seconds), for smoke and determinism tests.
QUICK = dict(max_references=40, max_training=120, widths=(16, 32, 64, 64), embedding_dim=32, batch_size=32, steps=20)


def main(argv=None, prog="python -m simcore.isc.demo"):
    """The demo's command line (``simcore demo`` hands its arguments here)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1600,
                   help="training steps (default 1600; about 3-4 minutes on 2 idle CPU cores); reproducible for a seed")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="train for about this many seconds instead of --steps (the step count then depends on "
                        "the machine's speed, so the numbers are not reproducible across machines)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="write descriptors.h5, train.npy, ground_truth.csv, predictions.csv, "
                   "results.json here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds; for smoke tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op thread count (default: torch's, one per core); the numbers are bit-identical "
                        "for a seed only at the same thread count (float sums are split differently across threads)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway unless stderr is a terminal)")
    a = p.parse_args(argv)
    # stdout stays pure JSON under --json.
    print(simcore.implementation("cpu"), file=sys.stderr if a.json else sys.stdout, flush=True)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    kwargs = dict(seed=a.seed, steps=a.steps, train_seconds=a.train_seconds, batch_size=a.batch_size, out=a.out,
                  progress=not a.no_progress and sys.stderr.isatty(), quiet=a.json)
    if a.quick:
        kwargs.update(QUICK, batch_size=min(a.batch_size, QUICK["batch_size"]), steps=min(a.steps, QUICK["steps"]))
    result = run(**kwargs)
    print(json.dumps(result, indent=2) if a.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
