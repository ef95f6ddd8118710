"""``simcore eval-verification``, ``eval-reid``, ``export`` and ``convert``: the real command in a subprocess on
a hand-made checkpoint (a small random SmallCNN) and tiny images; the figures against the validators in-process."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import subprocess_env

from simcore.isc.backbones import backbone_spec, build_backbone
from simcore.isc.embed import CHECKPOINT_FORMAT, load_model
from simcore.isc.models import ModelEmbedder

IMAGE_SIZE = 32


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "simcore.isc.cli", *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def run_inproc(capsys, *args, cwd=None):
    """The same entry point in-process (for the refusals: each subprocess pays torch's import)."""
    from simcore.isc.cli import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _jpeg(rgb, seed, size=24):
    from PIL import Image
    noise = np.random.default_rng(seed).integers(0, 40, (size, size, 3))
    arr = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    spec = backbone_spec("smallcnn", 16, IMAGE_SIZE, widths=(8, 16))
    torch.save({"format": CHECKPOINT_FORMAT, "backbone": spec, "model": build_backbone(spec).state_dict()},
               root / "model.pt")
    return root / "model.pt"


@pytest.fixture(scope="module")
def bin_file(tmp_path_factory):
    from simcore.isc.verification import write_bin
    root = tmp_path_factory.mktemp("bins")
    rng = np.random.default_rng(1)
    bins, issame = [], []
    for p in range(20):
        a = tuple(int(c) for c in rng.integers(0, 200, 3))
        b = a if p % 2 == 0 else tuple(int(c) for c in rng.integers(0, 200, 3))
        bins += [_jpeg(a, 2 * p), _jpeg(b, 2 * p + 1)]
        issame.append(p % 2 == 0)
    write_bin(root / "pairs.bin", bins, issame)
    return root / "pairs.bin"


def test_eval_verification_prints_the_validators_figures(ckpt, bin_file, tmp_path, capsys):
    from simcore.isc.verification import VerificationValidator
    r = run_inproc(capsys, "eval-verification", ckpt, f"{bin_file},{bin_file}", "--json", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "share a name" in r.stderr
    r = run("eval-verification", ckpt, bin_file, "--json", "--device", "cpu", "--batch-size", "7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model, _ = load_model(ckpt)
    want = VerificationValidator(bin_file, image_size=IMAGE_SIZE).evaluate(ModelEmbedder(model, "cpu"))
    assert set(got) == {"pairs"} and got["pairs"] == pytest.approx(want)
    r = run_inproc(capsys, "eval-verification", ckpt, bin_file, "--device", "cpu")
    assert r.returncode == 0 and "pairs:" in r.stdout and "accuracy:" in r.stdout and "pairs: 20" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--folds", "1"], "--folds must be an integer in [2, 20], got 1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_eval_verification_bad_values(ckpt, bin_file, capsys, args, needle):
    r = run_inproc(capsys, "eval-verification", ckpt, bin_file, *args)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_eval_verification_bad_files(ckpt, bin_file, tmp_path, capsys):
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    for args, needle in [((ckpt, tmp_path / "missing.bin"), "missing.bin: no such file"),
                         ((ckpt, tmp_path / "junk.bin"), "junk.bin: not a verification .bin"),
                         ((tmp_path / "junk.bin", bin_file), "not a readable checkpoint")]:
        r = run_inproc(capsys, "eval-verification", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def _market(folder, rng):
    from PIL import Image
    os.makedirs(folder)
    for pid in range(1, 5):
        for cam in (1, 2):
            rgb = rng.integers(0, 255, (16, 8, 3)).astype(np.uint8)
            Image.fromarray(rgb).save(folder / f"{pid:04d}_c{cam}s1_{pid * 10 + cam:06d}_00.jpg")


def test_eval_reid(ckpt, tmp_path, capsys):
    from simcore.isc.reid import ReidValidator
    rng = np.random.default_rng(2)
    _market(tmp_path / "query", rng)
    _market(tmp_path / "gallery", rng)
    r = run("eval-reid", ckpt, tmp_path / "query", tmp_path / "gallery", "--json", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model, _ = load_model(ckpt)
    want = ReidValidator(tmp_path / "query", tmp_path / "gallery", image_size=IMAGE_SIZE).evaluate(
        ModelEmbedder(model, "cpu"))
    assert json.loads(r.stdout) == pytest.approx(want) and want["queries"] == 8
    (tmp_path / "query" / "person.jpg").write_bytes((tmp_path / "query" / "0001_c1s1_000011_00.jpg").read_bytes())
    for args, needle in [((tmp_path / "query", tmp_path / "nowhere"), "GALLERY_DIR"),
                         ((tmp_path / "query", tmp_path / "gallery", "--workers", "-1"), "--workers must be"),
                         ((tmp_path / "query", tmp_path / "gallery"), "not a Market-1501 name")]:
        r = run_inproc(capsys, "eval-reid", ckpt, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_export_runs_in_onnxruntime_like_the_checkpoint(ckpt, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    r = run("export", ckpt, "-o", tmp_path / "model.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    x = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    model, _ = load_model(ckpt)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(x), dim=1).numpy()
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    r = run_inproc(capsys, "export", ckpt, "-o", tmp_path / "model.onnx", "--format", "tflite")
    assert r.returncode == 2 and "--format must be one of onnx, export, got 'tflite'" in r.stderr


def test_convert_a_folder_to_shards_that_train_reads(tmp_path, capsys):
    from simcore.isc.shards import ShardDataset
    rng = np.random.default_rng(4)
    for cls in ("a", "b", "c"):
        os.makedirs(tmp_path / "imgs" / cls)
        for k in range(3):
            (tmp_path / "imgs" / cls / f"{k}.jpg").write_bytes(_jpeg(tuple(int(c) for c in rng.integers(0, 200, 3)), k))
    r = run("convert", tmp_path / "imgs", "-o", tmp_path / "shards" / "train-%03d.tar", "--per-shard", "4", "--json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)["shards"]
    assert [os.path.basename(p) for p in paths] == ["train-000.tar", "train-001.tar", "train-002.tar"]
    ds = ShardDataset(str(tmp_path / "shards" / "train-{000..002}.tar"), 16, labels="cls")
    labels = sorted(int(s[1]) for s, _ in zip(iter(ds), range(9)))
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    r = run_inproc(capsys, "convert", tmp_path / "imgs", "-o", tmp_path / "train.tar")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "%d-style field" in r.stderr


def _rec(path, classes=4, per_class=3):
    from simcore.isc.recordio import RecordWriter
    rng = np.random.default_rng(5)
    with RecordWriter(path) as w:
        for k in range(classes * per_class):
            rgb = tuple(int(c) for c in rng.integers(0, 200, 3)) if k % per_class == 0 else rgb
            w.write_image(k + 1, k // per_class, _jpeg(rgb, k))


def test_train_on_recordio_with_face_and_reid_validators(bin_file, tmp_path, capsys):
    """simcore train data.rec --labels record --val-bin --val-reid: the validators' figures in log.jsonl and
    the final JSON; the new flags refused before any work."""
    _rec(tmp_path / "train.rec")
    rng = np.random.default_rng(6)
    _market(tmp_path / "query", rng)
    _market(tmp_path / "gallery", rng)
    base = ["train", tmp_path / "train.rec", "--labels", "record", "--dim", "16", "--image-size", "32",
            "--steps", "2", "--batch-size", "6", "--views", "1", "--sample-rate", "1", "--device", "cpu"]
    for extra, needle in [(["--val-bin", tmp_path / "none.bin"], "--val-bin"),
                          (["--val-reid", tmp_path / "query"], "--val-reid must be QUERY_DIR,GALLERY_DIR"),
                          (["--val-reid", f"{tmp_path / 'query'},{tmp_path / 'nowhere'}"], "nowhere: no such folder"),
                          (["--labels", "image"], "--labels record goes with a RecordIO .rec file")]:
        r = run_inproc(capsys, *base, "-o", tmp_path / "bad", *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists()
    r = run(*base, "-o", tmp_path / "run", "--val-bin", bin_file, "--val-reid",
            f"{tmp_path / 'query'},{tmp_path / 'gallery'}", "--json", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    stage = summary["stages"][0]
    assert stage["classes"] == 4 and set(stage["val_pairs"]) >= {"accuracy", "tar@far=0.001", "pairs"}
    assert stage["val_pairs"]["pairs"] == 20 and stage["val_reid"]["queries"] == 8
    events = [json.loads(line)["event"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert "val_pairs" in events and "val_reid" in events
    assert "pairs accuracy" in r.stderr and "re-ID rank-1" in r.stderr
