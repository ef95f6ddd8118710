"""simcore.cosine_topk, FlatIndex and faiss_index against the reference (and FAISS)."""
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import simcore
from simcore import dispatch
from simcore.search import error_bounds, inputs, tile_gemm, tiled_search
from simcore.reference.cosine_topk import cosine_topk as reference

from conftest import backend, hardware_only, poisoned, synchronize

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def on(device, request):
    """The device of a DEVICES test: the CPU, or simcore's CUDA path (conftest's cuda_device)."""
    return torch.device("cpu") if device == "cpu" else request.getfixturevalue("cuda_device")


def full_scores(q, db, normalized=False):
    q, db = q.double(), db.double()
    if not normalized:
        q, db = F.normalize(q, dim=1), F.normalize(db, dim=1)
    return q @ db.T


def check_topk(scores, index, q, db, k, *, normalized=False, tol=1e-5, exclude=None):
    """A correct top-k up to ties within tol: shapes, order, every returned score is the true
    score of its index, and the scores equal the reference's k best (float64)."""
    Q = q.shape[0]
    assert scores.shape == (Q, k) and index.shape == (Q, k)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    assert not torch.isnan(scores).any()
    full = full_scores(q, db, normalized)
    if exclude is not None:
        full[exclude[:, 0], exclude[:, 1]] = float("-inf")
    ref_s, ref_i = reference(q.double(), db.double(), k, normalized=normalized, exclude=exclude)
    valid = index >= 0
    assert torch.equal(valid, ref_i >= 0)
    assert (scores[~valid] == float("-inf")).all()
    assert (scores[:, 1:] <= scores[:, :-1]).all(), "scores must be sorted descending"
    got = full.gather(1, index.clamp_min(0))
    assert (got[valid] - scores[valid].double()).abs().max().item() <= tol if valid.any() else True
    assert (ref_s[valid].double() - scores[valid].double()).abs().max().item() <= tol if valid.any() else True
    for row in index:  # no duplicates
        r = row[row >= 0]
        assert r.unique().numel() == r.numel()
    return ref_s, ref_i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Q,N,D,k,block", [
    (1, 1, 8, 1, None),          # single query, single row
    (7, 1000, 32, 5, 128),       # sizes not multiples of the block
    (33, 3001, 48, 100, 512),
    (5, 777, 16, 777, 100),      # k = N
    (64, 5000, 64, 1, None),     # k = 1
    (9, 4000, 24, 600, 333),     # large k: several reservoir compactions
])
@pytest.mark.parametrize("normalized", [False, True])
def test_matches_reference_float32(on, Q, N, D, k, block, normalized, generator):
    q = torch.randn(Q, D, generator=generator).to(on)
    db = (torch.randn(N, D, generator=generator) * torch.rand(N, 1, generator=generator) * 3).to(on)
    s, i = simcore.cosine_topk(q, db, k, normalized=normalized, block_size=block)
    ref_s, ref_i = check_topk(s.cpu(), i.cpu(), q.cpu(), db.cpu(), k, normalized=normalized,
                              tol=1e-5 * (1 if not normalized else float(q.norm(dim=1).max() * db.norm(dim=1).max())))
    assert (i.cpu() == ref_i).float().mean() >= 0.98  # differences only at float32 near-ties


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16, torch.float64])
def test_query_dtypes(qdtype, generator):
    q = torch.randn(10, 32, generator=generator).to(qdtype)
    db = torch.randn(500, 32, generator=generator)
    s, i = simcore.cosine_topk(q, db, 7)
    check_topk(s, i, q.float(), db, 7)


def _axis_ties(generator, D=8, N=300):
    """Queries and rows 2^m * (+-e_r): every score is exactly a query component, with many
    duplicates; exact in any dtype and summation order, so ties are real ties."""
    axis = torch.randint(0, D, (N,), generator=generator)
    sign = torch.randint(0, 2, (N,), generator=generator) * 2 - 1
    power = 2.0 ** torch.randint(-3, 4, (N,), generator=generator)
    db = torch.zeros(N, D)
    db[torch.arange(N), axis] = sign * power
    return torch.randn(20, D, generator=generator), db


def test_ties_go_to_the_lower_index(generator):
    q, db = _axis_ties(generator)
    N = db.shape[0]
    for normalized in (False, True):
        for k in (1, 10, 150, N):
            s, i = simcore.cosine_topk(q, db, k, normalized=normalized, block_size=64)
            ref_s, ref_i = reference(q, db, k, normalized=normalized)
            assert torch.equal(i, ref_i), (normalized, k)
            assert torch.equal(s, ref_s), (normalized, k)
    # Duplicated rows: the lower index comes first.
    # +-1 rows: x.y <= 32 with equality only for y == x, all in exact integer arithmetic.
    db2 = torch.randn(50, 32, generator=generator).sign().repeat(3, 1)  # row j == row j+50 == row j+100
    q2 = db2[:5]                                                        # best: its own row, 3 ties
    s, i = simcore.cosine_topk(q2, db2, 3, normalized=True, block_size=64)
    assert torch.equal(i, torch.arange(5)[:, None] + torch.tensor([0, 50, 100]))
    assert (s[:, 0] == s[:, 1]).all() and (s[:, 1] == s[:, 2]).all()


