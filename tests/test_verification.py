"""simcore.isc.verification against straight references: sklearn's KFold and roc_curve, hand-counted
cases, and a .bin of scikit-image photographs and their edited copies."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simcore.isc.encoded import decode_image_bytes
from simcore.isc.verification import (INSIGHTFACE_THRESHOLDS, VerificationFileError, VerificationValidator,
                                      kfold_accuracy, read_bin, tar_at_far, verification_metrics, write_bin)


def reference_kfold(dist, issame, folds=10):
    """InsightFace's calculate_roc written out: sklearn KFold, loops over thresholds."""
    from sklearn.model_selection import KFold
    accs = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(len(dist))):
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in INSIGHTFACE_THRESHOLDS]
        t = INSIGHTFACE_THRESHOLDS[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < t) == issame[test]))
    return np.mean(accs), np.std(accs)


@pytest.mark.parametrize("n", [600, 457])
def test_kfold_accuracy_matches_the_reference(seed, n):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    # squared distances on a 0.005 grid: ties among pairs and with the thresholds themselves
    dist = np.round(np.where(issame, rng.normal(1.0, 0.35, n), rng.normal(1.6, 0.35, n)).clip(0, 4) / 0.005) * 0.005
    got = kfold_accuracy(dist, issame)
    ref = reference_kfold(dist, issame)
    assert got["accuracy"] == pytest.approx(ref[0], abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(ref[1], abs=1e-12)
    assert 0.6 < got["accuracy"] < 1.0


def test_kfold_accuracy_known_answers():
    issame = np.tile([True] * 5 + [False] * 5, 10)              # 100 pairs, 10 folds of 10
    dist = np.where(issame, 0.5, 1.5)
    assert kfold_accuracy(dist, issame)["accuracy"] == 1.0
    dist[5::10] = 0.5                                           # one impostor per fold as close as the genuine
    r = kfold_accuracy(dist, issame)
    assert r["accuracy"] == pytest.approx(0.9) and r["accuracy_std"] == pytest.approx(0.0, abs=1e-15)
    assert 0.5 < r["threshold"] <= 1.5
    with pytest.raises(ValueError, match="folds must be in"):
        kfold_accuracy(dist[:5], issame[:5])


def test_tar_at_far_matches_sklearn_roc_curve(seed):
    from sklearn.metrics import roc_curve
    rng = np.random.default_rng(seed)
    n = 20000
    issame = rng.random(n) < 0.3
    scores = np.round(np.where(issame, rng.normal(0.6, 0.15, n), rng.normal(0.1, 0.15, n)), 3)   # ties
    fpr, tpr, thr = roc_curve(issame, scores, drop_intermediate=False)   # every threshold: none dropped
    for far in (1e-4, 1e-3, 1e-2, 0.1):
        ok = fpr <= far
        tar, t = tar_at_far(scores, issame, far)
        assert tar == pytest.approx(tpr[ok].max(), abs=1e-15)
        accepted = scores >= t
        assert np.mean(accepted[~issame]) <= far and np.mean(accepted[issame]) == pytest.approx(tar)


def test_tar_at_far_known_answer():
    impostor = np.arange(1000) / 1000                            # 0.000 ... 0.999
    genuine = np.r_[np.full(20, 0.9995), np.full(30, 0.9985), np.full(50, 0.1)]
    scores, issame = np.r_[impostor, genuine], np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    assert tar_at_far(scores, issame, 1e-4) == (0.2, 0.9995)      # no impostor accepted
    assert tar_at_far(scores, issame, 1e-3) == (0.5, 0.9985)      # one impostor (0.999) accepted
    assert tar_at_far(scores, issame, 2e-3) == (0.5, 0.998)
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far(scores[:1000], issame[:1000], 1e-3)


def test_metrics_of_embeddings_use_unit_vectors(seed):
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    issame = np.arange(200) % 2 == 0
    e2[issame] = e1[issame] * 3 + 0.3 * torch.randn(100, 16, generator=g)    # scale must not matter
    m = verification_metrics(e1, e2, issame)
    d = ((F.normalize(e1.double(), dim=1) - F.normalize(e2.double(), dim=1)) ** 2).sum(1).numpy()
    assert m["accuracy"] == pytest.approx(reference_kfold(d, issame)[0], abs=1e-12)
    assert m["accuracy"] > 0.95 and m["tar@far=0.001"] > 0.9 and m["pairs"] == 200


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_read_bin_builds_only_plain_containers(tmp_path):
    p = tmp_path / "evil.bin"
    p.write_bytes(pickle.dumps(([b"a", b"b"], [True, Evil()])))
    with pytest.raises(VerificationFileError, match="posix.system|os.system|nt.system"):
        read_bin(p)
    assert not (tmp_path / "pwned.txt").exists()
    for protocol in (0, 2, 4):                                  # protocol 2: bytes through _codecs.encode
        p = tmp_path / f"p{protocol}.bin"
        p.write_bytes(pickle.dumps(([b"\xff\xd8a", b"b"], [False]), protocol=protocol))
        assert read_bin(p)[0] == [b"\xff\xd8a", b"b"] and read_bin(p)[1].tolist() == [False]
    p.write_bytes(pickle.dumps(([b"a"], [True])))
    with pytest.raises(VerificationFileError, match="1 images for 1 pairs"):
        read_bin(p)
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(VerificationFileError, match="not a verification .bin"):
        read_bin(p)


def photo_pairs(n_pairs=40, size=64):
    """(encoded images, issame): pair p is a crop and an edited copy of it (p even), or crops of two
    different photographs (p odd)."""
    import skimage.data as data
    from PIL import Image, ImageEnhance
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock"]
    photos = []
    for name in names:
        im = np.asarray(getattr(data, name)())
        photos.append(np.stack([im] * 3, 2) if im.ndim == 2 else im[..., :3])
    rng = np.random.default_rng(5)

    def crop(k):
        im = photos[k % len(photos)]
        y, x = rng.integers(0, im.shape[0] - 96), rng.integers(0, im.shape[1] - 96)
        return Image.fromarray(im[y:y + 96, x:x + 96]).resize((size, size))

    def encode(im, quality=95):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    bins, issame = [], []
    for p in range(n_pairs):
        a = crop(p)
        if p % 2 == 0:
            b = ImageEnhance.Brightness(a.crop((2, 2, size - 2, size - 2)).resize((size, size))).enhance(1.15)
            bins += [encode(a), encode(b, quality=60)]
        else:
            bins += [encode(a), encode(crop(p + 3))]
        issame.append(p % 2 == 0)
    return bins, issame


def thumbnail_embedding(x):
    """A fixed embedding: the 8x8 grey thumbnail, standardised per image."""
    t = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8).flatten(1)
    return (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_validator_on_a_bin_of_photographs(tmp_path, flip):
    bins, issame = photo_pairs()
    write_bin(tmp_path / "photos.bin", bins, issame)
    v = VerificationValidator(tmp_path / "photos.bin", image_size=64, flip=flip, folds=10, batch_size=16)
    assert v.name == "photos"
    got = v.evaluate(thumbnail_embedding)
    # the reference: decode each image, embed (plus the mirror's embedding), normalise, score
    x = torch.stack([decode_image_bytes(b, 64) for b in bins]).float() / 255
    e = thumbnail_embedding(x).double() + (thumbnail_embedding(x.flip(3)).double() if flip else 0)
    e = F.normalize(e, dim=1)
    d = ((e[0::2] - e[1::2]) ** 2).sum(1).numpy()
    acc, std = reference_kfold(d, np.array(issame))
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12) and got["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert got["accuracy"] >= 0.9                                # edited copies are near, other photos far
    assert set(got) == {"accuracy", "accuracy_std", "threshold", "tar@far=0.001", "tar@far=0.0001", "pairs"}
