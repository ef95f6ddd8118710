"""Hostile input to every ``simcore`` command, as a table: every flag with a value out of its range (NaN,
infinities, negatives, zero, huge), every kind of input file truncated, empty, binary or of the wrong
shape, writes that fail (a file-size limit with SIGXFSZ ignored: a full disk), link cycles.

Each case runs ``simcore ARGS`` in a process of its own (tests/hostile_runner.py forks one per case
from a driver that imported the command once) and must end with exit code 2 and a one-line error, or
with a named warning, never a traceback or a signal; the file it was told to write must be left
bit-identical, with no temporary file beside it. The training tool's own values are tested with its
configuration (tests/test_train*.py); here only its flag parsing.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import h5py
from conftest import TESTS_DIR, subprocess_env

OLD = b"old output, must survive\n"
HUGE = str(10 ** 30)


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            if isinstance(v, list):
                f.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
            else:
                f[k] = v


def _images(folder, n, rng, size=32):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def _descriptor_files(w, rng):
    ref = rng.standard_normal((30, 16)).astype(np.float32)
    q = (ref + 0.1 * rng.standard_normal((30, 16))).astype(np.float32)
    ids_q, ids_r = [f"Q{i}" for i in range(30)], [f"R{i}" for i in range(30)]
    _h5(w / "desc.h5", query=q, reference=ref, query_ids=ids_q, reference_ids=ids_r,
        train=rng.standard_normal((40, 16)).astype(np.float32))
    _h5(w / "few.h5", train=rng.standard_normal((5, 16)).astype(np.float32))      # 5 rows: 4 directions
    _h5(w / "shape.h5", query=q[0], reference=ref, query_ids=ids_q, reference_ids=ids_r)
    _h5(w / "ids.h5", query=q, reference=ref, query_ids=ids_q[:3], reference_ids=ids_r)
    _h5(w / "group.h5", reference=ref)
    with h5py.File(w / "group.h5", "a") as f:
        f.create_group("query")
    data = (w / "desc.h5").read_bytes()
    (w / "trunc.h5").write_bytes(data[: len(data) // 2])
    (w / "empty.h5").write_bytes(b"")
    (w / "bin.h5").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    np.save(w / "q.npy", q)
    np.save(w / "r.npy", ref)
    np.save(w / "nan.npy", np.where(np.arange(16) == 3, np.nan, q))
    np.save(w / "int.npy", np.ones((30, 16), np.int64))
    np.save(w / "cube.npy", np.ones((2, 3, 16), np.float32))
    np.save(w / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (w / "trunc.npy").write_bytes((w / "q.npy").read_bytes()[:200])
    (w / "empty.npy").write_bytes(b"")
    (w / "bin.npy").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (w / "ids_short.txt").write_text("Q0\nQ1\n")
    (w / "ids_bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)


def _csv_files(w):
    gt = "query_id,reference_id\n" + "".join(f"Q{i},R{i}\n" for i in range(20)) + "Q25,\n"
    (w / "gt.csv").write_text(gt)
    rows = [f"Q{i},R{j},{1.0 - 0.01 * (i + j)}\n" for i in range(30) for j in range(3)]
    (w / "pred.csv").write_text("query_id,reference_id,score\n" + "".join(rows))
    text = (w / "pred.csv").read_text()
    (w / "pred_trunc.csv").write_text(text[: len(text) // 2 + 7])             # cut mid-line
    (w / "empty.csv").write_text("")
    (w / "header.csv").write_text("query_id,reference_id,score\n")
    (w / "bin.csv").write_bytes(bytes(range(256)) * 8)
    (w / "two_cols.csv").write_text("Q0,R0\nQ1,R1\n")
    (w / "nan_score.csv").write_text("Q0,R0,nan\n")
    (w / "dup.csv").write_text("Q0,R0,0.5\nQ0,R0,0.4\n")
    (w / "gt_empty.csv").write_text("")
    (w / "gt_nomatch.csv").write_text("query_id,reference_id\nQ0,\n")


def _image_folders(w, rng):
    for d, n in (("q", 6), ("r", 6), ("t", 12)):
        _images(w / d, n, rng)
    _images(w / "cyc", 3, rng)
    os.symlink(".", w / "cyc" / "loop")                              # a link cycle
    os.symlink(os.path.join("..", "r"), w / "cyc" / "again")         # a second way to r/ (6 more images)
    os.makedirs(w / "bad_images")
    data = (w / "q" / "0.png").read_bytes()
    (w / "bad_images" / "trunc.png").write_bytes(data[: len(data) // 2])
    (w / "bad_images" / "empty.jpg").write_bytes(b"")
    (w / "bad_images" / "bin.png").write_bytes(bytes(range(256)) * 4)
    os.makedirs(w / "no_images")
    (w / "no_images" / "notes.txt").write_text("nothing here")
    (w / "list_bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)


def _checkpoints(w):
    from simcore.isc.cli import main
    assert main(["train", str(w / "t"), "-o", str(w / "run"), "--dim", "16", "--image-size", "16", "--steps", "2",
                 "--batch-size", "4", "--views", "1", "--no-progress"]) == 0
    data = (w / "run" / "final.pt").read_bytes()
    (w / "trunc.pt").write_bytes(data[: len(data) // 2])
    (w / "empty.pt").write_bytes(b"")
    (w / "bin.pt").write_bytes(bytes(range(256)) * 16)
    torch.save({"model": {}}, w / "foreign.pt")
    torch.save(torch.zeros(3), w / "tensor.pt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny set of every input kind, good and bad, shared by the module's cases."""
    w = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    _descriptor_files(w, rng)
    _csv_files(w)
    _image_folders(w, rng)
    _checkpoints(w)
    (w / "a_file").write_text("a regular file\n")
    return w


