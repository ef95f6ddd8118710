"""The ``simcore`` commands that put a trained checkpoint to work (``simcore.isc.models`` does the work):

    simcore eval-verification CKPT lfw.bin[,cfp_fp.bin,...] [--json]
    simcore eval-reid CKPT QUERY_DIR GALLERY_DIR [--json]
    simcore export CKPT -o model.onnx [--format onnx|export]
    simcore convert SRC -o shards/train-%06d.tar [--labels folder|image] [--per-shard N]
"""
from __future__ import annotations

import json
import sys

__all__ = ["add_model_commands"]


def _print_metrics(title, metrics):
    print(title)
    for key, value in metrics.items():
        shown = int(value) if key in ("pairs", "queries", "queries_without_match", "junk") else f"{value:.4f}"
        print(f"  {key}: {shown}")


def cmd_eval_verification(a):
    from simcore.isc.models import evaluate_verification
    bins = [b for b in a.bins.split(",") if b]
    results = evaluate_verification(a.checkpoint, bins, device=a.device, batch_size=a.batch_size,
                                    workers=a.workers, flip=not a.no_flip, folds=a.folds)
    if a.json:
        print(json.dumps(results))
        return 0
    for name, metrics in results.items():
        _print_metrics(f"{name}:", metrics)
    return 0


def cmd_eval_reid(a):
    from simcore.isc.models import evaluate_reid
    result = evaluate_reid(a.checkpoint, a.query, a.gallery, device=a.device, batch_size=a.batch_size,
                           workers=a.workers, flip=a.flip)
    if a.json:
        print(json.dumps(result))
    else:
        _print_metrics("re-identification:", result)
    return 0


def cmd_export(a):
    from simcore.isc.models import export_file
    path = export_file(a.checkpoint, a.output, format=a.format)
    if a.json:
        print(json.dumps({"output": path, "format": a.format}))
    else:
        print(f"wrote {path} ({a.format})")
    return 0


def cmd_convert(a):
    from simcore.isc.models import convert_source
    paths = convert_source(a.source, a.output, labels=a.labels, per_shard=a.per_shard, strict=a.strict,
                           log=lambda m: print(f"[simcore convert] {m}", file=sys.stderr))
    if a.json:
        print(json.dumps({"shards": paths}))
    else:
        print(f"wrote {len(paths)} shard(s): {paths[0]}{' ... ' + paths[-1] if len(paths) > 1 else ''}")
    return 0


def _common(p):
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_eval_verification(sub):
    v = sub.add_parser("eval-verification", help="face verification accuracy of a checkpoint on InsightFace .bin files",
                       description="10-fold accuracy (squared L2, InsightFace's threshold grid) and TAR at FAR "
                                   "1e-3 / 1e-4 of each .bin (pickled pairs of encoded images). docs/face_reid.md")
    v.add_argument("checkpoint", metavar="CKPT", help="a simcore train checkpoint")
    v.add_argument("bins", metavar="BIN[,BIN...]", help="verification .bin files, comma-separated")
    v.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation (default: flip, as InsightFace)")
    v.add_argument("--folds", type=int, default=10, help="cross-validation folds (default 10)")
    _common(v)
    v.set_defaults(func=cmd_eval_verification)


def _add_eval_reid(sub):
    r = sub.add_parser("eval-reid", help="re-identification rank-k and mAP of a checkpoint (Market-1501 names)",
                       description="CMC rank-1/5/10 and mAP of query images against gallery images named "
                                   "PPPP_cC... (person, camera); same person and camera excluded. docs/face_reid.md")
    r.add_argument("checkpoint", metavar="CKPT", help="a simcore train checkpoint")
    r.add_argument("query", metavar="QUERY_DIR", help="folder of query images")
    r.add_argument("gallery", metavar="GALLERY_DIR", help="folder of gallery images")
    r.add_argument("--flip", action="store_true", help="flip test-time augmentation")
    _common(r)
    r.set_defaults(func=cmd_eval_reid)


def _add_export(sub):
    e = sub.add_parser("export", help="a checkpoint's model (backbone + L2 normalisation) as ONNX or torch.export",
                       description="Export the embedding model with a dynamic batch size: ONNX (input 'images', "
                                   "float32 (N, 3, S, S) in [0, 1]; output 'embeddings') or a torch.export archive.")
    e.add_argument("checkpoint", metavar="CKPT", help="a simcore train checkpoint")
    e.add_argument("-o", "--output", required=True, help="file to write (e.g. model.onnx)")
    e.add_argument("--format", default="onnx", help="onnx (default) or export (torch.export archive)")
    e.add_argument("--json", action="store_true", help="print a JSON summary")
    e.set_defaults(func=cmd_export)


def _add_convert(sub):
    c = sub.add_parser("convert", help="an image folder or a RecordIO .rec/.idx pair -> WebDataset shards",
                       description="Write the images (bytes as they are) with their class as tar shards "
                                   "(key.jpg + key.cls) for simcore train.")
    c.add_argument("source", metavar="SRC", help="image folder, or a .rec file (its .idx beside it)")
    c.add_argument("-o", "--output", required=True, metavar="SHARD_PATTERN", help="e.g. shards/train-%%06d.tar")
    c.add_argument("--labels", default="folder", help="image folders: folder (one class a sub-folder, default) "
                                                      "or image (one class an image)")
    c.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    c.add_argument("--strict", action="store_true", help="unreadable images or records are an error (default: skipped)")
    c.add_argument("--json", action="store_true", help="print the shard paths as JSON")
    c.set_defaults(func=cmd_convert)


def add_model_commands(sub):
    _add_eval_verification(sub)
    _add_eval_reid(sub)
    _add_export(sub)
    _add_convert(sub)
