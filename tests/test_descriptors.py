"""simcore.isc.descriptors against direct brute-force formulas on small random data."""

import numpy as np
import pytest
import torch

from simcore.isc import descriptors as D


# cosine_topk searches float64 in float32, so similarities that come out of a search
# carry float32 rounding (~1e-7 on unit vectors); formulas around them are float64.
SEARCH_TOL = dict(rtol=1e-5, atol=1e-6)


def unit(n, d, g, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def brute_knn(x, train, k):
    """Indices of the k most cosine-similar training rows, by a full sort in float64."""
    s = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(train.double(), dim=1).T
    return torch.sort(s, dim=1, descending=True, stable=True)


def test_l2_normalize(generator):
    x = torch.randn(7, 5, generator=generator) * 10
    y = D.l2_normalize(x)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(y, x / x.norm(dim=1, keepdim=True))
    assert D.l2_normalize(torch.zeros(2, 3)).abs().sum() == 0        # zero rows stay zero, no NaN


def test_pca_whitening_matches_numpy(generator):
    # Anisotropic training data so the eigenvalues differ.
    A = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    train = torch.randn(300, 12, generator=generator, dtype=torch.float64) @ A + 3.0
    x = torch.randn(9, 12, generator=generator, dtype=torch.float64) @ A + 3.0
    pca = D.PCAWhitening(5, normalize=False).fit(train)
    y = pca.transform(x)
    # Brute force: eigen-decomposition of the sample covariance, top 5, scaled by λ^-0.5.
    t = train.numpy()
    mu = t.mean(0)
    lam, V = np.linalg.eigh(np.cov(t, rowvar=False))
    lam, V = lam[::-1][:5], V[:, ::-1][:, :5]
    ref = (x.numpy() - mu) @ V / np.sqrt(lam)
    # Eigenvectors are defined up to sign: compare column by column up to sign.
    for j in range(5):
        sgn = np.sign(ref[:, j] @ y[:, j].numpy())
        np.testing.assert_allclose(y[:, j].numpy(), sgn * ref[:, j], rtol=1e-7, atol=1e-9)
    # Whitened training set: identity covariance.
    yt = pca.transform(train).numpy()
    np.testing.assert_allclose(np.cov(yt, rowvar=False), np.eye(5), atol=1e-8)
    # Normalised variant: unit rows, same directions; dtype follows the input.
    pca_n = D.PCAWhitening(5).fit(train)
    z = pca_n.transform(x.float())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), torch.nn.functional.normalize(y, dim=1), rtol=1e-5, atol=1e-6)


def test_pca_power_zero_is_plain_pca(generator):
    train = torch.randn(100, 6, generator=generator, dtype=torch.float64) * torch.arange(1, 7)
    pca = D.PCAWhitening(6, power=0.0, normalize=False).fit(train)
    y = pca.transform(train)
    # A rotation of the centred data: distances are preserved.
    c = train - train.mean(0)
    torch.testing.assert_close(torch.cdist(y, y), torch.cdist(c, c), rtol=1e-9, atol=1e-6)


def test_ensemble_is_concat_then_whiten(generator):
    e1, e2 = torch.randn(10, 6, generator=generator), torch.randn(10, 4, generator=generator)
    t1, t2 = torch.randn(50, 6, generator=generator), torch.randn(50, 4, generator=generator)
    out, pca = D.ensemble([e1, e2], dim=8, train=[t1, t2], return_pca=True)
    assert out.shape == (10, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10))
    manual = D.PCAWhitening(8).fit(torch.cat([D.l2_normalize(t1), D.l2_normalize(t2)], 1))
    torch.testing.assert_close(out, manual.transform(torch.cat([D.l2_normalize(e1), D.l2_normalize(e2)], 1)))
    # Reusing the fitted transform on another set.
    torch.testing.assert_close(D.ensemble([e1, e2], pca=pca), out)
    with pytest.raises(ValueError, match="train"):
        D.ensemble([e1, e2], dim=8)


def test_score_normalization_brute_force(generator):
    q, r, t = unit(6, 8, generator), unit(20, 8, generator), unit(40, 8, generator)
    n, beta = 10, 2.0
    scores = q @ r.T
    out = D.score_normalize(scores, q, t, beta=beta, n=n)
    s_sorted, _ = brute_knn(q, t, 40)
    ref = scores - beta * s_sorted[:, n - 1:n]              # q·r − β·(similarity to the n-th training neighbour)
    torch.testing.assert_close(out, ref, **SEARCH_TOL)
    torch.testing.assert_close(D.nth_neighbor_similarity(q, t, 3), s_sorted[:, 2], **SEARCH_TOL)


def test_negative_embedding_subtraction_brute_force(generator):
    x, t = unit(9, 8, generator), unit(30, 8, generator)
    beta, k = 0.35, 10
    out = D.negative_embedding_subtraction(x, t, beta=beta, k=k)
    _, idx = brute_knn(x, t, k)
    ref = x - beta * t[idx[:, :k]].mean(1)
    ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, ref)


def brute_dba(t, k, alpha):
    """The 1st place's DBA in float64: normalise(Σ sim^α · t_j) over the k nearest, the row itself included."""
    s, idx = brute_knn(t, t, t.shape[0])
    t = torch.nn.functional.normalize(t.double(), dim=1)
    out = (s[:, :k, None] ** alpha * t[idx[:, :k]]).sum(1)
    return out / out.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n,k", [(40, 10), (40, 40), (12, 1)])
