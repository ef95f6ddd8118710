"""simcore.isc.reid against a brute-force Market-1501 evaluation, on random data with ties."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simcore.isc.reid import ReidNameError, ReidValidator, parse_market_name, reid_metrics


def brute_force(q, g, qp, qc, gp, gc, ranks=(1, 5, 10)):
    """One query at a time, in plain Python: drop same person + same camera, sort by (−cosine, gallery
    position), walk the list."""
    q = F.normalize(torch.as_tensor(q).double(), dim=1)
    g = F.normalize(torch.as_tensor(g).double(), dim=1)
    sim = (q @ g.T).tolist()
    cmc, aps = {k: 0 for k in ranks}, []
    for i in range(len(qp)):
        kept = [j for j in range(len(gp)) if not (gp[j] == qp[i] and gc[j] == qc[i])]
        kept.sort(key=lambda j: (-sim[i][j], j))
        hits = [gp[j] == qp[i] for j in kept]
        if not any(hits):
            continue
        first = hits.index(True) + 1
        for k in ranks:
            cmc[k] += first <= k
        found, precisions = 0, []
        for r, h in enumerate(hits, 1):
            if h:
                found += 1
                precisions.append(found / r)
        aps.append(sum(precisions) / len(precisions))
    n = len(aps)
    return {**{f"rank{k}": cmc[k] / n for k in ranks}, "mAP": sum(aps) / n, "queries": n,
            "queries_without_match": len(qp) - n}


def test_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    G, Q, D = 300, 60, 4
    gp = rng.integers(0, 25, G)                     # 0: distractors
    gc = rng.integers(1, 4, G)
    qp = rng.integers(1, 25, Q)
    qc = rng.integers(1, 4, Q)
    # 16 unit vectors of ±0.5: cosines are exact multiples of 0.25, so many are exactly equal
    g = rng.choice([-0.5, 0.5], (G, D))
    q = rng.choice([-0.5, 0.5], (Q, D))
    got = reid_metrics(q, g, qp, qc, gp, gc, chunk=17)
    ref = brute_force(q, g, qp, qc, gp, gc)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_same_camera_matches_are_excluded():
    # the query's only same-camera match is an identical image: excluded, the other camera's match counts
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    r = reid_metrics(np.array([[1.0, 0.0]]), g, [7], [1], [7, 3, 0, 7], [1, 2, 2, 3])
    assert r["rank1"] == 0.0 and r["rank5"] == 1.0                 # the distractor (0.8) ranks first
    assert r["mAP"] == pytest.approx(0.5) and r["queries"] == 1
    r = reid_metrics(np.array([[1.0, 0.0]]), g[:1], [7], [1], [7], [1])
    assert r["queries"] == 0 and r["queries_without_match"] == 1


def test_market_names():
    assert parse_market_name("a/0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_000101_01.jpg") == (-1, 3)
    assert parse_market_name("0000_c6s1_000000_00.jpg") == (0, 6)
    with pytest.raises(ReidNameError, match="not a Market-1501 name"):
        parse_market_name("person2_cam1.jpg")


def test_validator_on_a_tiny_market_folder(tmp_path):
    """Four people in colours, two cameras, a distractor and a junk image; the embedding is the mean colour."""
    from PIL import Image
    colours = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 4: (200, 200, 30)}
    os.makedirs(tmp_path / "query"), os.makedirs(tmp_path / "gallery")

    def save(folder, pid, cam, k, rgb):
        Image.new("RGB", (16, 32), rgb).save(tmp_path / folder / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg"
                                             if pid >= 0 else tmp_path / folder / f"-1_c{cam}s1_{k:06d}_00.jpg")

    for pid, rgb in colours.items():
        save("query", pid, 1, 0, rgb)
        save("gallery", pid, 1, 1, rgb)                                    # same camera: excluded
        save("gallery", pid, 2, 2, tuple(min(255, c + 20) for c in rgb))  # the true match
    save("gallery", 0, 2, 3, (200, 30, 40))                                # distractor near person 1
    save("gallery", -1, 2, 4, (200, 30, 30))                               # junk: left out
    v = ReidValidator(tmp_path / "query", tmp_path / "gallery", image_size=16, batch_size=3)

    def mean_colour(x):
        return x.mean((2, 3)) - 0.4

    got = v.evaluate(mean_colour)
    assert got["junk"] == 1.0 and got["queries"] == 4.0
    assert got["rank1"] == 0.75 and got["rank5"] == 1.0                   # person 1's distractor comes first
    assert got["mAP"] == pytest.approx((0.5 + 3) / 4)
