"""simcore embed (simcore.isc.embed) and the whole command line on real photographs:
train (2 drip stages) -> interrupted -> --resume -> embed (ensemble of two checkpoints) -> match -> eval."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import h5py
from test_cli import run_inproc  # noqa: E402,F401  (the fixture: simcore.isc.cli.main in-process)

from simcore.isc import train as T  # noqa: E402
from simcore.isc.embed import CheckpointError, embed_folders, write_descriptors  # noqa: E402

TRAIN_PHOTOS = ["chelsea", "coffee", "hubble_deep_field", "rocket"]
REFERENCE_PHOTOS = ["astronaut", "camera", "immunohistochemistry"]
DISTRACTOR_PHOTO = "motorcycle"


def _photo(name):
    import skimage.data as data
    im = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=2)
    return im[..., :3].astype(np.uint8)


def _crops(im, n, size, seed):
    rng = np.random.default_rng(seed)
    H, W = im.shape[:2]
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, H - size)), int(rng.integers(0, W - size))
        out.append(im[y:y + size, x:x + size])
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """train/ (crops of 4 photographs), refs/ (crops of 3 others), queries/ (an edited copy of each reference:
    crop, resize, JPEG, brightness; plus crops of a distractor photograph), gt.csv."""
    from PIL import Image, ImageEnhance
    root = tmp_path_factory.mktemp("photos")
    for d in ("train", "refs", "queries"):
        (root / d).mkdir()
    k = 0
    for i, name in enumerate(TRAIN_PHOTOS):
        for c in _crops(_photo(name), 6, 120, seed=i):
            Image.fromarray(c).save(root / "train" / f"T{k:04d}.jpg", quality=90)
            k += 1
    gt, q = [], 0
    r = 0
    for i, name in enumerate(REFERENCE_PHOTOS):
        for c in _crops(_photo(name), 5, 140, seed=10 + i):
            rid = f"R{r:04d}"
            Image.fromarray(c).save(root / "refs" / f"{rid}.jpg", quality=90)
            copy = Image.fromarray(c[10:130, 5:125]).resize((100, 100))
            copy = ImageEnhance.Brightness(copy).enhance(1.2)
            qid = f"Q{q:04d}"
            copy.save(root / "queries" / f"{qid}.jpg", quality=60)
            gt.append((qid, rid))
            r, q = r + 1, q + 1
    for c in _crops(_photo(DISTRACTOR_PHOTO), 5, 140, seed=99):
        qid = f"Q{q:04d}"
        Image.fromarray(c).save(root / "queries" / f"{qid}.jpg", quality=70)
        gt.append((qid, ""))
        q += 1
    with open(root / "gt.csv", "w") as f:
        f.write("query_id,reference_id\n")
        f.writelines(f"{a},{b}\n" for a, b in gt)
    return root


def _train(photos, out, **kw):
    return T.train(T.TrainConfig(images=str(photos / "train"), output=str(out), widths=(8, 16), dim=16, image_size=32,
                                 drip=(12, "ALL"), steps=(3, 3), batch_size=8, sample_rate=1.0, views=1,
                                 progress=False, **kw), log_fn=lambda m: None)


@pytest.fixture(scope="module")
def run_dir(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _train(photos, out)
    return out


def test_one_checkpoint_writes_the_challenge_layout(photos, run_dir, tmp_path):
    res = embed_folders([str(run_dir / "last.pt")], query=photos / "queries", reference=photos / "refs")
    write_descriptors(tmp_path / "d.h5", res)
    with h5py.File(tmp_path / "d.h5") as f:
        assert sorted(f) == ["query", "query_ids", "reference", "reference_ids"]
        q, ids = f["query"][()], [i.decode() for i in f["query_ids"][()]]
        assert q.dtype == np.float32 and q.shape == (20, 16) and f["reference"].shape == (15, 16)
    assert ids[:2] == ["Q0000", "Q0001"]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, rtol=1e-5)


def test_flip_tta_makes_descriptors_flip_invariant(photos, run_dir, tmp_path):
    from PIL import Image
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    im = Image.open(photos / "refs" / "R0000.jpg")
    im.save(tmp_path / "a" / "x.png")
    im.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "b" / "x.png")
    res = embed_folders([str(run_dir / "last.pt")], query=tmp_path / "a", reference=tmp_path / "b", flip=True)
    np.testing.assert_array_equal(res["query"], res["reference"])  # a PNG mirrors exactly
    plain = embed_folders([str(run_dir / "last.pt")], query=tmp_path / "a", reference=tmp_path / "b", flip=False)
    assert not np.array_equal(plain["query"], plain["reference"])  # without --flip the mirror differs


def test_ensemble_with_pca_and_the_errors(photos, run_dir, tmp_path):
    cks = [str(run_dir / "stage1.pt"), str(run_dir / "last.pt")]
    res = embed_folders(cks, query=photos / "queries", reference=photos / "refs", train=photos / "train", pca=8)
    assert res["query"].shape == (20, 8) and res["train"].shape == (24, 8) and res["dims"] == [16, 16]
    with pytest.raises(ValueError, match="give --train"):
        embed_folders(cks, query=photos / "queries", reference=photos / "refs")
    ck = torch.load(cks[1], weights_only=False)
    ck["backbone"] = dict(ck["backbone"], dim=8)
    ck["model"]["fc.weight"], ck["model"]["fc.bias"] = ck["model"]["fc.weight"][:8], ck["model"]["fc.bias"][:8]
    torch.save(ck, tmp_path / "dim8.pt")
    with pytest.raises(CheckpointError, match=r"different embedding dims: .*stage1.pt \(16\), .*dim8.pt \(8\)"):
        embed_folders([cks[0], str(tmp_path / "dim8.pt")], query=photos / "queries", reference=photos / "refs",
                      train=photos / "train")
    ck["backbone"] = dict(ck["backbone"], name="no_such_net")
    torch.save(ck, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown.pt: .*(timm|no_such_net)"):
        embed_folders([str(tmp_path / "unknown.pt")], query=photos / "queries", reference=photos / "refs")
    (tmp_path / "empty").mkdir()
    from simcore.isc.data import NoImagesError
    with pytest.raises(NoImagesError, match="--query: .*no images"):
        embed_folders(cks[:1], query=tmp_path / "empty", reference=photos / "refs")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        embed_folders([str(tmp_path / "junk.pt")], query=photos / "queries", reference=photos / "refs")


def test_an_existing_file_is_never_half_overwritten(photos, run_dir, tmp_path, monkeypatch):
    res = embed_folders([str(run_dir / "last.pt")], query=photos / "queries", reference=photos / "refs")
    out = tmp_path / "d.h5"
    write_descriptors(out, res)
    before = out.read_bytes()
    real = h5py.File.create_dataset if hasattr(h5py.File, "create_dataset") else None
    calls = []

    def failing(self, name, *a, **k):
        calls.append(name)
        if name == "reference":
            raise OSError("disk full")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        write_descriptors(out, res)
    assert calls and out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.h5"]          # the temporary file is gone


def test_the_command_line_end_to_end(photos, tmp_path, run_inproc, monkeypatch):
    """train (2 stages) interrupted mid-stage, --resume, embed (ensemble of two checkpoints, --pca, --flip),
    match (query shift against the training descriptors), eval: all through `simcore ...`."""
    common = ["train", photos / "train", "-o", tmp_path / "run", "--dim", "16", "--image-size", "32",
              "--drip", "12,ALL", "--batch-size", "8,8", "--steps", "3,3", "--sample-rate", "1", "--views", "1",
              "--checkpoint-every", "2", "--json"]
    monkeypatch.setenv(T.FAIL_AFTER_STEP_ENV, "5")
    r = run_inproc(*common, cwd=tmp_path)
    assert r.returncode == 1 and "simulated failure after step 5; continue with --resume" in r.stderr
    monkeypatch.delenv(T.FAIL_AFTER_STEP_ENV)
    r = run_inproc(*common, "--resume", tmp_path / "run" / "last.pt", "--plot", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and [s["classes"] for s in summary["stages"]] == [12, 24]
    assert summary["images_per_second"] > 0
    r = run_inproc("embed", tmp_path / "run" / "stage1.pt", tmp_path / "run" / "last.pt", "--train", photos / "train",
                   "--query", photos / "queries", "--reference", photos / "refs", "--pca", "12", "--flip",
                   "-o", tmp_path / "desc.h5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 20 query, 15 reference, 24 training descriptors (12d, 2 model(s))" in r.stdout
    r = run_inproc("match", tmp_path / "desc.h5", "--train", tmp_path / "desc.h5", "--normalize", "shift",
                   "--neighbors", "10", "-o", tmp_path / "preds.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_inproc("eval", tmp_path / "preds.csv", photos / "gt.csv", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    print("end-to-end µAP", m["micro_ap"], "recall@P90", m["recall_at_p90"])
    assert m["num_ground_truth"] == 15 and 0 <= m["micro_ap"] <= 1
    with open(tmp_path / "preds.csv") as f:
        assert next(csv.reader(f)) == ["query_id", "reference_id", "score"]
    r = run_inproc("embed", tmp_path / "run" / "last.pt", "--query", tmp_path / "nowhere", "--reference",
                   photos / "refs", cwd=tmp_path)
    assert r.returncode == 2 and "--query " in r.stderr and "no such folder" in r.stderr
    for flags, message in ((["--batch-size", "0"], "--batch-size must be an integer >= 1"),
                           (["--pca", "8"], "--pca is fitted on the training images: give --train")):
        r = run_inproc("embed", tmp_path / "run" / "last.pt", "--query", photos / "queries", "--reference",
                       photos / "refs", *flags, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("simcore embed: error: ") and message in r.stderr, r.stderr