def test_database_side_augmentation_brute_force(generator, n, k):
    t = unit(n, 4, generator)
    out = D.database_side_augmentation(t, k=k, alpha=3.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, brute_dba(t, k, 3.0))
    if k == 1:                                          # the only neighbour is the row itself
        torch.testing.assert_close(out, t)
    if k == n:                                          # negative similarities keep their negative weights
        s = t @ t.T
        clipped = torch.nn.functional.normalize((s.clamp_min(0) ** 3) @ t, dim=1)
        assert (s < 0).any() and not torch.allclose(out, clipped)
    f32 = D.database_side_augmentation(t.float(), k=k)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), brute_dba(t, k, 3.0), **SEARCH_TOL)


@pytest.mark.parametrize("k", [10, None])
def test_database_side_augmentation_with_duplicate_rows(generator, k):
    base = unit(20, 4, generator)
    # three rows twice, one row 12 times (more copies than k: the row itself may fall out of its own top 10)
    t = torch.cat([base, base[:3], base[5:6].repeat(12, 1)])
    t = t[torch.randperm(t.shape[0], generator=generator)]
    k = t.shape[0] if k is None else k
    out = D.database_side_augmentation(t, k=k)
    torch.testing.assert_close(out, brute_dba(t, k, 3.0))
    same = (t[:, None, :] == t[None, :, :]).all(2)
    i, j = torch.nonzero(same & ~torch.eye(t.shape[0], dtype=torch.bool), as_tuple=True)
    torch.testing.assert_close(out[i], out[j])          # copies stay copies


def test_database_side_augmentation_bad_arguments(generator):
    t = unit(5, 4, generator)
    with pytest.raises(ValueError, match="training set has 5 rows"):
        D.database_side_augmentation(t, k=10)
    with pytest.raises(ValueError, match="alpha must be"):
        D.database_side_augmentation(t, k=2, alpha=-1.0)
    t = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not an integer and a neighbour similarity is negative"):
        D.database_side_augmentation(t, k=3, alpha=0.5)


def test_negative_embedding_subtraction_after_dba_brute_force(generator):
    x, t = unit(9, 4, generator), unit(30, 4, generator)
    smoothed = D.database_side_augmentation(t)
    out = D.negative_embedding_subtraction(x, smoothed, beta=0.35, k=10)
    ts = brute_dba(t, 10, 3.0)
    _, idx = brute_knn(x, ts, 10)                       # neighbours searched among the smoothed rows, as the script
    ref = x - 0.35 * ts[idx[:, :10]].mean(1)
    torch.testing.assert_close(out, ref / ref.norm(dim=1, keepdim=True), **SEARCH_TOL)


def test_query_shift_brute_force(generator):
    q, t = unit(5, 8, generator), unit(150, 8, generator)
    K, top, alpha = 100, 3, 1.8
    out = D.query_shift(q, t, k=K, top=top, alpha=alpha)
    s, idx = brute_knn(q, t, K)
    for i in range(5):
        diffs = [(q[i] - t[j]) / (q[i] - t[j]).norm() for j in idx[i, :K].tolist()]
        d = torch.stack(diffs).mean(0)
        d = d / d.norm()
        c = max(s[i, :top].mean().item(), 0.0)
        ref = q[i] + alpha * c ** 0.5 * d                     # not re-normalised
        torch.testing.assert_close(out[i], ref, **SEARCH_TOL)
    assert not torch.allclose(out.norm(dim=1), torch.ones(5, dtype=out.dtype))


def test_normalisations_need_enough_training_rows(generator):
    q, t = unit(3, 4, generator), unit(5, 4, generator)
    with pytest.raises(ValueError, match="training set has 5 rows"):
        D.query_shift(q, t, k=100)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_match_brute_force(generator, metric):
    q = torch.randn(7, 6, generator=generator, dtype=torch.float64) * 1.5      # not unit: exercises l2
    r = unit(11, 6, generator)
    k, cap = 4, 15
    m = D.match(q, r, k=k, max_results=cap, metric=metric)
    full = q @ r.T if metric == "ip" else -torch.cdist(q, r) ** 2
    cand = []
    for i in range(7):
        for j in torch.sort(q[i] @ r.T, descending=True).indices[:k].tolist():   # per-query top-k by q·r
            cand.append((full[i, j].item(), i, j))
    cand.sort(key=lambda t: -t[0])
    cand = cand[:cap]
    assert len(m) == cap
    assert list(zip(m.query.tolist(), m.reference.tolist())) == [(i, j) for _, i, j in cand]
    np.testing.assert_allclose(m.score.numpy(), [s for s, _, _ in cand], rtol=1e-5, atol=1e-5)
    triples = m.to_triples([f"q{i}" for i in range(7)], [f"r{j}" for j in range(11)])
    assert triples[0][0] == f"q{cand[0][1]}" and triples[0][1] == f"r{cand[0][2]}"


def test_match_with_score_normalisation(generator):
    q, r, t = unit(5, 6, generator), unit(8, 6, generator), unit(20, 6, generator)
    m = D.match(q, r, k=8, max_results=None, train=t, score_norm={"beta": 2.0, "n": 3})
    s3, _ = brute_knn(q, t, 3)
    ref = (q @ r.T - 2.0 * s3[:, 2:3]).float()
    got = torch.full((5, 8), float("nan"))
    got[m.query, m.reference] = m.score
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="train"):
        D.match(q, r, score_norm={"beta": 2.0, "n": 3})