MATCH = ["match", "desc.h5"]
NORM = MATCH + ["--train", "desc.h5", "--normalize"]
EVAL = ["eval", "pred.csv", "gt.csv"]
EMBED = ["embed", "run/final.pt", "--query", "q", "--reference", "r"]
TRAIN = ["train", "t", "-o", "train_run"]
ERR = "error"

# (case id, argv with {out} where the command writes, expected: ERR + text in the line, or "warning" + text,
#  and the file-size limit in bytes or None). Every out-of-range value is refused before any work.
CASES = [
    # ---- match: every flag out of range
    ("match-k-zero", MATCH + ["--k", "0", "-o", "{out}"], ERR, "--k must be an integer >= 1"),
    ("match-k-negative", MATCH + ["--k", "-5", "-o", "{out}"], ERR, "--k must be an integer >= 1"),
    ("match-k-nan", MATCH + ["--k", "nan", "-o", "{out}"], ERR, "--k: invalid int value"),
    ("match-max-results-zero", MATCH + ["--max-results", "0", "-o", "{out}"], ERR, "--max-results must be"),
    ("match-max-results-negative", MATCH + ["--max-results", "-1", "-o", "{out}"], ERR, "--max-results must be"),
    ("match-beta-nan-score", NORM + ["score", "--beta", "nan", "-o", "{out}"], ERR, "--beta must be a finite number"),
    ("match-beta-inf-negative", NORM + ["negative", "--beta", "inf", "-o", "{out}"], ERR, "--beta must be a finite"),
    ("match-beta-minus-inf-shift", NORM + ["shift", "--beta=-inf", "-o", "{out}"], ERR, "--beta must be a finite"),
    ("match-beta-negative", NORM + ["score", "--beta=-1", "-o", "{out}"], ERR, "in [0, 1000]"),
    ("match-beta-huge", NORM + ["score", "--beta", "1e300", "-o", "{out}"], ERR, "in [0, 1000]"),
    ("match-neighbors-zero", NORM + ["score", "--neighbors", "0", "-o", "{out}"], ERR, "--neighbors must be"),
    ("match-neighbors-negative", NORM + ["shift", "--neighbors", "-3", "-o", "{out}"], ERR, "--neighbors must be"),
    ("match-neighbors-huge", NORM + ["negative", "--neighbors", HUGE, "-o", "{out}"], ERR, "needs at least that many"),
    ("match-pca-zero", MATCH + ["--train", "desc.h5", "--pca", "0", "-o", "{out}"], ERR, "--pca must be an integer"),
    ("match-pca-negative", MATCH + ["--train", "desc.h5", "--pca", "-2", "-o", "{out}"], ERR, "--pca must be"),
    ("match-pca-huge", MATCH + ["--train", "desc.h5", "--pca", HUGE, "-o", "{out}"], ERR, "--pca must be in [1, 16]"),
    ("match-pca-no-variance", MATCH + ["--train", "few.h5", "--pca", "8", "-o", "{out}"], ERR,
     "training descriptors vary in only 4"),
    ("match-pca-without-train", MATCH + ["--pca", "8", "-o", "{out}"], ERR, "need --train"),
    ("match-normalize-without-train", MATCH + ["--normalize", "score", "-o", "{out}"], ERR, "need --train"),
    ("match-dba-without-negative", NORM + ["score", "--dba", "-o", "{out}"], ERR, "--dba smooths"),
    ("match-normalize-unknown", MATCH + ["--normalize", "both", "-o", "{out}"], ERR, "invalid choice"),
    ("match-metric-unknown", MATCH + ["--metric", "cosine", "-o", "{out}"], ERR, "invalid choice"),
    ("match-output-folder", MATCH + ["-o", "q"], ERR, "-o/--output q: is a folder"),
    ("match-output-empty", MATCH + ["-o", ""], ERR, "-o/--output needs a file name"),
    ("match-output-under-a-file", MATCH + ["-o", "a_file/p.csv"], ERR, "is not a folder"),
    # ---- match: every descriptor file kind broken
    ("match-h5-truncated", ["match", "trunc.h5", "-o", "{out}"], ERR, "trunc.h5: not a readable HDF5 file"),
    ("match-h5-empty", ["match", "empty.h5", "-o", "{out}"], ERR, "empty.h5: not a readable HDF5 file"),
    ("match-h5-binary", ["match", "bin.h5", "-o", "{out}"], ERR, "bin.h5: not a readable HDF5 file"),
    ("match-h5-wrong-shape", ["match", "shape.h5", "-o", "{out}"], ERR, "must be a 2-D array"),
    ("match-h5-wrong-ids", ["match", "ids.h5", "-o", "{out}"], ERR, "has 3 ids for 30 rows"),
    ("match-h5-group", ["match", "group.h5", "-o", "{out}"], ERR, "is an HDF5 group"),
    ("match-h5-missing", ["match", "nowhere.h5", "-o", "{out}"], ERR, "nowhere.h5: no such file"),
    ("match-h5-folder", ["match", "q", "-o", "{out}"], ERR, "q: not a regular file"),
    ("match-npy-truncated", ["match", "--query", "trunc.npy", "--reference", "r.npy", "-o", "{out}"], ERR,
     "trunc.npy: not a readable .npy"),
    ("match-npy-empty", ["match", "--query", "empty.npy", "--reference", "r.npy", "-o", "{out}"], ERR,
     "empty.npy: not a readable .npy"),
    ("match-npy-binary", ["match", "--query", "bin.npy", "--reference", "r.npy", "-o", "{out}"], ERR,
     "bin.npy: not a readable .npy"),
    ("match-npy-3d", ["match", "--query", "cube.npy", "--reference", "r.npy", "-o", "{out}"], ERR, "2-D array"),
    ("match-npy-int", ["match", "--query", "int.npy", "--reference", "r.npy", "-o", "{out}"], ERR, "floating-point"),
    ("match-npy-nan", ["match", "--query", "nan.npy", "--reference", "r.npy", "-o", "{out}"], ERR, "NaN"),
    ("match-npy-pickle", ["match", "--query", "obj.npy", "--reference", "r.npy", "-o", "{out}"], ERR,
     "obj.npy: not a readable .npy"),
    ("match-npy-unknown-ext", ["match", "--query", "gt.csv", "--reference", "r.npy", "-o", "{out}"], ERR,
     "unknown descriptor format"),
    ("match-ids-short", ["match", "--query", "q.npy", "--reference", "r.npy", "--query-ids", "ids_short.txt",
                         "-o", "{out}"], ERR, "2 query ids for 30 descriptor rows"),
    ("match-reference-ids-short", ["match", "--query", "q.npy", "--reference", "r.npy", "--reference-ids",
                                   "ids_short.txt", "-o", "{out}"], ERR, "2 reference ids for 30 descriptor rows"),
    ("match-reference-missing", ["match", "--query", "q.npy", "--reference", "nowhere.npy", "-o", "{out}"], ERR,
     "--reference nowhere.npy: no such file"),
    ("match-ids-binary", ["match", "--query", "q.npy", "--reference", "r.npy", "--query-ids", "ids_bin.txt",
                          "-o", "{out}"], ERR, "not a UTF-8 text file"),
    # ---- eval
    ("eval-predictions-truncated", ["eval", "pred_trunc.csv", "gt.csv"], ERR, "looks truncated"),
    ("eval-predictions-empty", ["eval", "empty.csv", "gt.csv"], ERR, "no predictions"),
    ("eval-predictions-header-only", ["eval", "header.csv", "gt.csv"], ERR, "no predictions"),
    ("eval-predictions-binary", ["eval", "bin.csv", "gt.csv"], ERR, "not a UTF-8 text file"),
    ("eval-predictions-two-columns", ["eval", "two_cols.csv", "gt.csv"], ERR, "expected 3 columns"),
    ("eval-predictions-nan-score", ["eval", "nan_score.csv", "gt.csv"], ERR, "score is NaN"),
    ("eval-predictions-duplicate", ["eval", "dup.csv", "gt.csv"], ERR, "uplicate"),
    ("eval-predictions-hdf5", ["eval", "desc.h5", "gt.csv"], ERR, "desc.h5"),
    ("eval-predictions-missing", ["eval", "nowhere.csv", "gt.csv"], ERR, "nowhere.csv: no such file"),
    ("eval-ground-truth-empty", ["eval", "pred.csv", "gt_empty.csv"], ERR, "no (query, reference) pairs"),
    ("eval-ground-truth-no-match", ["eval", "pred.csv", "gt_nomatch.csv"], ERR, "no (query, reference) pairs"),
    ("eval-ground-truth-binary", ["eval", "pred.csv", "bin.csv"], ERR, "not a UTF-8 text file"),
    ("eval-ground-truth-is-predictions", ["eval", "pred.csv", "pred.csv"], ERR, "expected 2 columns"),
    ("eval-plot-unknown-format", EVAL + ["--plot", "{out}.xyz"], ERR, "the file name must end in one of"),
    ("eval-plot-folder", EVAL + ["--plot", "q"], ERR, "--plot q: is a folder"),
    ("eval-plot-empty", EVAL + ["--plot", ""], ERR, "--plot needs a file name"),
    # ---- embed: every flag out of range
    ("embed-batch-size-zero", EMBED + ["--batch-size", "0", "-o", "{out}"], ERR, "--batch-size must be an integer"),
    ("embed-batch-size-negative", EMBED + ["--batch-size", "-4", "-o", "{out}"], ERR, "--batch-size must be"),
    ("embed-batch-size-nan", EMBED + ["--batch-size", "nan", "-o", "{out}"], ERR, "invalid int value"),
    ("embed-workers-negative", EMBED + ["--workers", "-1", "-o", "{out}"], ERR, "--workers must be an integer in"),
    ("embed-workers-huge", EMBED + ["--workers", HUGE, "-o", "{out}"], ERR, "--workers must be an integer in"),
    ("embed-pca-zero", EMBED + ["--train", "t", "--pca", "0", "-o", "{out}"], ERR, "--pca must be an integer"),
    ("embed-pca-negative", EMBED + ["--train", "t", "--pca", "-1", "-o", "{out}"], ERR, "--pca must be"),
    ("embed-pca-huge", EMBED + ["--train", "t", "--pca", HUGE, "-o", "{out}"], ERR, "--pca"),
    ("embed-pca-above-the-training-images", EMBED + ["--train", "t", "--pca", "14", "-o", "{out}"], ERR,
     "12 training images span at most 11 directions"),
    ("embed-pca-without-train", EMBED + ["--pca", "4", "-o", "{out}"], ERR, "give --train"),
    ("embed-device-unknown", EMBED + ["--device", "tpu", "-o", "{out}"], ERR, "--device must be auto, cpu, cuda"),
    ("embed-device-no-such-gpu", EMBED + ["--device", "cuda:99", "-o", "{out}"], ERR, "--device cuda:99"),
    ("embed-device-empty", EMBED + ["--device", "", "-o", "{out}"], ERR, "--device must be"),
    ("embed-precision-unknown", EMBED + ["--precision", "fp64", "-o", "{out}"], ERR, "invalid choice"),
    ("embed-output-folder", EMBED + ["-o", "q"], ERR, "-o/--output q: is a folder"),
    # ---- embed: every checkpoint and image kind broken
    ("embed-checkpoint-truncated", ["embed", "trunc.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "trunc.pt: not a readable checkpoint"),
    ("embed-checkpoint-empty", ["embed", "empty.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "empty.pt: not a readable checkpoint"),
    ("embed-checkpoint-binary", ["embed", "bin.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "bin.pt: not a readable checkpoint"),
    ("embed-checkpoint-foreign", ["embed", "foreign.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "not a simcore train checkpoint"),
    ("embed-checkpoint-a-tensor", ["embed", "tensor.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "not a simcore train checkpoint"),
    ("embed-checkpoint-hdf5", ["embed", "desc.h5", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "desc.h5: not a readable checkpoint"),
    ("embed-checkpoint-missing", ["embed", "nowhere.pt", "--query", "q", "--reference", "r", "-o", "{out}"], ERR,
     "nowhere.pt: no such checkpoint file"),
    ("embed-images-all-broken", ["embed", "run/final.pt", "--query", "bad_images", "--reference", "r", "-o",
                                 "{out}"], ERR, "none of the 3 image files could be read"),
    ("embed-images-none", ["embed", "run/final.pt", "--query", "no_images", "--reference", "r", "-o", "{out}"], ERR,
     "no images"),
    ("embed-images-binary-list", ["embed", "run/final.pt", "--query", "list_bin.txt", "--reference", "r", "-o",
                                  "{out}"], ERR, "not a folder nor a UTF-8 text file"),
    ("embed-images-missing", ["embed", "run/final.pt", "--query", "nowhere", "--reference", "r", "-o", "{out}"],
     ERR, "--query nowhere: no such folder or file"),
    ("embed-images-strict", ["embed", "run/final.pt", "--query", "bad_images", "--reference", "r", "--strict",
                             "-o", "{out}"], ERR, "unreadable image"),
    # ---- demo: every flag refused before the benchmark is built
    ("demo-out-a-file", ["demo", "--out", "a_file"], ERR, "--out a_file: exists and is not a folder"),
    ("demo-out-empty", ["demo", "--out", ""], ERR, "--out needs a folder name"),
    ("demo-threads-zero", ["demo", "--threads", "0"], ERR, "--threads must be an integer in [1, 1024]"),
    ("demo-threads-negative", ["demo", "--threads", "-2"], ERR, "--threads must be an integer in [1, 1024]"),
    ("demo-threads-huge", ["demo", "--threads", HUGE], ERR, "--threads must be an integer in [1, 1024]"),
    ("demo-seed-negative", ["demo", "--seed", "-1"], ERR, "--seed must be an integer in [0, 4294967295]"),
    ("demo-seed-huge", ["demo", "--seed", HUGE], ERR, "--seed must be an integer in [0, 4294967295]"),
    ("demo-steps-zero", ["demo", "--steps", "0"], ERR, "steps"),
    ("demo-steps-nan", ["demo", "--steps", "nan"], ERR, "steps"),
    ("demo-steps-three-for-two-stages", ["demo", "--steps", "1,2,3"], ERR, "steps"),
    ("demo-batch-size-zero", ["demo", "--batch-size", "0"], ERR, "batch"),
    ("demo-batch-size-negative", ["demo", "--batch-size", "-8"], ERR, "batch"),
    # ---- train: flag parsing only (its values: tests/test_train*.py)
    ("train-dim-text", TRAIN + ["--dim", "wide"], ERR, "--dim: invalid int value"),
    ("train-loss-unknown", TRAIN + ["--loss", "triplet"], ERR, "--loss: invalid choice"),
    ("train-precision-unknown", TRAIN + ["--precision", "fp64"], ERR, "--precision: invalid choice"),
    ("train-output-missing", ["train", "t"], ERR, "-o/--output"),
    # ---- writes that fail (a full disk: a file-size limit, SIGXFSZ ignored)
    ("match-disk-full", MATCH + ["-o", "{out}"], ERR, "cannot write (File too large)", 2048),
    ("eval-plot-disk-full", EVAL + ["--plot", "{out}.png"], ERR, "cannot write (File too large)", 2048),
    ("embed-disk-full", EMBED + ["--train", "t", "-o", "{out}"], ERR, "cannot write (File too large)", 2048),
    ("match-folder-not-writable", MATCH + ["-o", "/proc/simcore-hostile/p.csv"], ERR, "cannot write"),
    # ---- link cycles: each real file once, with a named warning
    ("embed-link-cycle", ["embed", "run/final.pt", "--query", "cyc", "--reference", "r", "-o", "{out}"], "warning",
     "distinct image files"),
]


def _cases():
    out = []
    for i, case in enumerate(CASES):
        name, argv, kind, text = case[:4]
        fsize = case[4] if len(case) > 4 else None
        out.append((name, argv, kind, text, fsize, f"out{i:03d}"))
    return out


@pytest.fixture(scope="module")
def results(world):
    """Every case run once, each in its own process: {case id: (rc, output, the output file's path)}."""
    cases, paths = [], {}
    for name, argv, kind, text, fsize, out in _cases():
        target = out + (".xyz" if "{out}.xyz" in argv else ".png" if "{out}.png" in argv else "")
        (world / target).write_bytes(OLD)
        paths[name] = world / target
        cases.append({"argv": [a.replace("{out}", out) for a in argv], "cwd": str(world), "fsize": fsize})
    r = subprocess.run([sys.executable, os.path.join(TESTS_DIR, "hostile_runner.py")], input=json.dumps(cases),
                       env=subprocess_env(), cwd=str(world), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    return {name: (d["rc"], d["out"], paths[name]) for (name, *_), d in zip(_cases(), done)}


@pytest.mark.parametrize("name,argv,kind,text,fsize,out", _cases(), ids=[c[0] for c in _cases()])
def test_hostile_case(results, world, name, argv, kind, text, fsize, out):
    rc, output, target = results[name]
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("[simcore")]
    if kind == ERR:
        assert rc == 2, (rc, output)
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1 and text in errors[0], output
        assert target.read_bytes() == OLD                     # the old output, bit for bit
    else:
        assert rc == 0, (rc, output)
        assert any(line.startswith("simcore: warning: ") and text in line for line in lines), output
    leftovers = [f for f in os.listdir(world) if f.endswith(".tmp")]
    assert leftovers == []


def test_every_flag_of_match_eval_embed_demo_has_a_hostile_case():
    """The table grows with the commands: a new flag without a hostile row fails here."""
    from simcore.isc import demo
    from simcore.isc.cli import build_parser
    flagged = {"match": set(), "eval": set(), "embed": set(), "demo": set()}
    for name, argv, *_ in CASES:
        command = argv[0]
        if command in flagged:
            flagged[command] |= {a.split("=")[0] for a in argv if a.startswith("-")}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parsers = {c: sub.choices[c] for c in ("match", "eval", "embed")}
    parsers["demo"] = demo._parser("simcore demo")
    # flags without a value to put out of range
    switches = {"--json", "--no-progress", "--flip", "--strict", "--quick", "--dba", "-h", "--help"}
    for command, parser in parsers.items():
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - switches
        missing = {f for f in flags if f not in flagged[command] and not (f == "--output" and "-o" in flagged[command])}
        assert missing == set(), (command, missing)


def test_the_segfault_case_as_the_real_command(world, tmp_path):
    """embed with the disk full, as ``python -m simcore.isc.cli`` in a shell with ``ulimit -f``: h5py used to
    crash (exit 139) freeing a file whose write had failed, and leave its temporary file."""
    out = tmp_path / "descriptors.h5"
    out.write_bytes(OLD)
    cmd = (f"trap '' XFSZ; ulimit -f 2; exec {sys.executable} -m simcore.isc.cli embed run/final.pt --query q "
           f"--reference r --train t -o {out}")
    r = subprocess.run(["bash", "-c", cmd], cwd=str(world), env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"simcore embed: error: {out}: cannot write (File too large)"
    assert out.read_bytes() == OLD and os.listdir(tmp_path) == ["descriptors.h5"]
    shutil.rmtree(tmp_path)