def test_streaming_equals_in_memory(tmp_path, generator):
    # Integer data and inner products: exact whatever the tiling, so results must be identical.
    N, D = 10_000, 16
    db = torch.randint(-4, 5, (N, D), generator=generator).float()
    q = torch.randint(-4, 5, (13, D), generator=generator).float()
    expect = simcore.cosine_topk(q, db, 20, normalized=True)
    mm = np.lib.format.open_memmap(tmp_path / "db.npy", mode="w+", dtype=np.float32, shape=(N, D))
    mm[:] = db.numpy()
    mm.flush()
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    got = simcore.cosine_topk(q, mm, 20, normalized=True, progress=False)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    cuts = [0, 1, 1, 2500, 2501, 7777, N]  # uneven chunks, an empty one, numpy and torch mixed
    chunks = [db[a:b] if j % 2 else db[a:b].numpy() for j, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    got = simcore.cosine_topk(q, iter(chunks), 20, normalized=True, progress=False)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    # Random data, cosine: equal up to float32 rounding.
    dbr = torch.randn(N, D, generator=generator)
    a = simcore.cosine_topk(q, dbr, 10)
    b = simcore.cosine_topk(q, (dbr[s:s + 999] for s in range(0, N, 999)), 10, progress=False)
    assert (a[0] - b[0]).abs().max() <= 1e-6 and (a[1] == b[1]).float().mean() >= 0.99


def test_exclude(generator):
    x = torch.randn(200, 24, generator=generator)
    s, i = simcore.cosine_topk(x, x, 5, exclude="self", block_size=64)
    pairs = torch.stack([torch.arange(200), torch.arange(200)], 1)
    check_topk(s, i, x, x, 5, exclude=pairs)
    assert not (i == torch.arange(200)[:, None]).any()
    # Explicit pairs, unsorted and repeated; in-memory and streamed agree.
    pairs = torch.stack([torch.randint(0, 30, (300,), generator=generator),
                         torch.randint(0, 200, (300,), generator=generator)], 1)
    q = x[:30] + 0.1 * torch.randn(30, 24, generator=generator)
    s, i = simcore.cosine_topk(q, x, 8, exclude=pairs, block_size=50)
    check_topk(s, i, q, x, 8, exclude=pairs)
    s2, i2 = simcore.cosine_topk(q, iter([x[:70], x[70:]]), 8, exclude=pairs, progress=False)
    assert torch.equal(i, i2)
    # Fewer than k candidates left: missing slots are (-inf, -1).
    db = torch.randn(4, 24, generator=generator)
    ex = torch.tensor([[0, 0], [0, 3], [1, 2]])
    s, i = simcore.cosine_topk(db[:2], db, 4, exclude=ex)
    assert (i[0, 2:] == -1).all() and (s[0, 2:] == float("-inf")).all() and (i[0, :2] >= 0).all()
    assert (i[1, 3] == -1) and (i[1, :3] >= 0).all()
    ref_s, ref_i = reference(db[:2], db, 4, exclude=ex)
    assert torch.equal(i, ref_i)


def _clustered(n, d, generator, centers=100, spread=0.3):
    c = torch.randn(centers, d, generator=generator)
    return c[torch.randint(0, centers, (n,), generator=generator)] + spread * torch.randn(n, d, generator=generator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_half_database(dtype, data, generator):
    N, D, k = 20_000, 64, 20
    if data == "random":
        db32, q = torch.randn(N, D, generator=generator), torch.randn(100, D, generator=generator)
    else:  # 100 clusters; queries are noisy copies of database rows
        db32 = _clustered(N, D, generator)
        q = db32[torch.randint(0, N, (100,), generator=generator)] + 0.02 * torch.randn(100, D, generator=generator)
    db = db32.to(dtype)
    s, i = simcore.cosine_topk(q, db, k, block_size=3000)
    # Exact with respect to the half database (float64 reference on the same values) ...
    ref_s, ref_i = check_topk(s, i, q, db.float(), k, tol=2e-6)
    assert (i == ref_i).float().mean() >= 0.99
    # ... and recall@k against the float32 database's exact result (stated in docs).
    _, i32 = simcore.cosine_topk(q, db32, k)
    recall = _recall(i, i32, k)
    assert recall >= 0.99, recall


# ---- float32 databases searched through a bfloat16 candidate GEMM (CPU, cosine).
@pytest.fixture
def fp32_via_bf16():
    """Forces the bf16-nomination path for float32 databases (whatever the CPU and Q)."""
    with simcore.search.fp32_via_bf16(True):
        yield


@pytest.mark.parametrize("Q,N,D,k,block", [
    (1, 1, 8, 1, None),
    (7, 1000, 32, 5, 128),
    (33, 3001, 48, 100, 512),
    (5, 777, 16, 777, 100),      # k = N
    (70, 5000, 64, 1, None),
    (9, 4000, 24, 600, 333),     # several reservoir compactions
    (3, 300, 37, 10, 64),        # D not a multiple of 16: scalar tails of the conversion
])
def test_fp32_via_bf16_matches_reference(fp32_via_bf16, Q, N, D, k, block, generator):
    q = torch.randn(Q, D, generator=generator)
    db = torch.randn(N, D, generator=generator) * torch.rand(N, 1, generator=generator) * 3
    s, i = simcore.cosine_topk(q, db, k, block_size=block)
    ref_s, ref_i = check_topk(s, i, q, db, k, tol=1e-6)
    assert (i == ref_i).float().mean() >= 0.98  # differences only at float32 near-ties


def _biased_against(rows, q):
    """Rows moved (by under a quarter of a bfloat16 ulp per entry, so each still rounds to
    the same bfloat16 value) in the direction of sign(q): their true score exceeds the
    bf16 GEMM's by up to ~u * sum |q_i d_i|, the worst case the rescoring bound must cover."""
    b = rows.bfloat16().float()
    ulp = torch.where(b == 0, torch.zeros_like(b), 2.0 ** (torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7))
    out = b + torch.sign(q) * 0.24 * ulp
    assert torch.equal(out.bfloat16().view(torch.int16), rows.bfloat16().view(torch.int16))
    return out


def test_fp32_via_bf16_adversarial_near_ties(fp32_via_bf16, generator):
    # 600 rows whose cosines to query 0 lie in a 1.2e-3 band, 2e-6 apart: far below
    # bfloat16's resolution (~4e-3), far above float32 rounding, and each biased so
    # that the bf16 GEMM underrates it; before them, bf16-exact competitors just
    # below the band set the threshold. The rescoring must still order them exactly.
    D, k = 64, 50
    q = F.normalize(torch.randn(4, D, generator=generator), dim=1)
    q0 = q[0].double()

    def at_cosine(cos, n):
        perp = torch.randn(n, D, generator=generator).double()
        perp = F.normalize(perp - (perp @ q0)[:, None] * q0, dim=1)
        return (cos[:, None] * q0 + (1 - cos[:, None] ** 2).sqrt() * perp).float()
    band = _biased_against(at_cosine(0.3 + 2e-6 * torch.randperm(600, generator=generator).double(), 600), q[0])
    rivals = at_cosine(0.2985 + 1e-5 * torch.arange(300).double(), 300).bfloat16().float()
    noise = torch.randn(20_000, D, generator=generator) * 0.1
    db = torch.cat([noise[:7000], rivals, noise[7000:], band, band[:100]])  # exact duplicates at the end
    for kk in (k, 300, 700):
        s, i = simcore.cosine_topk(q, db, kk, block_size=4096)
        ref_s, ref_i = check_topk(s, i, q, db, kk, tol=1e-6)
        # Every row clearly inside the top-k (beyond float32 near-ties of the k-th) is returned,
        # and duplicates keep the lower index first.
        for row in range(q.shape[0]):
            clear = ref_i[row][ref_s[row] > ref_s[row, -1] + 1e-6]
            assert torch.isin(clear, i[row]).all(), (kk, row)
        dup = i[0][i[0] >= db.shape[0] - 100]  # row n - 100 + j duplicates row n - 700 + j
        assert torch.isin(dup - 600, i[0]).all()
    # k = N with duplicates: everything, ties by the lower index.
    small = torch.cat([band[:40], band[:40], noise[:20]])
    s, i = simcore.cosine_topk(q, small, small.shape[0])
    ref_s, ref_i = check_topk(s, i, q, small, small.shape[0], tol=1e-6)
    pos = torch.empty_like(i[0])
    pos[i[0]] = torch.arange(small.shape[0])
    assert (pos[:40] < pos[40:80]).all()  # each duplicate after its original


def test_fp32_via_bf16_ties_and_small_rows(fp32_via_bf16, generator):
    # Exact ties (duplicated rows, power-of-two multiples) go to the lower index.
    db = torch.randn(50, 32, generator=generator).sign().repeat(3, 1)
    s, i = simcore.cosine_topk(db[:5], db, 3, block_size=64)
    assert torch.equal(i, torch.arange(5)[:, None] + torch.tensor([0, 50, 100]))
    assert (s[:, 0] == s[:, 1]).all() and (s[:, 1] == s[:, 2]).all()
    scaled = torch.cat([db[:50] * 2.0 ** e for e in (-20, 0, 30)])
    s, i = simcore.cosine_topk(db[:5], scaled, 3, block_size=64)
    assert torch.equal(i, torch.arange(5)[:, None] + torch.tensor([0, 50, 100]))
    # Rows of tiny and huge norm, zero rows, subnormal entries: scored like the rest.
    q = torch.randn(6, 40, generator=generator)
    db = torch.randn(400, 40, generator=generator)
    db[10] = F.normalize(q[0], dim=0) * 1e-10     # cosine 1 with query 0
    db[11] = F.normalize(q[1], dim=0) * 1e30      # cosine 1 with query 1
    db[12] = 0
    db[13, :20] = 1e-40                           # float32 subnormals
    s, i = simcore.cosine_topk(q, db, 5)
    check_topk(s, i, q, db, 5, tol=1e-6)
    assert i[0, 0] == 10 and i[1, 0] == 11


def test_fp32_via_bf16_exclude_stream_and_threads(fp32_via_bf16, generator):
    x = torch.randn(300, 24, generator=generator)
    s, i = simcore.cosine_topk(x, x, 5, exclude="self", block_size=64)
    check_topk(s, i, x, x, 5, exclude=torch.stack([torch.arange(300)] * 2, 1), tol=1e-6)
    a = simcore.cosine_topk(x, x, 7)
    b = simcore.cosine_topk(x, (x[s0:s0 + 71] for s0 in range(0, 300, 71)), 7, progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # rescored scores: tiling-independent
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = simcore.cosine_topk(x, x, 7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[1], c[1]) and torch.equal(a[0], c[0])


def test_fp32_via_bf16_default_choice(generator):
    cpu = torch.device("cpu")
    many = tile_gemm.FP32_VIA_BF16_MIN_QUERIES
    assert tile_gemm.gemm_dtype(torch.float32, cpu, False, many) == torch.float32   # inner products: never
    assert tile_gemm.gemm_dtype(torch.float32, cpu, True, many - 1) == torch.float32
    fast = dispatch.extension().cpu_has_fast_bf16()
    assert tile_gemm.gemm_dtype(torch.float32, cpu, True, many) == (torch.bfloat16 if fast else torch.float32)


def test_fp32_via_bf16_context_manager():
    """fp32_via_bf16(True / False) forces the choice for CPU cosine searches of float32 databases
    inside its block only, nests, and holds for the current thread only (a context variable)."""
    cpu, choose = torch.device("cpu"), tile_gemm.gemm_dtype
    auto = choose(torch.float32, cpu, True, 1)
    assert auto == torch.float32  # one query: never automatically
    with simcore.search.fp32_via_bf16(True):
        assert choose(torch.float32, cpu, True, 1) == torch.bfloat16
        assert choose(torch.float32, cpu, False, 1) == torch.float32        # inner products: never
        assert choose(torch.float16, cpu, True, 1) == torch.bfloat16        # half databases: as always
        seen = []
        worker = threading.Thread(target=lambda: seen.append(choose(torch.float32, cpu, True, 1)))
        worker.start()
        worker.join()
        assert seen == [auto]  # another thread keeps the automatic choice
        with simcore.search.fp32_via_bf16(False):
            assert choose(torch.float32, cpu, True, 10**6) == torch.float32
        assert choose(torch.float32, cpu, True, 1) == torch.bfloat16
    assert choose(torch.float32, cpu, True, 1) == auto
    with pytest.raises(RuntimeError, match="inside"):
        with simcore.search.fp32_via_bf16(True):
            raise RuntimeError("inside")
    assert choose(torch.float32, cpu, True, 1) == auto  # restored after an error too
    with pytest.raises(TypeError, match="True, False or None"):
        with simcore.search.fp32_via_bf16("yes"):
            pass


def test_rescore_bound_covers_the_bf16_gemm(generator):
    # The bound of docs/cosine_topk.md against the actual GEMM: |v - R| <= m_q slack_j + rel |v|
    # for every pair, with the float32 rescoring R computed in float64 here (a tighter
    # reference than R itself; the bound's g terms cover both).
    ext, A = dispatch.extension(), dispatch.tensor_arg
    for D in (16, 256, 1000):
        q = F.normalize(torch.randn(64, D, generator=generator).double(), dim=1).float()
        db = torch.randn(2000, D, generator=generator) * torch.rand(2000, 1, generator=generator)
        qg = q.bfloat16()
        factor, m, rel = error_bounds.rescore_bounds(q, qg, torch.bfloat16, torch.float32, D, torch.device("cpu"))
        scale, slack, status = poisoned((2000,)), poisoned((2000,)), torch.full((1,), 2**63 - 1)
        conv = poisoned((2000, D), torch.bfloat16)
        ext.cosine_topk_prepare_block(A(db), A(scale), A(slack), A(status), 0, True, factor, 1, 0, A(conv))
        assert torch.equal(conv.view(torch.int16), db.bfloat16().view(torch.int16))
        v = (qg @ conv.T).float() * scale
        exact = (q.double() @ db.double().T) * scale.double()
        bound = m.double()[:, None] * slack.double() + rel * v.double().abs()
        assert ((v.double() - exact).abs() <= bound / 1.25).all()
        worst = error_bounds.slack_factor(torch.bfloat16, torch.float32, D)
        assert (bound <= 1.25 * worst + 1e-6).all()  # never looser than the worst-case bound


def test_matches_faiss_flat_ip(generator):
    import faiss
    q, db = torch.randn(50, 64, generator=generator), torch.randn(5000, 64, generator=generator)
    qn, dbn = F.normalize(q, dim=1), F.normalize(db, dim=1)
    index = faiss.IndexFlatIP(64)
    index.add(dbn.numpy())
    fs, fi = index.search(qn.numpy(), 30)
    s, i = simcore.cosine_topk(q, db, 30)
    assert np.abs(s.numpy() - fs).max() <= 1e-5
    assert (i.numpy() == fi).mean() >= 0.98


def test_reference_backend_agrees(generator):
    q, db = torch.randn(8, 16, generator=generator), torch.randn(300, 16, generator=generator)
    a = simcore.cosine_topk(q, db, 10, exclude="self")
    with backend("reference"):
        b = simcore.cosine_topk(q, db, 10, exclude="self")
    assert (a[0] - b[0]).abs().max() <= 1e-6 and (a[1] == b[1]).float().mean() >= 0.95


def test_bad_input():
    q, db = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="D=8.*D=9"):
        simcore.cosine_topk(q, torch.randn(20, 9), 3)
    with pytest.raises(ValueError, match="non-empty"):
        simcore.cosine_topk(torch.randn(0, 8), db, 3)
    with pytest.raises(ValueError, match="empty"):
        simcore.cosine_topk(q, torch.randn(0, 8), 1)
    with pytest.raises(ValueError, match="empty"):
        simcore.cosine_topk(q, iter([]), 1)
    for k in (0, -1, 21):
        with pytest.raises(ValueError, match="k"):
            simcore.cosine_topk(q, db, k)
    with pytest.raises(ValueError, match="exceeds"):
        simcore.cosine_topk(q, iter([db[:5], db[5:]]), 21)
    with pytest.raises(TypeError, match="k must be an int"):
        simcore.cosine_topk(q, db, 2.0)
    with pytest.raises(TypeError, match="float"):
        simcore.cosine_topk(q.long(), db, 3)
    with pytest.raises(TypeError, match="float"):
        simcore.cosine_topk(q, db.int(), 3)
    with pytest.raises(TypeError):
        simcore.cosine_topk(q, "database.npy", 3)
    with pytest.raises(ValueError, match="2-D"):
        simcore.cosine_topk(q[0], db, 3)
    with pytest.raises(ValueError, match="on meta"):
        simcore.cosine_topk(q, db.to("meta"), 3)
    bad = db.clone()
    bad[13, 2] = float("nan")
    with pytest.raises(ValueError, match="database row 13"):
        simcore.cosine_topk(q, bad, 3)
    bad[13, 2] = float("inf")
    with pytest.raises(ValueError, match="database row 13"):
        simcore.cosine_topk(q, bad.bfloat16(), 3)
    with pytest.raises(ValueError, match="database row 17"):
        simcore.cosine_topk(q, iter([db[:17], torch.full((1, 8), float("nan"))]), 3, progress=False)
    badq = q.clone()
    badq[2, 0] = float("nan")
    with pytest.raises(ValueError, match="queries row 2"):
        simcore.cosine_topk(badq, db, 3)
    for ex, err in [(torch.tensor([[0, 20]]), ValueError), (torch.tensor([[4, 0]]), ValueError),
                    (torch.tensor([[-1, 0]]), ValueError), (torch.tensor([0, 1]), ValueError),
                    (torch.tensor([[0.0, 1.0]]), TypeError), ("others", ValueError), (5, TypeError)]:
        with pytest.raises(err):
            simcore.cosine_topk(q, db, 3, exclude=ex)
    with pytest.raises(ValueError, match="block_size"):
        simcore.cosine_topk(q, db, 3, block_size=0)


def test_bad_memmap(tmp_path):
    q = torch.randn(3, 8)
    raw = np.memmap(tmp_path / "db.f32", dtype=np.float32, mode="w+", shape=(100,))
    with pytest.raises(ValueError, match="memmap"):
        simcore.cosine_topk(q, raw, 3)
    with pytest.raises(ValueError, match="D=8"):
        simcore.cosine_topk(q, raw.reshape(10, 10), 3)
    with pytest.raises(TypeError, match="float"):
        simcore.cosine_topk(q, np.zeros((10, 8), dtype=np.int32), 3)


def test_kernel_rechecks_its_arguments():
    ext, A = dispatch.extension(), dispatch.tensor_arg
    Q, nb, D, k = 4, 16, 8, 2
    cap = k + ext.COSINE_TOPK_MIN_SLACK
    args = dict(scores=torch.zeros(Q, nb), scale=torch.ones(nb), slack=torch.zeros(nb), queries=torch.zeros(Q, D),
                query_slack=torch.ones(Q), block=torch.zeros(nb, D), exclude_offsets=torch.zeros(Q + 1, dtype=torch.int64),
                exclude_index=torch.zeros(0, dtype=torch.int64), reservoir=torch.zeros(Q, cap, 2, dtype=torch.int64),
                count=torch.zeros(Q, dtype=torch.int64), threshold=torch.full((Q,), float("-inf")))
    ints = dict(q_begin=0, db_base=0, k=k, n_total=-1, rescore=False, num_threads=1)

    def call(**over):
        a = {**args, **{n: v for n, v in over.items() if n in args}}
        i = {**ints, **{n: v for n, v in over.items() if n in ints}}
        ext.cosine_topk_update(*[A(a[n]) for n in args], *i.values())

    call()
    with pytest.raises(ValueError, match="k must be"):
        call(k=cap)
    with pytest.raises(ValueError, match="k must be"):
        call(k=0)
    with pytest.raises(ValueError, match="outside"):
        call(q_begin=1)
    with pytest.raises(ValueError, match="k must be"):
        call(reservoir=torch.zeros(Q, k, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="exceed the database size"):
        call(n_total=10)
    with pytest.raises(TypeError, match="float32"):
        call(scores=torch.zeros(Q, nb, dtype=torch.float64))
    with pytest.raises(ValueError, match="sorted"):
        call(exclude_offsets=torch.tensor([0, 2, 2, 2, 2]), exclude_index=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="offsets"):
        call(exclude_offsets=torch.tensor([0, 3, 2, 2, 2]), exclude_index=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="offsets"):
        call(exclude_offsets=torch.tensor([0, 0, 0, 0, 9]), exclude_index=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="count"):
        call(count=torch.full((Q,), cap + 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        call(rescore=True, block=torch.zeros(nb, D + 1))
    # the CUDA small-tile workspace (checked on both devices, used on CUDA): float32, 1-d, its own memory
    with_ws = lambda ws: ext.cosine_topk_update(*[A(args[n]) for n in args], *ints.values(), 0, 0.0, A(ws))  # noqa: E731
    with_ws(torch.zeros(Q * (nb + 1)))
    with pytest.raises(TypeError, match="float32"):
        with_ws(torch.zeros(Q * (nb + 1), dtype=torch.float64))
    with pytest.raises(ValueError, match="overlap"):
        with_ws(args["scores"].view(-1))
    with pytest.raises(ValueError, match="overlap"):
        with_ws(args["reservoir"].view(-1).view(torch.float32))


def test_kernel_with_poisoned_state(generator):
    # The reservoir starts as garbage (NaN scores / max indices): only the first
    # `count` slots may be read, and every slot the result uses must be written.
    ext, A = dispatch.extension(), dispatch.tensor_arg
    Q, N, D, k = 6, 700, 16, 9
    q = F.normalize(torch.randn(Q, D, generator=generator), dim=1)
    db = torch.randn(N, D, generator=generator)
    cap = k + ext.COSINE_TOPK_MIN_SLACK
    reservoir = poisoned((Q, cap * 4), torch.float32).view(torch.int64).view(Q, cap, 2)
    count = torch.zeros(Q, dtype=torch.int64)
    thr = torch.full((Q,), float("-inf"))
    scale, slack, status = poisoned((N,)), poisoned((N,)), torch.full((1,), 2**63 - 1)
    ext.cosine_topk_prepare_block(A(db), A(scale), A(slack), A(status), 0, True, 0.0, 1)
    assert torch.isfinite(scale).all() and int(status) == 2**63 - 1
    eo, ei = torch.zeros(Q + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    for s0 in range(0, N, 100):
        tile = poisoned((Q, 100))
        torch.mm(q, db[s0:s0 + 100].T, out=tile)
        ext.cosine_topk_update(A(tile), A(scale[s0:s0 + 100]), A(slack[s0:s0 + 100]), A(q), A(torch.ones(Q)),
                               A(db[s0:s0 + 100]), A(eo), A(ei), A(reservoir), A(count), A(thr), 0, s0, k, -1,
                               False, 2)
    s, i = tiled_search.finalize(reservoir, count, k)
    check_topk(s, i, q, db, k)


def test_flat_index_round_trip(tmp_path, generator):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        index = simcore.FlatIndex(32, dtype=dtype)
        a, b = torch.randn(1500, 32, generator=generator), torch.randn(700, 32, generator=generator)
        index.add(a)
        index.add(b.numpy())
        assert len(index) == 2200
        q = torch.randn(5, 32, generator=generator)
        s, i = index.search(q, 10)
        check_topk(s, i, q, torch.cat([a, b]).to(dtype).float(), 10, tol=2e-6)
        path = tmp_path / f"index_{dtype}.simc"
        index.save(path)
        loaded = simcore.FlatIndex.load(path)
        assert loaded.dtype == dtype and loaded.dim == 32 and len(loaded) == 2200
        assert torch.equal(loaded.vectors.view(torch.int16), index.vectors.view(torch.int16)) \
            if dtype != torch.float32 else torch.equal(loaded.vectors.view(torch.int32), index.vectors.view(torch.int32))
        s2, i2 = loaded.search(q, 10)
        assert torch.equal(s, s2) and torch.equal(i, i2)
    ip = simcore.FlatIndex(4, metric="ip")
    ip.add(torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0]]))
    assert simcore.FlatIndex.load(_saved(ip, tmp_path)).search(torch.tensor([[1.0, 0, 0, 0]]), 1)[1].item() == 1


def _saved(index, tmp_path):
    path = tmp_path / "x.simc"
    index.save(path)
    return path


def test_flat_index_rejects_bad_files_and_input(tmp_path, generator):
    index = simcore.FlatIndex(8)
    index.add(torch.randn(100, 8, generator=generator))
    path = _saved(index, tmp_path)
    raw = path.read_bytes()
    cases = {"truncated": raw[:-5], "padded": raw + b"\0", "header": raw[:20],
             "magic": b"XXXXXXXX" + raw[8:], "payload": raw[:-1] + bytes([raw[-1] ^ 1]),
             "dim": raw[:24] + bytes([raw[24] ^ 1]) + raw[25:]}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.simc"
        bad.write_bytes(data)
        with pytest.raises(ValueError):
            simcore.FlatIndex.load(bad)
    with pytest.raises(ValueError, match="shape"):
        index.add(torch.randn(3, 9))
    with pytest.raises(TypeError):
        simcore.FlatIndex(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="empty"):
        simcore.FlatIndex(8).search(torch.randn(1, 8), 1)
    with pytest.raises(ValueError, match="row 102"):
        index.add(torch.cat([torch.zeros(2, 8), torch.full((1, 8), float("nan"))]))


def test_faiss_index(generator):
    db = torch.randn(3000, 32, generator=generator)
    q = db[:20] + 0.01 * torch.randn(20, 32, generator=generator)
    exact_s, exact_i = simcore.cosine_topk(q, db, 5)
    for kind in ("Flat", "HNSW32", "IVF16,Flat"):
        index = simcore.faiss_index(db, kind, nprobe=16 if kind.startswith("IVF") else None)
        assert len(index) == 3000
        s, i = index.search(q, 5)
        assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (20, 5)
        assert (i[:, 0] == exact_i[:, 0]).float().mean() >= 0.9
        if kind == "Flat":
            assert (s - exact_s).abs().max() <= 1e-5
    flat = simcore.FlatIndex(32)
    flat.add(db)
    assert len(flat.to_faiss("Flat")) == 3000


def test_faiss_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        simcore.faiss_index(torch.randn(10, 4), "Flat")


def test_torch_compile_smoke(generator):
    q, db = torch.randn(6, 16, generator=generator), torch.randn(200, 16, generator=generator)

    def fn(q, db):
        s, i = simcore.cosine_topk(q, db, 4)
        return s * 2, i

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    s, i = compiled(q, db)
    s0, i0 = simcore.cosine_topk(q, db, 4)
    assert torch.equal(i, i0) and torch.equal(s, s0 * 2)


# ---- CUDA (skipped without a GPU): the CPU comparisons above, on CUDA tensors, with the
# CUDA-only paths: float16 tile GEMMs (cosine on a float16 database), the converted
# bfloat16 block (inner products on a float16 database), the block-wide compaction
# (cap = k + COSINE_TOPK_MIN_SLACK), and large k.
HALF = [torch.float16, torch.bfloat16]


def _recall(found, want, k):
    """The mean share of each row of ``want``'s ids that ``found`` holds."""
    return np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, want)])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("D", [64, 512, 1024])  # 512, 1024: longer than a thread block
