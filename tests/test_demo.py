"""The demo end to end in a tiny configuration (structure only: no timing or accuracy assertions)."""
import json
import math
import os
import re
import subprocess
import sys

import torch
from conftest import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED_LINE = re.compile(r"simcore [0-9][^ ]*: compiled kernels \(simcore\._C, cpu\)")


def console_script(*args, cwd):
    """The `simcore` console script as pip installs it: the [project.scripts] entry point called with ARGS,
    in a child Python that imports the same simcore as the tests."""
    text = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    target = re.search(r'^\[project\.scripts\]\s*^simcore\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert target, "pyproject.toml: no `simcore = \"module:function\"` under [project.scripts]"
    module, function = target.groups()
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_simcore_demo_help_through_the_console_entry_point(tmp_path):
    r = console_script("demo", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("usage: simcore demo") and "--quick" in r.stdout and "--out" in r.stdout, r.stdout
    assert "compiled kernels" not in r.stdout         # --help does no work
    listing = console_script("--help", cwd=tmp_path)
    assert listing.returncode == 0 and "demo" in listing.stdout, listing.stdout
    bad = console_script("demo", "--no-such-option", cwd=tmp_path)
    assert bad.returncode == 2 and "simcore demo: error: unrecognized arguments: --no-such-option" in bad.stderr


def test_python_m_demo_still_runs_for_developers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "simcore.isc.demo", "--help"], env=subprocess_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m simcore.isc.demo"), r.stderr[-3000:]


def test_the_implementation_line_follows_the_backend():
    import simcore
    from simcore import implementation
    assert COMPILED_LINE.fullmatch(implementation("cpu"))       # the suite runs with SIMCORE_BACKEND=compiled
    old = simcore.get_backend()
    simcore.set_backend("reference")
    try:
        line = implementation("cpu")
    finally:
        simcore.set_backend(old)
    assert line == f"simcore {simcore.__version__}: plain-PyTorch references (backend 'reference', cpu; slow)"


def test_quick_demo_runs_end_to_end_and_its_files_feed_the_cli(tmp_path):
    out = tmp_path / "demo"
    r = console_script("demo", "--quick", "--no-progress", "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert COMPILED_LINE.fullmatch(text.splitlines()[0]), text     # the first line says the compiled kernels ran
    assert "compiled extension unavailable" not in r.stderr
    for row in ["raw pixels", "trained CNN", "PCA whitening", "score normalisation",
                "negative-embedding subtraction", "query shift"]:
        assert row in text, text
    assert "images/s" in text and "µAP" in text and "recall@P90" in text

    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 6
    for row in res["rows"]:
        for key in ("micro_ap", "recall_at_p90", "recall_at_rank1", "recall_at_rank10"):
            assert 0.0 <= row[key] <= 1.0 and math.isfinite(row[key])
    assert res["train_steps"] > 0 and res["train_images_per_second"] > 0
    assert res["copies"] == res["references"] and res["queries"] > res["copies"]
    assert [s["classes"] for s in res["train_stages"]] == [60, 120]          # two drip stages
    assert "drip 60 -> 120 classes" in text

    # The files the steps handed each other: the benchmark as images, the training run, the descriptors
    # (with the training set's), one predictions file per row.
    assert len(list((out / "images" / "references").glob("R*.png"))) == res["references"]
    assert len(list((out / "images" / "queries").glob("Q*.png"))) == res["queries"]
    assert len(list((out / "images" / "training").glob("T*.png"))) == res["training_images"]
    assert (out / "run" / "final.pt").is_file() and (out / "run" / "log.jsonl").is_file()
    assert sorted(p.name for p in (out / "predictions").iterdir()) == \
        sorted(f"{k}.csv" for k in ("raw_pixels", "trained", "pca", "score", "negative", "shift"))

    # The demo's own files through `simcore match` and `simcore eval`.
    from simcore.isc.cli import main
    assert main(["match", str(out / "descriptors.h5"), "--train", str(out / "descriptors.h5"), "--normalize",
                 "negative", "-o", str(tmp_path / "pred.csv")]) == 0
    assert main(["eval", str(tmp_path / "pred.csv"), str(out / "images" / "ground_truth.csv"), "--json"]) == 0
    # Plain matching reproduces the demo's "trained CNN" row.
    assert main(["match", str(out / "descriptors.h5"), "-o", str(tmp_path / "plain.csv")]) == 0
    from simcore.isc.metrics import evaluate, read_ground_truth, read_predictions
    gt = read_ground_truth(out / "images" / "ground_truth.csv")
    trained = next(r for r in res["rows"] if r["descriptors"].startswith("trained CNN"))
    assert evaluate(read_predictions(tmp_path / "plain.csv"), gt).micro_ap == trained["micro_ap"]
    neg = next(r for r in res["rows"] if r["descriptors"].startswith("+ negative"))
    assert evaluate(read_predictions(tmp_path / "pred.csv"), gt).micro_ap == neg["micro_ap"]


def test_the_benchmark_files_hold_its_pixels(tmp_path):
    """PNG is lossless: decoding the files gives the benchmark's tensors back, bit for bit."""
    from simcore.isc.data import decode_image, load_image_set
    from simcore.isc.demo import build_benchmark, write_benchmark
    from simcore.isc.metrics import read_ground_truth
    bench = build_benchmark(1, max_references=6, max_training=9)
    folders = write_benchmark(bench, tmp_path)
    for role, x in (("references", bench.references), ("queries", bench.queries), ("training", bench.training)):
        s = load_image_set(folders[role])
        assert len(s.paths) == x.shape[0]
        assert torch.equal(torch.stack([decode_image(p, x.shape[-1]) for p in s.paths]), x), role
    assert s.ids()[0] == "T00000"
    assert read_ground_truth(folders["ground_truth"]) == bench.ground_truth


def test_bad_training_settings_fail_at_once(tmp_path):
    r = console_script("demo", "--quick", "--steps", "1,2,3", cwd=tmp_path)
    assert r.returncode == 2 and "steps has 3 values for 2 drip stages" in r.stderr, r.stderr
    assert "[demo]" not in r.stdout                     # nothing was built
    (tmp_path / "out" / "run").mkdir(parents=True)
    r = console_script("demo", "--quick", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2 and "already holds a demo's files" in r.stderr, r.stderr


def test_benchmark_construction_is_seeded_and_disjoint():
    from simcore.isc.demo import build_benchmark
    a = build_benchmark(3, max_references=12, max_training=20)
    b = build_benchmark(3, max_references=12, max_training=20)
    assert (a.queries == b.queries).all() and a.ground_truth == b.ground_truth
    # Every reference has exactly one copy among the queries; the rest match nothing.
    matched = [r for _, r in a.ground_truth if r]
    assert sorted(matched) == sorted(a.reference_ids)
    assert len(a.ground_truth) == a.queries.shape[0]
    # The training photographs are not the reference photographs.
    from simcore.isc.demo import DISTRACTOR_PHOTOS, REFERENCE_PHOTOS, TRAINING_PHOTOS
    groups = [set(REFERENCE_PHOTOS), set(DISTRACTOR_PHOTOS), set(TRAINING_PHOTOS)]
    assert sum(map(len, groups)) == len(set.union(*groups))


def test_queries_do_not_depend_on_the_training_set():
    from simcore.isc.demo import build_benchmark
    a = build_benchmark(3, max_references=12, per_photo=5)
    b = build_benchmark(3, max_references=12, per_photo=8)
    assert a.training.shape[0] < b.training.shape[0]
    assert torch.equal(a.queries, b.queries) and torch.equal(a.references, b.references)
    assert a.ground_truth == b.ground_truth


def test_training_cells_are_capped_per_photograph_and_seeded():
    from simcore.isc.demo import TRAIN_SCALES, load_cells, load_training_cells
    all_brick = load_training_cells(["brick"], TRAIN_SCALES)
    assert all_brick.shape[0] > load_cells(["brick"])[0].shape[0] > 7     # overlapping, multi-scale
    x = load_training_cells(["brick", "moon"], TRAIN_SCALES, per_photo=7, seed=1)
    assert x.shape == (14, 3, 64, 64) and x.dtype == torch.uint8
    assert torch.equal(x, load_training_cells(["brick", "moon"], TRAIN_SCALES, per_photo=7, seed=1))
    assert not torch.equal(x, load_training_cells(["brick", "moon"], TRAIN_SCALES, per_photo=7, seed=2))


def test_a_seed_reproduces_the_table():
    """Same seed, same thread count: the same numbers to the last bit (training included); another seed differs."""
    from simcore.isc.demo import QUICK, run
    a, b = (run(seed=4, **QUICK, progress=False, quiet=True) for _ in range(2))
    assert a["rows"] == b["rows"] and a["final_loss"] == b["final_loss"]
    c = run(seed=5, **QUICK, progress=False, quiet=True)
    assert c["rows"] != a["rows"]
