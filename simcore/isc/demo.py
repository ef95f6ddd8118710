"""A small copy-detection benchmark on real photographs, end to end, on the CPU, through the
same code as ``simcore train`` / ``embed`` / ``match`` / ``eval``.

    simcore demo [--seed 0] [--steps S[,S]] [--batch-size B[,B]] [--threads T] [--out DIR] [--json] [--quick]

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
3. The benchmark is written as PNG files (lossless: the files hold the benchmark's
   pixels) with ``ground_truth.csv``, into ``--out DIR`` or a temporary folder.
4. ``simcore.isc.train.train`` (``simcore train``) trains a SmallCNN from scratch on the
   training folder: every training image its own class, augmented copies as positives,
   a ``simcore.PartialMarginHead`` ArcFace head, two drip stages (200 classes, then all).
5. ``simcore.isc.embed`` (``simcore embed --flip``) writes the descriptors of the query,
   reference and training folders to ``descriptors.h5``; 16x16 thumbnails of the same
   files go to ``raw_pixels.h5``.
6. ``simcore.isc.commands.match_files`` / ``evaluate_files`` (``simcore match`` / ``simcore
   eval``) give each row of the table: µAP and recall@P90 of raw pixels, of the trained
   descriptors, with PCA whitening and with each of the three external-set normalisations;
   then the training throughput.

The query transformations come from the same family as the training ones
(different seeds, different images): that flatters learned descriptors more
than the real challenge does, where the query edits were partly manual.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import simcore
from simcore.isc import augment as A
from simcore.isc import checks
from simcore.isc import data as Dt
from simcore.isc import descriptors as D
from simcore.isc.commands import error_line, evaluate_files, match_files
from simcore.isc.embed import embed_folders, write_descriptors
from simcore.isc.files import save_image, write_text
from simcore.isc.train import TrainConfig, TrainSetupError, train

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


def _save_png(x, path):
    from PIL import Image
    # sync=False: scratch files of a fresh folder, thousands of them (a disk flush each would add seconds)
    save_image(Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()), path, sync=False, compress_level=1)


def write_benchmark(bench, folder):
    """The benchmark as files: ``references/R*.png``, ``queries/Q*.png``, ``training/T*.png`` (lossless,
    so the pixels are the benchmark's own) and ``ground_truth.csv``. Returns {role: folder}."""
    folders = {}
    for role, images, ids in (("references", bench.references, bench.reference_ids),
                              ("queries", bench.queries, bench.query_ids),
                              ("training", bench.training, [f"T{i:05d}" for i in range(bench.training.shape[0])])):
        folders[role] = os.path.join(folder, role)
        os.makedirs(folders[role], exist_ok=True)
        for x, name in zip(images, ids):
            _save_png(x, os.path.join(folders[role], f"{name}.png"))
    folders["ground_truth"] = os.path.join(folder, "ground_truth.csv")
    write_text(folders["ground_truth"], "query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in bench.ground_truth))
    return folders


def raw_pixel_descriptors(folders, size):
    """16x16 thumbnails (mean-removed, L2) of the query and reference files, as ``embed_folders`` returns them."""
    out = {}
    for role, key in (("query", "queries"), ("reference", "references")):
        s = Dt.load_image_set(folders[key])
        x = torch.stack([Dt.decode_image(p, size) for p in s.paths])
        out[role], out[f"{role}_ids"] = raw_pixels(x).numpy().astype(np.float32), s.ids()
    return out


#: The demo's training: ``simcore train`` settings (docs/train.md) on the training cells.
TRAIN_DEFAULTS = dict(drip=(200, "ALL"), steps=(250, 750), batch_size=(64,), dim=128, widths=(32, 64, 128, 256),
                      image_size=32, lr=3e-3, head_lr=3e-2, margin=0.2, scale=30.0, sample_rate=1.0, warmup=30,
                      views=4, workers=1)


def check_run_options(out, train_settings, seed=0):
    """``run``'s options alone, before any work: the training settings (``TrainConfig``'s checks), the seed
    and the output folder. Returns the training settings with the defaults filled in."""
    unknown = set(train_settings) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training settings {sorted(unknown)} (known: {sorted(TRAIN_DEFAULTS)})")
    settings = dict(TRAIN_DEFAULTS, **train_settings)
    TrainConfig(images="", output="", **settings).normalised()   # bad settings fail before any work
    checks.integer("--seed", seed, 0, 2**32 - 1)
    if out is not None:
        checks.output_folder("--out", out, "demo's files")
        if any(os.path.exists(os.path.join(out, d)) for d in ("images", "run")):
            raise TrainSetupError(f"{out} already holds a demo's files (images/, run/): give another --out folder "
                                  "or remove it")
    return settings


def _train_and_embed(folder, folders, bench, settings, seed, progress, log):
    """``simcore train`` on the training images, then ``simcore embed`` of the three sets (and their raw
    pixels): (the training result, its TrainConfig, descriptors.h5, raw_pixels.h5, the training descriptors' count)."""
    # simcore train: every training cell its own class, drip training, a PartialMarginHead.
    run_dir = os.path.join(folder, "run")
    config = TrainConfig(images=folders["training"], output=run_dir, backbone="smallcnn", seed=seed,
                         progress=progress, **settings)
    trained = train(config, log_fn=lambda msg: log(f"[demo] train: {msg}"))
    # simcore embed: flip test-time augmentation; the training descriptors go into the same file.
    embedded = embed_folders([os.path.join(run_dir, "final.pt")], query=folders["queries"],
                             reference=folders["references"], train=folders["training"], flip=True, batch_size=256)
    descriptors = os.path.join(folder, "descriptors.h5")
    write_descriptors(descriptors, embedded)
    raw = os.path.join(folder, "raw_pixels.h5")
    write_descriptors(raw, raw_pixel_descriptors(folders, int(bench.references.shape[-1])))
    return trained, config, descriptors, raw, embedded["train"]


def _table(folder, ground_truth, descriptors, raw, train_descriptors):
    """The table's rows: ``simcore match`` + ``simcore eval`` of each kind of descriptor, one predictions file per row."""
    n_train = train_descriptors.shape[0]
    pca_dim = min(int(train_descriptors.shape[1]), 64 if n_train > 128 else n_train // 2)
    table = [
        ("raw pixels (16x16)", "raw_pixels", dict(descriptors=raw)),
        ("trained CNN (flip-symmetrised)", "trained", dict(descriptors=descriptors)),
        (f"+ PCA whitening ({pca_dim}d, fit on training)", "pca",
         dict(descriptors=descriptors, train=descriptors, pca=pca_dim)),
        ("+ score normalisation (beta=2, n=10)", "score",
         dict(descriptors=descriptors, train=descriptors, normalize="score", neighbors=min(10, n_train))),
        ("+ negative-embedding subtraction (beta=0.35, k=10)", "negative",
         dict(descriptors=descriptors, train=descriptors, normalize="negative", neighbors=min(10, n_train))),
        ("+ query shift (K=100, top-3, 1.8*sqrt(c), L2 scores)", "shift",
         dict(descriptors=descriptors, train=descriptors, normalize="shift", neighbors=min(100, n_train))),
    ]
    os.makedirs(os.path.join(folder, "predictions"), exist_ok=True)
    rows = []
    for name, key, match_args in table:
        predictions = os.path.join(folder, "predictions", f"{key}.csv")
        match_files(output=predictions, **match_args)
        m = evaluate_files(predictions, ground_truth)
        rows.append({"descriptors": name, "micro_ap": m.micro_ap, "recall_at_p90": m.recall_at_p90,
                     "recall_at_rank1": m.recall_at_rank1, "recall_at_rank10": m.recall_at_rank10})
    return rows


def _summary(seed, rows, bench, trained, config, t_start):
    steps = [s["steps"] for s in trained.stages]
    images_seen = sum(s["steps"] * min(b, s["classes"])            # a stage's batch holds at most its classes
                      for s, b in zip(trained.stages, config.normalised().batch_size))
    return {
        "seed": seed, "rows": rows,
        "references": int(bench.references.shape[0]), "queries": int(bench.queries.shape[0]),
        "copies": sum(1 for _, r in bench.ground_truth if r), "training_images": int(bench.training.shape[0]),
        "train_stages": [{"classes": s["classes"], "steps": s["steps"], "final_loss": s["final_loss"]}
                         for s in trained.stages],
        "train_steps": sum(steps), "train_images_seen": images_seen,
        "train_images_per_second": trained.images_per_second,
        "train_workers": config.workers,
        "final_loss": trained.stages[-1]["final_loss"] if trained.stages else float("nan"),
        "threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t_start,
    }


def run(seed=0, *, max_references=None, max_training=None, train_scales=TRAIN_SCALES, per_photo=TRAIN_PER_PHOTO,
        out=None, progress=True, quiet=False, **train_settings):
    """Build the benchmark, write it as image files, then ``simcore train`` -> ``simcore embed`` ->
    ``simcore match`` -> ``simcore eval`` through their Python functions; returns a dict with the table
    rows and training figures. ``train_settings`` override ``TRAIN_DEFAULTS`` (``TrainConfig`` fields)."""
    settings = check_run_options(out, train_settings, seed)
    t_start = time.perf_counter()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    with contextlib.ExitStack() as stack:
        if out is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="simcore-demo-"))
        else:
            folder = out
            os.makedirs(folder, exist_ok=True)
        bench = build_benchmark(seed, max_references=max_references, max_training=max_training,
                                train_scales=train_scales, per_photo=per_photo)
        folders = write_benchmark(bench, os.path.join(folder, "images"))
        log(f"[demo] {bench.references.shape[0]} references, {bench.queries.shape[0]} queries "
            f"({sum(1 for _, r in bench.ground_truth if r)} copies), {bench.training.shape[0]} training images "
            f"(built and written to {os.path.join(folder, 'images')} in {time.perf_counter() - t_start:.1f} s)")
        trained, config, descriptors, raw, train_descriptors = _train_and_embed(folder, folders, bench, settings,
                                                                                seed, progress, log)
        rows = _table(folder, folders["ground_truth"], descriptors, raw, train_descriptors)
        result = _summary(seed, rows, bench, trained, config, t_start)
        if out is not None:
            write_text(os.path.join(folder, "results.json"), json.dumps(result, indent=2))
    return result


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
    stages = " + ".join(f"{s['steps']}" for s in result["train_stages"])
    classes = " -> ".join(f"{s['classes']}" for s in result["train_stages"])
    lines.append(f"training: drip {classes} classes, {stages} steps, {result['train_images_seen']} images, "
                 f"{result['train_images_per_second']:.0f} images/s (augmentation in {result['train_workers']} "
                 f"worker{'s' if result['train_workers'] != 1 else ''}), {result['threads']} threads; "
                 f"final loss {result['final_loss']:.3f}; total {result['total_seconds']:.0f} s")
    return "\n".join(lines)


#: ``--quick``: a tiny configuration (seconds), for smoke and determinism tests.
QUICK = dict(max_references=40, max_training=120, widths=(16, 32, 64, 64), dim=32, drip=(60, "ALL"),
             batch_size=(32,), steps=(10, 10), views=1, workers=0)


def _parser(prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the benchmark and the training (0 to 2^32-1)")
    steps = ",".join(map(str, TRAIN_DEFAULTS["steps"]))
    p.add_argument("--steps", default=None, metavar="S[,S...]",
                   help=f"training steps per drip stage, or one for all (default {steps}; about 3-4 minutes on "
                        "2 idle CPU cores); reproducible for a seed")
    p.add_argument("--batch-size", default=None, metavar="B[,B...]",
                   help=f"per drip stage, or one for all (default {TRAIN_DEFAULTS['batch_size'][0]})")
    p.add_argument("--out", default=None, help="keep the demo's files here: images/ (the benchmark as PNG files "
                   "and ground_truth.csv), run/ (the training run), descriptors.h5, raw_pixels.h5, "
                   "predictions/*.csv, results.json (default: a temporary folder, removed at the end)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds; for smoke tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op thread count (default: torch's, one per core); the numbers are bit-identical "
                        "for a seed only at the same thread count (float sums are split differently across threads)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none anyway unless stderr is a terminal)")
    return p


#: --threads' upper bound (torch's thread pool; far above any machine's cores).
MAX_THREADS = 1024


def main(argv=None, prog="python -m simcore.isc.demo"):
    """The demo's command line (``simcore demo`` hands its arguments here)."""
    a = _parser(prog).parse_args(argv)
    kwargs = dict(seed=a.seed, out=a.out, progress=not a.no_progress and sys.stderr.isatty(), quiet=a.json)
    kwargs.update(QUICK if a.quick else {})
    kwargs.update({k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size)) if v is not None})
    try:
        threads = None if a.threads is None else checks.integer("--threads", a.threads, 1, MAX_THREADS)
        check_run_options(a.out, {k: v for k, v in kwargs.items() if k in TRAIN_DEFAULTS}, a.seed)
        # stdout stays pure JSON under --json.
        print(simcore.implementation("cpu"), file=sys.stderr if a.json else sys.stdout, flush=True)
        if threads is not None:
            torch.set_num_threads(threads)
        result = run(**kwargs)
    except Exception as e:  # noqa: BLE001 - user errors become one line; bugs re-raise below
        line = error_line(prog, e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if a.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