def test_cuda_half_database(dtype, data, normalized, D, generator, cuda_device):
    N, Q, k = (20_000, 100, 20) if cuda_device.type == "cuda" else (3_500, 12, 20)  # emulated: smaller
    if data == "random":
        db32, q = torch.randn(N, D, generator=generator), torch.randn(Q, D, generator=generator)
    else:
        db32 = _clustered(N, D, generator)
        q = db32[torch.randint(0, N, (Q,), generator=generator)] + 0.02 * torch.randn(Q, D, generator=generator)
    db = db32.to(dtype)
    s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), k, normalized=normalized, block_size=3000)
    tol = 2e-6 if not normalized else 1e-6 * float(q.norm(dim=1).max() * db.float().norm(dim=1).max())
    tol *= max(1, D // 64)  # float32 rescoring: rounding grows with D
    ref_s, ref_i = check_topk(s.cpu(), i.cpu(), q, db.float(), k, normalized=normalized, tol=tol)
    assert (i.cpu() == ref_i).float().mean() >= 0.99
    if not normalized:  # recall against the float32 database's exact result, as on the CPU
        _, i32 = simcore.cosine_topk(q.to(cuda_device), db32.to(cuda_device), k)
        recall = _recall(i.cpu(), i32.cpu(), k)
        # 0.99 is a property of the half database, which the exact top-k over it (ref_i) may miss on
        # the emulated sample (12 queries: 240 ids); the kernel must then do as well as it, up to one id.
        assert recall >= min(0.99, _recall(ref_i, i32.cpu(), k) - 1 / (Q * k)), recall


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_cuda_ties_go_to_the_lower_index(dtype, generator, cuda_device):
    # As test_ties_go_to_the_lower_index: the rows and the +-1 rows below are exact in every
    # dtype and every score is exact in float32, so the result must equal the reference bit for bit.
    q, db = _axis_ties(generator)
    N = db.shape[0]
    for normalized in (False, True):
        for k in (1, 10, 150, N):
            s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device, dtype), k, normalized=normalized,
                                       block_size=64)
            ref_s, ref_i = reference(q, db, k, normalized=normalized)
            assert torch.equal(i.cpu(), ref_i), (normalized, k)
            assert torch.equal(s.cpu(), ref_s), (normalized, k)
    # Duplicated +-1 rows: the lower index first. Cosine scores of identical rows are equal only when
    # computed alike: rescored (half) rows are; float32 GEMM tiles of other widths need not be.
    db2 = torch.randn(50, 32, generator=generator).sign().repeat(3, 1)
    for normalized in (True,) if dtype == torch.float32 else (True, False):
        s, i = simcore.cosine_topk(db2[:5].to(cuda_device), db2.to(cuda_device, dtype), 3, normalized=normalized,
                                   block_size=64)
        assert torch.equal(i.cpu(), torch.arange(5)[:, None] + torch.tensor([0, 50, 100]))
        assert (s[:, 0] == s[:, 1]).all() and (s[:, 1] == s[:, 2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_exclude(dtype, generator, cuda_device):
    x = torch.randn(200, 24, generator=generator).to(dtype).float()  # values exact in dtype
    xc = x.to(dtype).to(cuda_device)
    s, i = simcore.cosine_topk(x.to(cuda_device), xc, 5, exclude="self", block_size=64)
    self_pairs = torch.stack([torch.arange(200), torch.arange(200)], 1)
    check_topk(s.cpu(), i.cpu(), x, x, 5, exclude=self_pairs)
    assert not (i.cpu() == torch.arange(200)[:, None]).any()
    # Explicit pairs, unsorted and repeated, given as a CUDA tensor; in-memory and streamed agree.
    pairs = torch.stack([torch.randint(0, 30, (300,), generator=generator),
                         torch.randint(0, 200, (300,), generator=generator)], 1)
    q = x[:30] + 0.1 * torch.randn(30, 24, generator=generator)
    s, i = simcore.cosine_topk(q.to(cuda_device), xc, 8, exclude=pairs.to(cuda_device), block_size=50)
    check_topk(s.cpu(), i.cpu(), q, x, 8, exclude=pairs)
    s2, i2 = simcore.cosine_topk(q.to(cuda_device), iter([xc[:70], xc[70:]]), 8, exclude=pairs, progress=False)
    assert torch.equal(i, i2)
    # Fewer than k candidates left: missing slots are (-inf, -1).
    db = torch.randn(4, 24, generator=generator).to(dtype)
    ex = torch.tensor([[0, 0], [0, 3], [1, 2]])
    s, i = simcore.cosine_topk(db[:2].float().to(cuda_device), db.to(cuda_device), 4, exclude=ex)
    s, i = s.cpu(), i.cpu()
    assert (i[0, 2:] == -1).all() and (s[0, 2:] == float("-inf")).all() and (i[0, :2] >= 0).all()
    assert (i[1, 3] == -1) and (i[1, :3] >= 0).all()
    ref_s, ref_i = reference(db[:2].float(), db.float(), 4, exclude=ex)
    assert torch.equal(i, ref_i)


@pytest.mark.parametrize("dtype", HALF)
def test_cuda_half_near_ties(dtype, generator, cuda_device):
    # As test_fp32_via_bf16_adversarial_near_ties, for half databases on CUDA (float16: a float16
    # tile GEMM, bfloat16: a bfloat16 one; cuBLAS, with whatever reduction torch allows): 600 rows
    # whose cosines to query 0 lie in a 1.2e-3 band, about 2e-6 apart after rounding to the half
    # dtype (far below the half GEMM's output resolution), rivals just below the band, and exact
    # duplicates at the end. Only the rescoring can order them; the slack must let every one through.
    D = 64
    q = F.normalize(torch.randn(4, D, generator=generator), dim=1)
    q0 = q[0].double()

    def at_cosine(cos):
        perp = torch.randn(len(cos), D, generator=generator).double()
        perp = F.normalize(perp - (perp @ q0)[:, None] * q0, dim=1)
        return (cos[:, None] * q0 + (1 - cos[:, None] ** 2).sqrt() * perp).float()
    band = at_cosine(0.3 + 2e-6 * torch.randperm(600, generator=generator).double())
    rivals = at_cosine(0.2985 + 1e-5 * torch.arange(300).double())
    noise = torch.randn(20_000, D, generator=generator) * 0.1
    db = torch.cat([noise[:7000], rivals, noise[7000:], band, band[:100]]).to(dtype)
    n = db.shape[0]
    for kk in (50, 300, 700):
        s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), kk, block_size=4096)
        s, i = s.cpu(), i.cpu()
        ref_s, ref_i = check_topk(s, i, q, db.float(), kk, tol=1e-6)
        for row in range(q.shape[0]):  # every row clearly inside the top-k is returned
            clear = ref_i[row][ref_s[row] > ref_s[row, -1] + 1e-6]
            assert torch.isin(clear, i[row]).all(), (kk, row)
        dup = i[0][i[0] >= n - 100]  # row n - 100 + j duplicates row n - 700 + j: both in, original first
        assert torch.isin(dup - 600, i[0]).all()
        pos = {int(v): p for p, v in enumerate(i[0])}
        assert all(pos[int(d) - 600] < pos[int(d)] for d in dup)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("N,k,block", [
    (777, 777, None),         # k = N (cap = N + 1: no compaction ever)
    (777, 777, 100),
    (20_000, 4096, 3000),     # large k, several compactions per query
    (40_000, 16_384, None),   # beyond FAISS GPU's k <= 2048
])
def test_cuda_large_k(dtype, N, k, block, generator, cuda_device):
    Q, D = 6, 32
    q = torch.randn(Q, D, generator=generator)
    db = (torch.randn(N, D, generator=generator) * torch.rand(N, 1, generator=generator) * 3).to(dtype)
    s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), k, block_size=block)
    ref_s, ref_i = check_topk(s.cpu(), i.cpu(), q, db.float(), k, tol=1e-5 if dtype == torch.float32 else 2e-6)
    assert (i.cpu() == ref_i).float().mean() >= 0.99  # differences only at float32 near-ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_compaction_keeps_the_lowest_indices_of_a_tie(dtype, generator, cuda_device):
    """Every score equal: each compaction of the reservoir (cap = k + COSINE_TOPK_MIN_SLACK < N)
    cuts inside one tie, and must keep its lowest database indices."""
    N, D, k = 2000, 24, 100
    q = torch.randn(3, D, generator=generator)
    db = torch.randn(1, D, generator=generator).to(dtype).repeat(N, 1)
    s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), k, block_size=700)
    assert torch.equal(i.cpu(), torch.arange(k).repeat(3, 1))
    assert (s == s[:, :1]).all()


