"""The ``simcore`` command line: copy-detection matching and ISC 2021 evaluation.

    simcore match DESCRIPTORS.h5 [--train TRAIN] [--normalize ...] -o predictions.csv
    simcore match --query Q.npy --reference R.npy [--train T.npy] -o predictions.csv
    simcore eval predictions.csv ground_truth.csv [--json] [--plot pr.png]
    simcore demo [--quick] [--out DIR] ...   (simcore.isc.demo: the copy-detection benchmark)
    simcore train IMAGES_DIR -o RUN_DIR [--drip 50,100,ALL --steps ...]   (simcore.isc.train, docs/train.md)
    simcore embed CKPT [CKPT ...] --query Q_DIR --reference R_DIR [--train T_DIR --pca 256 --flip] -o out.h5
    simcore eval-verification CKPT lfw.bin[,cfp_fp.bin,...] [--json]    (face verification, docs/face_reid.md)
    simcore eval-reid CKPT QUERY_DIR GALLERY_DIR [--json]               (re-identification: rank-k, mAP)
    simcore export CKPT -o model.onnx [--format onnx|export]
    simcore convert SRC -o shards/train-%06d.tar                         (image folder or .rec -> WebDataset)

Descriptor files: the challenge's HDF5 layout (datasets ``query``,
``reference``, ``query_ids``, ``reference_ids``; a training file holds ``train``
and optionally ``train_ids``) or .npy arrays (N, D) whose ids are the row
numbers (or given with ``--query-ids`` / ``--reference-ids``, one id a line).
Errors are one line on stderr, naming the file and what is wrong, with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from simcore.isc import checks
from simcore.isc.cli_models import add_model_commands
from simcore.isc.commands import CLIError, error_line, evaluate_files, match_files, user_errors

__all__ = ["main"]


# ----------------------------------------------------------------------------------- commands

def cmd_match(a):
    summary = match_files(a.descriptors, query=a.query, reference=a.reference, train=a.train, query_ids=a.query_ids,
                          reference_ids=a.reference_ids, normalize=a.normalize, beta=a.beta, neighbors=a.neighbors,
                          dba=a.dba, pca=a.pca, k=a.k, max_results=a.max_results, metric=a.metric, output=a.output,
                          progress=(not a.no_progress) and sys.stderr.isatty())
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['predictions']} predictions ({summary['queries']} queries x {summary['references']} "
              f"references, k={a.k}, metric={summary['metric']}, normalize={a.normalize}"
              f"{' with dba' if a.dba else ''}) to {a.output}")
    return 0


def cmd_eval(a):
    m = evaluate_files(a.predictions, a.ground_truth, plot=a.plot)
    d = m.as_dict()
    if a.plot:
        d["plot"] = a.plot
    if a.json:
        print(json.dumps(d))
    else:
        print(f"micro_ap: {m.micro_ap:.4f}")
        print(f"recall_at_p90: {m.recall_at_p90:.4f}")
        print(f"recall_at_rank1: {m.recall_at_rank1:.4f}")
        print(f"recall_at_rank10: {m.recall_at_rank10:.4f}")
        print(f"predictions: {m.num_predictions}")
        print(f"ground_truth_pairs: {m.num_ground_truth}")
        if a.plot:
            print(f"plot: {a.plot}")
    return 0


def _train_config(a):
    """``simcore train``'s flags as a validated TrainConfig: a bad value is a CLIError (exit 2) before
    any image is read or model built."""
    from simcore.isc.train import TrainConfig
    cfg = TrainConfig(
        images=a.images, output=a.output, backbone=a.backbone, pretrained=a.pretrained, dim=a.dim,
        image_size=a.image_size, labels=a.labels, drip=a.drip, batch_size=a.batch_size, steps=a.steps,
        grad_accum=a.grad_accum,
        stop_loss=a.stop, stop_window=a.stop_window, precision=a.precision, loss=a.loss, margin=a.margin,
        scale=a.scale, sample_rate=a.sample_rate, subcenters=a.subcenters, lr=a.lr, head_lr=a.head_lr,
        optimizer=a.optimizer, momentum=a.momentum, weight_decay=a.weight_decay, warmup=a.warmup, views=a.views,
        seed=a.seed, workers=a.workers, augment_on=a.augment_on, device=a.device, threads=a.threads,
        checkpoint_every=a.checkpoint_every, resume=a.resume, val_dir=a.val_dir, val_max=a.val_max,
        val_bin=a.val_bin, val_reid=a.val_reid, plot=a.plot,
        tensorboard=a.tensorboard, strict=a.strict, progress=(not a.no_progress) and sys.stderr.isatty())
    try:
        cfg = cfg.normalised()
        cfg.check_files()
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:   # under torchrun each rank resolves its own
            from simcore.isc.train import resolve_device
            resolve_device(cfg.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return cfg


def cmd_train(a):
    from simcore.isc.train import SimulatedFailure, train

    cfg = _train_config(a)
    lead = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            r = train(cfg)
    except user_errors() as e:
        raise CLIError(str(e)) from None
    except SimulatedFailure as e:          # the test hook: an interrupted run, not a user error
        if lead:
            print(f"simcore train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:         # Ctrl-C: where the last checkpoint is, no traceback
        if lead:
            print(f"simcore train: {e or 'interrupted before training started: nothing was saved'}", file=sys.stderr)
        return 130
    if not lead:                           # under torchrun: rank 0 reports for the run
        return 0
    _print_train_summary(r, a.json)
    return 0


def _print_train_summary(r, as_json):
    summary = {"output": r.output, "checkpoint": r.checkpoint, "steps": len(r.losses),
               "final_loss": r.stages[-1]["final_loss"] if r.stages else None,
               "images_per_second": r.images_per_second, "stages": r.stages,
               "skipped_files": r.skipped_files, "dropped_samples": r.dropped_samples}
    if as_json:
        print(json.dumps(summary))
        return
    for s in r.stages:
        v = s.get("val")
        print(f"stage {s['stage'] + 1}: {s['classes']} classes, {s['steps']} steps, loss {s['final_loss']:.4f}"
              + (f", val µAP {v['micro_ap']:.4f} recall@P90 {v['recall_at_p90']:.4f}" if v else ""))
    print(f"{r.images_per_second:.1f} images/s; checkpoint {r.checkpoint}")


def cmd_embed(a):
    from simcore.isc.embed import embed_folders, write_descriptors

    progress = (not a.no_progress) and sys.stderr.isatty()
    checks.output_file("-o/--output", a.output, "descriptors")
    device = checks.device("--device", a.device)
    try:
        res = embed_folders(a.checkpoints, query=a.query, reference=a.reference, train=a.train, pca=a.pca,
                            flip=a.flip, batch_size=a.batch_size, workers=a.workers, device=device,
                            precision=a.precision, strict=a.strict, progress=progress,
                            log=lambda m: print(f"[simcore embed] {m}", file=sys.stderr))
    except user_errors() as e:            # duplicate ids, unreadable checkpoints, PCA without --train, ...
        raise CLIError(str(e)) from None
    write_descriptors(a.output, res)
    summary = {"output": a.output, "queries": len(res["query_ids"]), "references": len(res["reference_ids"]),
               "train": None if res["train"] is None else len(res["train_ids"]), "dim": int(res["query"].shape[1]),
               "models": len(a.checkpoints), "flip": a.flip}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['queries']} query, {summary['references']} reference"
              + (f", {summary['train']} training" if summary["train"] is not None else "")
              + f" descriptors ({summary['dim']}d, {summary['models']} model(s)) to {a.output}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="simcore", description="Copy detection: match descriptors, evaluate µAP.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_match_arguments(sub)
    _add_eval_arguments(sub)
    _add_train_arguments(sub)
    _add_embed_arguments(sub)
    add_model_commands(sub)
    # Listed for `simcore --help`; main() hands everything after `demo` to simcore.isc.demo.main.
    sub.add_parser("demo", add_help=False, help="the copy-detection benchmark on real photographs "
                                                "(simcore demo --help for its options)")
    return p


def _add_match_arguments(sub):
    m = sub.add_parser("match", help="nearest-neighbour matching -> predictions CSV",
                       description="Search each query's k nearest references (exact cosine top-k), pool the pairs "
                                   "and keep the globally best --max-results, like the official matcher.")
    m.add_argument("descriptors", nargs="?", help="HDF5 file with datasets query, reference, query_ids, reference_ids")
    m.add_argument("--query", help="query descriptors (.npy or .h5 dataset 'query'); overrides DESCRIPTORS")
    m.add_argument("--reference", help="reference descriptors (.npy or .h5 dataset 'reference')")
    m.add_argument("--train", help="external training descriptors (.npy or .h5 dataset 'train') for --normalize/--pca")
    m.add_argument("--query-ids", help="text file, one query id a line (default: HDF5 ids or row numbers)")
    m.add_argument("--reference-ids", help="text file, one reference id a line")
    m.add_argument("--normalize", choices=["none", "score", "negative", "shift"], default="none",
                   help="external-set normalisation: score (baseline, beta=2, n=10), negative (1st place, "
                        "beta=0.35, k=10), shift (2nd place query shift, alpha=1.8, K=100; L2 scores)")
    m.add_argument("--beta", type=float, default=None, help="beta (score, negative) or alpha (shift)")
    m.add_argument("--neighbors", type=int, default=None, help="n (score), k (negative) or K (shift)")
    m.add_argument("--dba", action="store_true",
                   help="with --normalize negative: first smooth the training set by database-side augmentation "
                        "(each descriptor -> normalised sim^3-weighted sum of its 10 nearest), as the 1st place")
    m.add_argument("--pca", type=int, default=None, metavar="DIM",
                   help="PCA-whiten to DIM dims (fitted on --train) before matching")
    m.add_argument("--k", type=int, default=10, help="neighbours kept per query (default 10)")
    m.add_argument("--max-results", type=int, default=500_000,
                   help="global cap on the number of pairs (default 500000 as the challenge)")
    m.add_argument("--metric", choices=["auto", "ip", "l2"], default="auto",
                   help="score = inner product (ip) or -squared L2 (l2, the official matcher's); auto: l2 after "
                        "--normalize shift, else ip")
    m.add_argument("-o", "--output", default="predictions.csv", help="predictions CSV (default predictions.csv)")
    m.add_argument("--json", action="store_true", help="print a JSON summary")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_match)


def _add_eval_arguments(sub):
    e = sub.add_parser("eval", help="µAP and recall@P90 of a predictions CSV against the ground truth",
                       description="ISC 2021 metrics: micro-average precision (ties negatives-first), recall at "
                                   "precision 0.9, recall at rank 1 and 10.")
    e.add_argument("predictions", help="CSV query_id,reference_id,score")
    e.add_argument("ground_truth", help="CSV query_id,reference_id (empty reference_id: no match)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--plot", metavar="PNG", help="save the precision-recall curve (needs matplotlib)")
    e.set_defaults(func=cmd_eval)


def _add_train_arguments(sub):
    """``simcore train``'s flags (the fields of ``simcore.isc.train.TrainConfig``)."""
    t = sub.add_parser("train", help="train a descriptor model on a folder of images (docs/train.md)",
                       description="Drip training of a copy-detection descriptor: every image its own class "
                                   "(or every sub-folder), augmented copies as positives, a PartialMarginHead "
                                   "margin loss, checkpoints to resume from. See docs/train.md.")
    t.add_argument("images", help="folder of images (recursive: jpg jpeg png webp bmp), a text file listing them, "
                                  "an InsightFace RecordIO .rec file (with --labels record), or WebDataset shards: "
                                  "a .tar or a pattern such as 'shards/train-{000000..000099}.tar' (with --labels "
                                  "cls or stem)")
    t.add_argument("-o", "--output", required=True, metavar="RUN_DIR",
                   help="run folder: last.pt, stage<k>.pt, log.jsonl, loss.png")
    t.add_argument("--backbone", default="smallcnn", help="smallcnn (default) or a timm model name (needs timm)")
    t.add_argument("--pretrained", action="store_true", help="timm backbones: start from pretrained weights")
    t.add_argument("--dim", type=int, default=256, help="embedding dims (default 256)")
    t.add_argument("--image-size", type=int, default=64, help="images are resized to this square (default 64)")
    t.add_argument("--labels", choices=["image", "folder", "record", "cls", "stem"], default="image",
                   help="image: every image its own class (default, the ISC recipe); folder: one class per "
                        "sub-folder; record: the labels of a RecordIO .rec file (IMAGES is the .rec, its .idx beside); "
                        "cls / stem: the shards' .cls members / the class before the first _ of each key")
    t.add_argument("--drip", default="ALL", metavar="N,N,...,ALL",
                   help="class count of each stage (default ALL: one stage with every class)")
    t.add_argument("--batch-size", default="32", metavar="B[,B...]", help="per stage, or one for all (default 32)")
    t.add_argument("--grad-accum", default="1", metavar="N",
                   help="micro-batches of --batch-size per optimizer step (default 1); steps count optimizer steps")
    t.add_argument("--steps", default="100", metavar="S[,S...]",
                   help="(maximum) steps per stage, or one for all (default 100)")
    t.add_argument("--stop", type=float, default=None, metavar="LOSS",
                   help="end a stage once the mean loss of the last --stop-window steps is below LOSS")
    t.add_argument("--stop-window", type=int, default=20, help="steps averaged by --stop (default 20)")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision (fp16 adds a GradScaler; default fp32)")
    t.add_argument("--loss", choices=["arcface", "cosface", "adaface", "magface", "curricularface", "cam"],
                   default="arcface", help="margin loss of the head (default arcface, s=40, m=0.4)")
    t.add_argument("--margin", type=float, default=None, help="the loss's margin (default per loss)")
    t.add_argument("--scale", type=float, default=None, help="logit scale s (default 40; cam 20)")
    t.add_argument("--sample-rate", type=float, default=0.1,
                   help="Partial FC: the batch's classes plus this fraction of all classes per step (default 0.1)")
    t.add_argument("--subcenters", type=int, default=1, help="sub-centres per class (default 1)")
    t.add_argument("--lr", type=float, default=1e-3, help="backbone learning rate (default 1e-3)")
    t.add_argument("--head-lr", type=float, default=None, help="head learning rate (default: --lr)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (head: AdamW rows, no decay) or sgd (momentum 0.9); default adam")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    t.add_argument("--warmup", type=int, default=0, help="linear warm-up steps at each stage start (default 0)")
    t.add_argument("--views", type=int, default=4, help="augmented copies per image for new centres (default 4)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentations and init (default 0)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    t.add_argument("--augment-on", choices=("workers", "device"), default="workers",
                   help="where the training copies are made: per sample in the DataLoader workers (default), or "
                        "batched on the training device, the workers then only decoding")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps (default: at stage ends only)")
    t.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint (RUN_DIR/last.pt)")
    t.add_argument("--val-dir", help="validation images: µAP of augmented copies against them at each stage end")
    t.add_argument("--val-max", type=int, default=500, help="at most this many validation images (default 500)")
    t.add_argument("--val-bin", metavar="A.bin[,B.bin...]",
                   help="face verification .bin files: 10-fold accuracy and TAR@FAR at each stage end (val_NAME)")
    t.add_argument("--val-reid", metavar="QUERY_DIR,GALLERY_DIR",
                   help="re-identification folders (Market-1501 names): rank-k and mAP at each stage end (val_reid)")
    t.add_argument("--plot", action="store_true", help="save the loss curve to RUN_DIR/loss.png (needs matplotlib)")
    t.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard events in RUN_DIR/tb (needs tensorboard; without it a note, training goes on)")
    t.add_argument("--strict", action="store_true", help="unreadable image files are an error (default: skipped)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    t.set_defaults(func=cmd_train)


def _add_embed_arguments(sub):
    b = sub.add_parser("embed", help="descriptors of image folders from checkpoints -> challenge HDF5",
                       description="Embed query, reference (and training) images with one checkpoint or an "
                                   "ensemble (concatenated, PCA-whitened on the training images, L2), in the "
                                   "HDF5 layout that `simcore match` reads.")
    b.add_argument("checkpoints", nargs="+", metavar="CKPT", help="simcore train checkpoints (several: an ensemble)")
    b.add_argument("--query", required=True, help="folder (or list) of query images")
    b.add_argument("--reference", required=True, help="folder (or list) of reference images")
    b.add_argument("--train", help="folder (or list) of the external training images (PCA, ensembles, "
                                   "written as dataset 'train' for simcore match --train)")
    b.add_argument("--pca", type=int, default=None, metavar="DIM",
                   help="PCA-whiten to DIM dims, fitted on --train (ensembles default to the full dims)")
    b.add_argument("--flip", action="store_true", help="flip test-time augmentation: normalise(f(x) + f(flip x))")
    b.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    b.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    b.add_argument("--strict", action="store_true", help="unreadable image files are an error (default: skipped)")
    b.add_argument("-o", "--output", default="descriptors.h5", help="HDF5 file to write (default descriptors.h5)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    b.set_defaults(func=cmd_embed)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings on the command line: one line, ``simcore: warning: ...`` (not Python's two-line form)."""
    text = " ".join(str(message).split())
    print(f"simcore: warning: {text}", file=sys.stderr if file is None else file)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        if argv[:1] == ["demo"]:
            from simcore.isc import demo
            return demo.main(argv[1:], prog="simcore demo")
        args = build_parser().parse_args(argv)
        try:
            return args.func(args)
        except Exception as e:  # noqa: BLE001 - user errors become one line; bugs re-raise below
            line = error_line(f"simcore {args.command}", e)
            if line is None:
                raise
            print(line, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