def test_exact_gemm_settings_are_forced_and_restored():
    """The search turns TF32 and reduced-precision half reductions off for its tile GEMMs
    and gives the caller's settings back, also after an error (only flags: runs without a GPU)."""
    m = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = tuple(getattr(m, n) for n in names)
    try:
        for n in names:
            setattr(m, n, True)
        with pytest.raises(RuntimeError, match="inside"):
            with tile_gemm.exact_cuda_gemms(torch.device("cuda")):
                assert not any(getattr(m, n) for n in names)
                raise RuntimeError("inside")
        assert all(getattr(m, n) for n in names)
        with tile_gemm.exact_cuda_gemms(torch.device("cpu")):  # CPU searches leave them alone
            assert all(getattr(m, n) for n in names)
    finally:
        for n, v in zip(names, saved):
            setattr(m, n, v)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("Q,k,D", [(1, 10, 96), (40, 300, 33), (64, 1000, 256), (65, 50, 96)])
def test_cuda_small_tiles_split_equals_one_block(dtype, Q, k, D, generator, monkeypatch, cuda_device):
    """Tiles of at most 64 query rows are scanned by one thread block per (row, 256-column segment)
    and then merged per row (csrc/cuda/cosine_topk.cu); with SPLIT_SMALL_TILES off, by one block
    per row. Both rescore with the same warp dot and merge the same chunks with the same thresholds,
    so scores and indices must be identical bit for bit, compactions and exclusions included
    (Q = 65: a tile above the limit takes the one-block path either way). D = 33 and 96 leave
    partial warps in the rescoring dot."""
    N, block = 5000, 1500  # several tiles per query; k = 1000 compacts several times per tile
    q = torch.randn(Q, D, generator=generator)
    db = (torch.randn(N, D, generator=generator) * (torch.rand(N, 1, generator=generator) * 3 + 0.1)).to(dtype)
    db[7::500] = db[3]  # exact duplicates: ties broken by the lower index
    excl = torch.stack([torch.randint(0, Q, (60,), generator=generator), torch.randint(0, N, (60,), generator=generator)], 1)
    qc, dbc = q.to(cuda_device), db.to(cuda_device)
    split = simcore.cosine_topk(qc, dbc, k, exclude=excl, block_size=block)
    monkeypatch.setattr(tiled_search, "SPLIT_SMALL_TILES", False)
    one = simcore.cosine_topk(qc, dbc, k, exclude=excl, block_size=block)
    assert torch.equal(split[1], one[1]) and torch.equal(split[0], one[0])
    with simcore.cuda_emulation(False):
        s_cpu, i_cpu = simcore.cosine_topk(q, db, k, exclude=excl)
    assert (split[1].cpu() == i_cpu).float().mean() >= 0.99  # rescoring dots sum in another order on the CPU
    assert (split[0].cpu() - s_cpu).abs().max() < 1e-5


@hardware_only("TF32 is a setting of the GPU's cuBLAS")
def test_cuda_float32_exact_with_tf32_enabled(generator):
    q = torch.randn(40, 64, generator=generator)
    db = torch.randn(5000, 64, generator=generator)
    m = torch.backends.cuda.matmul
    saved = m.allow_tf32
    m.allow_tf32 = True
    try:
        s, i = simcore.cosine_topk(q.cuda(), db.cuda(), 50)
        assert m.allow_tf32
    finally:
        m.allow_tf32 = saved
    check_topk(s.cpu(), i.cpu(), q, db, 50)


def test_cuda_streaming_equals_in_memory(tmp_path, generator, cuda_device):
    # Integer data and inner products are exact in any tiling and on either device.
    N, D = 10_000, 16
    db = torch.randint(-4, 5, (N, D), generator=generator).float()
    q = torch.randint(-4, 5, (13, D), generator=generator).float()
    with simcore.cuda_emulation(False):
        expect = simcore.cosine_topk(q, db, 20, normalized=True)  # CPU
    got = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), 20, normalized=True)
    assert torch.equal(got[0].cpu(), expect[0]) and torch.equal(got[1].cpu(), expect[1])
    np.save(tmp_path / "db.npy", db.numpy())
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")  # numpy chunks are moved to the queries' device
    got = simcore.cosine_topk(q.to(cuda_device), mm, 20, normalized=True, progress=False)
    assert torch.equal(got[0].cpu(), expect[0]) and torch.equal(got[1].cpu(), expect[1])
    cuts = [0, 1, 1, 2500, 2501, 7777, N]
    chunks = [db[a:b].to(cuda_device) if j % 2 else db[a:b].numpy() for j, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    got = simcore.cosine_topk(q.to(cuda_device), iter(chunks), 20, normalized=True, progress=False)
    assert torch.equal(got[0].cpu(), expect[0]) and torch.equal(got[1].cpu(), expect[1])
    for dtype in HALF:  # small integers are exact in both half dtypes too
        got = simcore.cosine_topk(q.to(cuda_device), db.to(dtype).to(cuda_device), 20, normalized=True, block_size=999)
        assert torch.equal(got[0].cpu(), expect[0]) and torch.equal(got[1].cpu(), expect[1])


@pytest.mark.parametrize("D", [16, 512])
def test_cuda_float16_rows_beyond_the_float16_gemm_range(D, generator, cuda_device):
    # A float16 database is searched (cosine) with a float16 tile GEMM on CUDA: for rows of norm
    # above 65504 its output overflows to +-inf. Those rows must still be nominated and rescored,
    # -inf ones included (they belong in a top-k that reaches them, e.g. k = N).
    q = torch.randn(4, D, generator=generator)
    flips = (torch.rand(100, D, generator=generator) < 0.15).float() * -2 + 1
    signs = torch.sign(q[0]).repeat(100, 1) * flips
    big = torch.cat([signs[:50], -signs[50:]]) * 30_000.0   # |entries| 30000 < 65504, norm >= 120000
    db = torch.cat([torch.randn(200, D, generator=generator), big]).half()
    N = db.shape[0]
    for k in (10, 120, N):
        s, i = simcore.cosine_topk(q.to(cuda_device), db.to(cuda_device), k)
        ref_s, ref_i = check_topk(s.cpu(), i.cpu(), q, db.float(), k, tol=2e-6 * max(1, D // 64))
        assert (i.cpu() == ref_i).float().mean() >= 0.99
        assert (i >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slack_rel", [0.0, 1e-3])
def test_kernel_rescores_overflowed_half_scores(on, slack_rel, generator):
    # A float16 tile whose scores overflowed to +-inf (or are NaN): the error bound says nothing
    # about them, so they are nominated explicitly and rescored exactly, whatever slack_rel
    # (0 * inf is NaN) and however tight the threshold; with k = N every row comes back.
    ext, A = dispatch.extension(), dispatch.tensor_arg
    dev = on
    stream = dispatch.executor(dev)
    Q, N, D = 3, 300, 16
    q = F.normalize(torch.randn(Q, D, generator=generator), dim=1)
    db = torch.randn(N, D, generator=generator)
    db[7], db[150] = q[0] * 4, q[0] * 3 + 0.1 * torch.randn(D, generator=generator)  # query 0's best two
    db = db.half()
    scale, slack = torch.empty(N), torch.empty(N)
    status = torch.full((1,), 2**63 - 1)
    ext.cosine_topk_prepare_block(A(db), A(scale), A(slack), A(status), 0, True, 0.0, 1)
    tile = (q @ (db.float() * scale[:, None]).T).half() / scale.half()  # approximate raw scores
    tile[:, 7], tile[:, 150], tile[:, 200], tile[:, 201] = float("inf"), float("-inf"), float("-inf"), float("nan")
    put = lambda t: t.to(dev)  # noqa: E731
    q, db, scale, slack, tile = map(put, (q, db, scale, slack, tile))
    eo, ei = torch.zeros(Q + 1, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    for k in (2, N):
        cap = N + 1 if k == N else k + ext.COSINE_TOPK_MIN_SLACK
        reservoir = torch.zeros((Q, cap, 2), dtype=torch.int64, device=dev)
        count = torch.zeros(Q, dtype=torch.int64, device=dev)
        thr = torch.full((Q,), float("-inf"), device=dev)
        qslack = torch.zeros(Q, device=dev)
        ext.cosine_topk_update(A(tile), A(scale), A(slack), A(q), A(qslack), A(db), A(eo), A(ei), A(reservoir),
                               A(count), A(thr), 0, 0, k, N, True, 1, stream, slack_rel)
        s, i = tiled_search.finalize(reservoir, count, k)
        check_topk(s.cpu(), i.cpu(), q.cpu(), db.float().cpu(), k, tol=2e-6)
        assert (i >= 0).all()
        if k == 2:
            assert sorted(i[0].tolist()) == [7, 150]


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_cuda_kernel_with_poisoned_state(dtype, generator, cuda_device):
    # As test_kernel_with_poisoned_state, on CUDA: garbage reservoir, poisoned scale, slack and
    # tiles; cap = k + COSINE_TOPK_MIN_SLACK < N, so the block-wide compaction runs; exclusions.
    ext, A = dispatch.extension(), dispatch.tensor_arg
    dev = cuda_device
    stream = dispatch.cuda_stream(cuda_device)
    Q, N, D, k = 6, 700, 16, 9
    q = F.normalize(torch.randn(Q, D, generator=generator), dim=1).to(dev)
    db = torch.randn(N, D, generator=generator).to(dtype).to(dev)
    cap = k + ext.COSINE_TOPK_MIN_SLACK
    assert cap < N
    rescore = dtype != torch.float32
    factor = error_bounds.slack_factor(dtype, dtype, D) if rescore else 0.0
    reservoir = poisoned((Q, cap * 4), torch.float32, dev).view(torch.int64).view(Q, cap, 2)
    count = torch.zeros(Q, dtype=torch.int64, device=dev)
    thr = torch.full((Q,), float("-inf"), device=dev)
    scale, slack = poisoned((N,), device=dev), poisoned((N,), device=dev)
    status = torch.full((1,), 2**63 - 1, device=dev)
    ext.cosine_topk_prepare_block(A(db), A(scale), A(slack), A(status), 0, True, factor, 1, stream)
    synchronize(cuda_device)
    assert torch.isfinite(scale).all() and torch.isfinite(slack).all() and int(status) == 2**63 - 1
    pairs = torch.stack([torch.arange(Q), torch.arange(Q) * 97], 1)  # query r excludes row 97 r
    eo, ei = inputs.exclusion_csr(pairs, Q, N, dev)
    qg, qn = q.to(dtype), q.norm(dim=1)  # named: a packed tensor_arg does not keep its tensor alive
    for s0 in range(0, N, 100):
        tile = poisoned((Q, 100), dtype, dev)
        torch.mm(qg, db[s0:s0 + 100].T, out=tile)
        ext.cosine_topk_update(A(tile), A(scale[s0:s0 + 100]), A(slack[s0:s0 + 100]), A(q), A(qn),
                               A(db[s0:s0 + 100]), A(eo), A(ei), A(reservoir), A(count), A(thr), 0, s0, k, -1,
                               rescore, 1, stream)
    s, i = tiled_search.finalize(reservoir, count, k)
    check_topk(s.cpu(), i.cpu(), q.cpu(), db.float().cpu(), k, tol=1e-5 if dtype == torch.float32 else 2e-6,
               exclude=pairs)
    if dtype != torch.bfloat16:  # the bfloat16 copy written in the norm pass (inner products on half rows)
        conv = poisoned((N, D), torch.bfloat16, dev)
        ext.cosine_topk_prepare_block(A(db), A(scale), A(slack), A(status), 0, False,
                                      error_bounds.slack_factor(torch.bfloat16, dtype, D), 1, stream, A(conv))
        synchronize(cuda_device)
        assert torch.equal(conv.view(torch.int16), db.bfloat16().view(torch.int16))
        assert (scale == 1).all() and torch.isfinite(slack).all()


def test_cuda_kernel_rechecks_its_arguments(cuda_device):
    ext, A = dispatch.extension(), dispatch.tensor_arg
    dev = cuda_device
    stream = dispatch.cuda_stream(cuda_device)
    Q, nb, D, k = 4, 16, 8, 2
    cap = k + ext.COSINE_TOPK_MIN_SLACK
    z = dict(device=dev)
    args = dict(scores=torch.zeros(Q, nb, **z), scale=torch.ones(nb, **z), slack=torch.zeros(nb, **z),
                queries=torch.zeros(Q, D, **z), query_slack=torch.ones(Q, **z), block=torch.zeros(nb, D, **z),
                exclude_offsets=torch.zeros(Q + 1, dtype=torch.int64, **z),
                exclude_index=torch.zeros(0, dtype=torch.int64, **z),
                reservoir=torch.zeros(Q, cap, 2, dtype=torch.int64, **z), count=torch.zeros(Q, dtype=torch.int64, **z),
                threshold=torch.full((Q,), float("-inf"), **z))
    ints = dict(q_begin=0, db_base=0, k=k, n_total=-1, rescore=False, num_threads=1, stream=stream)

    def call(**over):
        a = {**args, **{n: v for n, v in over.items() if n in args}}
        i = {**ints, **{n: v for n, v in over.items() if n in ints}}
        ext.cosine_topk_update(*[A(a[n]) for n in args], *i.values())
        synchronize(cuda_device)

    call()
    with pytest.raises(ValueError, match="k must be"):
        call(k=cap)
    with pytest.raises(ValueError, match="k must be"):
        call(k=0)
    with pytest.raises(ValueError, match="outside"):
        call(q_begin=1)
    with pytest.raises(ValueError, match="exceed the database size"):
        call(n_total=10)
    with pytest.raises(TypeError, match="float32"):
        call(scores=torch.zeros(Q, nb, dtype=torch.float64, **z))
    with pytest.raises(ValueError):
        call(rescore=True, block=torch.zeros(nb, D + 1, **z))
    # Values inside device tensors are not read on the host (the CPU entry point checks them
    # there): the kernel clamps the exclusion offsets into [0, E] and the count into [0, cap], so
    # a corrupt CSR or count stays inside its buffers (compute-sanitizer checks this test) and
    # the count stays in range.
    for bad in (dict(exclude_offsets=torch.tensor([0, 2, 2, 2, 2], **z), exclude_index=torch.tensor([5, 3], **z)),
                dict(exclude_offsets=torch.tensor([0, 3, 2, 2, 2], **z), exclude_index=torch.tensor([5, 3], **z)),
                dict(exclude_offsets=torch.tensor([0, 0, 0, 0, 9], **z), exclude_index=torch.tensor([5, 3], **z)),
                dict(exclude_offsets=torch.tensor([0, -7, 1, 1, 2], **z), exclude_index=torch.tensor([5, 3], **z)),
                dict(count=torch.full((Q,), cap + 1, dtype=torch.int64, **z)),
                dict(count=torch.full((Q,), -5, dtype=torch.int64, **z))):
        count = bad.get("count", torch.zeros(Q, dtype=torch.int64, **z))
        call(**{**bad, "count": count, "threshold": torch.full((Q,), float("-inf"), **z)})
        assert ((count >= 0) & (count <= cap)).all()
    # CUDA appends a whole thread block after a compaction: a reservoir of k + 1, enough on the
    # CPU, is refused unless it holds the whole database (cap > n_total).
    small = dict(count=torch.zeros(Q, dtype=torch.int64, **z), threshold=torch.full((Q,), float("-inf"), **z))
    with pytest.raises(ValueError, match="too small"):
        call(reservoir=torch.zeros(Q, k + 1, 2, dtype=torch.int64, **z), **small)
    call(reservoir=torch.zeros(Q, nb + 1, 2, dtype=torch.int64, **z), n_total=nb, **small)
    assert (small["count"] == nb).all()
    if dev.type != "cuda":
        return  # emulated: CPU tensors are the device's own
    # Every tensor on the scores' device.
    with pytest.raises(ValueError, match="device"):
        call(scale=torch.ones(nb))
    with pytest.raises(ValueError, match="device"):
        call(reservoir=torch.zeros(Q, cap, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="device"):
        call(rescore=True, queries=torch.zeros(Q, D))


@hardware_only("errors for tensors split between the CPU and a GPU")
def test_cuda_bad_input():
    dev = torch.device("cuda")
    q, db = torch.randn(4, 8, device=dev), torch.randn(20, 8, device=dev)
    with pytest.raises(ValueError, match="D=8.*D=9"):
        simcore.cosine_topk(q, torch.randn(20, 9, device=dev), 3)
    with pytest.raises(ValueError, match="non-empty"):
        simcore.cosine_topk(torch.randn(0, 8, device=dev), db, 3)
    with pytest.raises(ValueError, match="empty"):
        simcore.cosine_topk(q, torch.randn(0, 8, device=dev), 1)
    for k in (0, -1, 21):
        with pytest.raises(ValueError, match="k"):
            simcore.cosine_topk(q, db, k)
    with pytest.raises(ValueError, match="exceeds"):
        simcore.cosine_topk(q, iter([db[:5], db[5:]]), 21)
    with pytest.raises(TypeError, match="float"):
        simcore.cosine_topk(q, db.int(), 3)
    with pytest.raises(ValueError, match="on cpu but queries are on cuda"):
        simcore.cosine_topk(q, db.cpu(), 3)
    with pytest.raises(ValueError, match="on cpu but queries are on cuda"):
        simcore.cosine_topk(q, iter([db[:5], db[5:].cpu()]), 3, progress=False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # found by the CUDA norm pass
        for value in (float("nan"), float("inf")):
            bad = db.clone()
            bad[13, 2] = value
            with pytest.raises(ValueError, match="database row 13"):
                simcore.cosine_topk(q, bad.to(dtype), 3)
    with pytest.raises(ValueError, match="database row 17"):
        simcore.cosine_topk(q, iter([db[:17], torch.full((1, 8), float("nan"), device=dev)]), 3, progress=False)
    badq = q.clone()
    badq[2, 0] = float("nan")
    with pytest.raises(ValueError, match="queries row 2"):
        simcore.cosine_topk(badq, db, 3)
    for ex, err in [(torch.tensor([[0, 20]]), ValueError), (torch.tensor([[4, 0]]), ValueError),
                    (torch.tensor([[0, 20]], device=dev), ValueError), (torch.tensor([[0.0, 1.0]]), TypeError)]:
        with pytest.raises(err):
            simcore.cosine_topk(q, db, 3, exclude=ex)
    with pytest.raises(ValueError, match="block_size"):
        simcore.cosine_topk(q, db, 3, block_size=0)
    # The search still works after every refusal above (no sticky CUDA error).
    s, i = simcore.cosine_topk(q, db, 3)
    check_topk(s.cpu(), i.cpu(), q.cpu(), db.cpu(), 3)
