"""Reliability of cosine_topk / FlatIndex / faiss_index and their compiled kernels (issue 8).

Bad input with exact exception types and messages, corrupt and missing FlatIndex
files (every header byte flipped, every truncation), raw ``simcore._C`` calls with
inconsistent arguments, hypothesis properties against the float64 reference,
determinism, resident memory over 10,000 kernel calls, thread safety and GIL release.

Tolerance across thread counts: the selection kernels treat each query row on its
own, so they are bit-identical for any thread count (tested on identical tiles);
torch's float32 GEMM may block differently with the thread count, so end-to-end
scores across thread counts are compared within 1e-6 absolute (cosines are in
[-1, 1]; measured differences are ulps) and indices only away from such near-ties.
"""
import gc
import os
import struct
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import simcore
from simcore import dispatch
from simcore.dispatch import tensor_arg
from simcore.reference.cosine_topk import cosine_topk as reference
from conftest import backend

EXT = dispatch.extension()
I64_MAX = 2**63 - 1
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _qdb(q=4, n=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(n, d, generator=g)


# =========================================================================== public API: bad input
def _bad_cases():
    q, db = _qdb()
    nan_db = db.clone()
    nan_db[13, 2] = float("nan")
    inf_q = q.clone()
    inf_q[2, 0] = float("-inf")
    f = simcore.cosine_topk
    return [
        ("q_list", lambda: f(q.tolist(), db, 3), TypeError, "queries must be a torch.Tensor"),
        ("q_int", lambda: f(q.long(), db, 3), TypeError, "queries must be float32, float16, bfloat16"),
        ("q_complex", lambda: f(q.to(torch.complex64), db, 3), TypeError, "queries must be float32"),
        ("db_int", lambda: f(q, db.int(), 3), TypeError, "database must be float32, float16, bfloat16"),
        ("db_numpy_int", lambda: f(q, np.zeros((10, 8), np.int32), 3), TypeError, "database must be float16/32/64"),
        ("db_str", lambda: f(q, "db.npy", 3), TypeError, "database must be a tensor, a numpy array"),
        ("db_none", lambda: f(q, None, 3), TypeError, "database must be a tensor, a numpy array"),
        ("db_chunk_list", lambda: f(q, [[0.0] * 8], 1), TypeError, "database chunks must be tensors or numpy arrays"),
        ("q_1d", lambda: f(q[0], db, 3), ValueError, r"queries must be 2-D \(Q, D\)"),
        ("q_3d", lambda: f(q[None], db, 3), ValueError, r"queries must be 2-D \(Q, D\)"),
        ("q_empty", lambda: f(q[:0], db, 3), ValueError, "queries must be non-empty"),
        ("q_zero_dim", lambda: f(q[:, :0], db[:, :0], 1), ValueError, "queries must be non-empty"),
        ("db_1d", lambda: f(q, db[0], 3), ValueError, r"database must be 2-D \(N, D\)"),
        ("db_dim", lambda: f(q, db[:, :7], 3), ValueError, "queries have D=8 but database rows have D=7"),
        ("db_empty", lambda: f(q, db[:0], 1), ValueError, "database is empty"),
        ("db_empty_stream", lambda: f(q, iter([]), 1), ValueError, "database is empty"),
        ("db_chunk_dim", lambda: f(q, iter([db, db[:, :7]]), 1, progress=False), ValueError,
         r"database chunk at row 20 must have shape \(n, 8\)"),
        ("db_meta", lambda: f(q, db.to("meta"), 3), ValueError, "database is on meta but queries are on cpu"),
        ("k_zero", lambda: f(q, db, 0), ValueError, "k must be >= 1, got 0"),
        ("k_negative", lambda: f(q, db, -5), ValueError, "k must be >= 1, got -5"),
        ("k_above_n", lambda: f(q, db, 21), ValueError, "k=21 exceeds the number of database rows N=20"),
        ("k_above_stream", lambda: f(q, iter([db[:5], db[5:]]), 21, progress=False), ValueError, "k=21 exceeds"),
        ("k_float", lambda: f(q, db, 2.0), TypeError, "k must be an int, got float"),
        ("k_bool", lambda: f(q, db, True), TypeError, "k must be an int, got bool"),
        ("k_tensor", lambda: f(q, db, torch.tensor(2)), TypeError, "k must be an int, got Tensor"),
        ("db_nan", lambda: f(q, nan_db, 3), ValueError, r"database row 13 contains NaN or Inf"),
        ("db_nan_bf16", lambda: f(q, nan_db.bfloat16(), 3), ValueError, r"database row 13 contains NaN or Inf"),
        ("db_nan_stream", lambda: f(q, iter([db[:17], nan_db[13:14]]), 3, progress=False), ValueError,
         r"database row 17 contains NaN or Inf"),
        ("q_inf", lambda: f(inf_q, db, 3), ValueError, r"queries row 2 contains NaN or Inf"),
        ("exclude_index_range", lambda: f(q, db, 3, exclude=torch.tensor([[0, 20]])), ValueError,
         r"exclude database indices must be in \[0, 20\)"),
        ("exclude_query_range", lambda: f(q, db, 3, exclude=torch.tensor([[4, 0]])), ValueError,
         r"exclude query rows must be in \[0, 4\)"),
        ("exclude_negative", lambda: f(q, db, 3, exclude=torch.tensor([[0, -1]])), ValueError,
         r"exclude database indices must be in"),
        ("exclude_shape", lambda: f(q, db, 3, exclude=torch.tensor([0, 1])), ValueError,
         r"exclude must have shape \(E, 2\)"),
        ("exclude_float", lambda: f(q, db, 3, exclude=torch.tensor([[0.0, 1.0]])), TypeError,
         "exclude must be an integer tensor"),
        ("exclude_word", lambda: f(q, db, 3, exclude="others"), ValueError, "exclude must be None, 'self'"),
        ("exclude_int", lambda: f(q, db, 3, exclude=5), TypeError, "exclude must be None, 'self'"),
        ("block_zero", lambda: f(q, db, 3, block_size=0), ValueError, "block_size must be a positive int"),
        ("block_float", lambda: f(q, db, 3, block_size=2.5), ValueError, "block_size must be a positive int"),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_cosine_topk_rejects_bad_input(case):
    _, call, exc, message = case
    with pytest.raises(exc, match=message):
        call()


def test_reference_backend_rejects_the_same_input():
    with backend("reference"):
        for name, call, exc, message in _BAD:
            with pytest.raises(exc, match=message):
                call()


def test_memmap_with_wrong_shape(tmp_path):
    q = torch.randn(3, 8)
    raw = np.memmap(tmp_path / "db.f32", dtype=np.float32, mode="w+", shape=(100,))
    with pytest.raises(ValueError, match=r"is the memmap's shape right\?"):
        simcore.cosine_topk(q, raw, 3)
    with pytest.raises(ValueError, match="queries have D=8 but database rows have D=10"):
        simcore.cosine_topk(q, raw.reshape(10, 10), 3)


@pytest.mark.parametrize("args,kwargs,exc,message", [
    ((0,), {}, ValueError, "dim must be a positive int"),
    ((True,), {}, ValueError, "dim must be a positive int"),
    ((8.0,), {}, ValueError, "dim must be a positive int"),
    ((8,), dict(dtype=torch.int32), TypeError, "dtype must be float32, float16 or bfloat16"),
    ((8,), dict(dtype=torch.float64), TypeError, "dtype must be float32, float16 or bfloat16"),
    ((8,), dict(metric="l2"), ValueError, "metric must be 'cosine' or 'ip'"),
])
def test_flat_index_constructor_rejects_bad_arguments(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        simcore.FlatIndex(*args, **kwargs)


def test_flat_index_methods_reject_bad_input():
    index = simcore.FlatIndex(8)
    with pytest.raises(ValueError, match="search\\(\\) on an empty FlatIndex"):
        index.search(torch.randn(1, 8), 1)
    with pytest.raises(TypeError, match="add\\(\\) takes a tensor or numpy array, got list"):
        index.add([[0.0] * 8])
    with pytest.raises(ValueError, match=r"add\(\) expects shape \(n, 8\), got \(3, 9\)"):
        index.add(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"add\(\) expects shape \(n, 8\)"):
        index.add(torch.randn(8))
    with pytest.raises(TypeError, match="vectors must be float32"):
        index.add(torch.zeros(2, 8, dtype=torch.int64))
    index.add(torch.randn(100, 8))
    with pytest.raises(ValueError, match="added vector row 102 contains NaN or Inf"):
        index.add(torch.cat([torch.zeros(2, 8), torch.full((1, 8), float("nan"))]))
    assert len(index) == 100  # a rejected add() appends nothing
    with pytest.raises(ValueError, match="k=101 exceeds the number of database rows N=100"):
        index.search(torch.randn(2, 8), 101)
    with pytest.raises(ValueError, match="queries have D=8 but database rows have D=8|queries"):
        index.search(torch.randn(2, 9), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(torch.randn(2, 8), 0)


# --------------------------------------------------------------------------- FlatIndex files
def _index_file(tmp_path, n=5, dim=4, dtype=torch.float32):
    index = simcore.FlatIndex(dim, dtype)
    index.add(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "index.simc"
    index.save(path)
    return index, path, path.read_bytes()


def test_load_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        simcore.FlatIndex.load(tmp_path / "nope.simc")
    with pytest.raises(IsADirectoryError):
        simcore.FlatIndex.load(tmp_path)


def test_load_every_truncation_is_rejected(tmp_path):
    _, _, raw = _index_file(tmp_path)
    bad = tmp_path / "bad.simc"
    for length in range(len(raw)):  # every prefix, the empty file included
        bad.write_bytes(raw[:length])
        with pytest.raises(ValueError, match="bad.simc: (not a simcore FlatIndex file|truncated)"):
            simcore.FlatIndex.load(bad)
    bad.write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="truncated or padded FlatIndex file"):
        simcore.FlatIndex.load(bad)


def test_load_every_flipped_bit_is_rejected(tmp_path):
    """One bit flipped anywhere (header fields, both CRCs, payload): ValueError, never a wrong index."""
    _, _, raw = _index_file(tmp_path, n=3, dim=2)
    bad = tmp_path / "flip.simc"
    for pos in range(len(raw)):
        for bit in (0, 7):
            data = bytearray(raw)
            data[pos] ^= 1 << bit
            bad.write_bytes(bytes(data))
            with pytest.raises(ValueError, match="flip.simc: "):
                simcore.FlatIndex.load(bad)


def _forged(fields, payload=b""):
    """A header with valid checksums around arbitrary field values."""
    head = struct.pack("<8sIIIIQQI", *fields[:7], zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


@pytest.mark.parametrize("fields,message", [
    ((b"SIMCFLAT", 2, 0, 0, 0, 4, 0), "unsupported FlatIndex format version 2"),
    ((b"SIMCFLAT", 1, 9, 0, 0, 4, 0), "corrupt FlatIndex header"),
    ((b"SIMCFLAT", 1, 0, 5, 0, 4, 0), "corrupt FlatIndex header"),
    ((b"SIMCFLAT", 1, 0, 0, 0, 0, 0), "corrupt FlatIndex header"),
    ((b"SIMCFLAT", 1, 0, 0, 0, 4, 2**62), "truncated or padded FlatIndex file"),  # n*dim*4 far beyond the file
    ((b"SIMCFLAT", 1, 0, 0, 0, 2**63, 2**63), "truncated or padded FlatIndex file"),
    ((b"NOTSIMCF", 1, 0, 0, 0, 4, 0), "bad magic"),
])
def test_load_forged_headers_with_valid_checksums(tmp_path, fields, message):
    bad = tmp_path / "forged.simc"
    bad.write_bytes(_forged(fields))
    with pytest.raises(ValueError, match=message):
        simcore.FlatIndex.load(bad)


def test_load_round_trip_of_an_empty_index(tmp_path):
    index = simcore.FlatIndex(6, torch.bfloat16, metric="ip")
    index.save(tmp_path / "e.simc")
    back = simcore.FlatIndex.load(tmp_path / "e.simc")
    assert len(back) == 0 and back.dim == 6 and back.dtype == torch.bfloat16 and back.metric == "ip"


# --------------------------------------------------------------------------- faiss_index
def test_faiss_index_rejects_bad_input():
    db = torch.randn(50, 8)
    with pytest.raises(ValueError, match="metric must be 'cosine' or 'ip'"):
        simcore.faiss_index(db, "Flat", metric="l2")
    with pytest.raises(ValueError, match="faiss_index: no data"):
        simcore.faiss_index([], "Flat")
    with pytest.raises(ValueError, match=r"data must be \(N, D\) with N > 0"):
        simcore.faiss_index(db[:0], "Flat")
    with pytest.raises(ValueError, match=r"data must be \(N, D\) with N > 0"):
        simcore.faiss_index(db[0], "Flat")
    with pytest.raises(TypeError, match="vectors must be floating point"):
        simcore.faiss_index(db.long(), "Flat")
    bad = db.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="vectors contain NaN or Inf"):
        simcore.faiss_index(bad, "Flat")
    index = simcore.faiss_index(db, "Flat")
    with pytest.raises(ValueError, match=r"expected shape \(n, 8\)"):
        index.search(torch.randn(2, 7), 3)
    with pytest.raises(ValueError, match="k=51 exceeds the number of indexed vectors N=50"):
        index.search(torch.randn(2, 8), 51)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(torch.randn(2, 8), 1.5)


# =========================================================================== raw kernels
class _Raw:
    def __init__(self, Q=4, nb=16, D=8, k=2):
        self.Q, self.nb, self.D, self.k = Q, nb, D, k
        cap = k + EXT.COSINE_TOPK_MIN_SLACK
        self.t = dict(scores=torch.rand(Q, nb), scale=torch.ones(nb), slack=torch.zeros(nb),
                      queries=F.normalize(torch.randn(Q, D), dim=1), query_slack=torch.ones(Q),
                      block=torch.randn(nb, D), exclude_offsets=torch.zeros(Q + 1, dtype=torch.int64),
                      exclude_index=torch.zeros(0, dtype=torch.int64),
                      reservoir=torch.zeros(Q, cap, 2, dtype=torch.int64), count=torch.zeros(Q, dtype=torch.int64),
                      threshold=torch.full((Q,), float("-inf")))
        self.i = dict(q_begin=0, db_base=0, k=k, n_total=-1, rescore=False, num_threads=1)
        self.p = dict(block=torch.randn(nb, D), scale=torch.empty(nb), slack=torch.empty(nb),
                      status=torch.full((1,), I64_MAX, dtype=torch.int64))
        self.pi = dict(row_base=0, cosine=True, slack_factor=0.0, num_threads=1)

    def update(self, **over):
        t = {**self.t, **{n: v for n, v in over.items() if n in self.t}}
        i = {**self.i, **{n: v for n, v in over.items() if n in self.i}}
        self.keep = t
        EXT.cosine_topk_update(*[tensor_arg(t[n]) for n in self.t], *i.values())

    def prepare(self, **over):
        t = {**self.p, **{n: v for n, v in over.items() if n in self.p}}
        i = {**self.pi, **{n: v for n, v in over.items() if n in self.pi}}
        self.keep = t
        EXT.cosine_topk_prepare_block(*[tensor_arg(t[n]) for n in self.p], *i.values())


_RAW = [
    ("u_scores_f64", dict(scores=torch.zeros(4, 16, dtype=torch.float64)), TypeError, "scores must be float32"),
    ("u_scores_1d", dict(scores=torch.zeros(64)), ValueError, "scores must have 2 dimension"),
    ("u_scores_colmajor", dict(scores=torch.zeros(16, 4).t()), ValueError, "scores must have unit stride"),
    ("u_scale_len", dict(scale=torch.ones(15)), ValueError, "scale must have size 16"),
    ("u_reservoir_2d", dict(reservoir=torch.zeros(4, 516, dtype=torch.int64)), ValueError,
     "reservoir must have 3 dimension"),
    ("u_reservoir_f32", dict(reservoir=torch.zeros(4, 258, 2)), TypeError, "reservoir must be int64"),
    ("u_count_len", dict(count=torch.zeros(3, dtype=torch.int64)), ValueError, "count must have size 4"),
    ("u_count_negative", dict(count=torch.tensor([0, -1, 0, 0])), ValueError, "reservoir count of query 1"),
    ("u_count_over_cap", dict(count=torch.full((4,), 10**9)), ValueError, "reservoir count of query 0"),
    ("u_threshold_f64", dict(threshold=torch.zeros(4, dtype=torch.float64)), TypeError, "threshold must be float32"),
    ("u_q_begin", dict(q_begin=1), ValueError, r"query rows \[1, 5\) are outside the 4 reservoirs"),
    ("u_q_begin_neg", dict(q_begin=-1), ValueError, "outside the 4 reservoirs"),
    ("u_db_base_neg", dict(db_base=-3), ValueError, "db_base must be >= 0"),
    ("u_k_zero", dict(k=0), ValueError, "k must be in"),
    ("u_k_cap", dict(k=258), ValueError, "k must be in"),
    ("u_n_total", dict(n_total=10), ValueError, "exceed the database size 10"),
    ("u_excl_offsets_len", dict(exclude_offsets=torch.zeros(4, dtype=torch.int64)), ValueError,
     "exclude_offsets must have size 5"),
    ("u_excl_offsets_end", dict(exclude_offsets=torch.tensor([0, 0, 0, 0, 9]), exclude_index=torch.tensor([5, 3])),
     ValueError, "exclude offsets must start at 0 and end at 2"),
    ("u_excl_offsets_order", dict(exclude_offsets=torch.tensor([0, 3, 2, 2, 2]), exclude_index=torch.tensor([5, 3])),
     ValueError, "exclude offsets must be non-decreasing"),
    ("u_excl_offsets_huge", dict(exclude_offsets=torch.tensor([0, I64_MAX, 2, 2, 2]),
                                 exclude_index=torch.tensor([5, 3])), ValueError, "exclude offsets must be"),
    ("u_excl_unsorted", dict(exclude_offsets=torch.tensor([0, 2, 2, 2, 2]), exclude_index=torch.tensor([5, 3])),
     ValueError, "exclude indices must be sorted"),
    ("u_excl_index_int32", dict(exclude_index=torch.zeros(0, dtype=torch.int32)), TypeError,
     "exclude_index must be int64"),
    ("u_rescore_block_dim", dict(rescore=True, block=torch.zeros(16, 9)), ValueError, "block must have size 8"),
    ("u_rescore_block_rows", dict(rescore=True, block=torch.zeros(15, 8)), ValueError, "block must have size 16"),
    ("u_rescore_queries_f16", dict(rescore=True, queries=torch.zeros(4, 8, dtype=torch.float16)), TypeError,
     "queries must be float32"),
    ("u_rescore_norms_len", dict(rescore=True, query_slack=torch.ones(3)), ValueError, "query_slack must have size 4"),
    ("u_rescore_block_int", dict(rescore=True, block=torch.zeros(16, 8, dtype=torch.int64)), TypeError,
     "database block must be float32"),
]


@pytest.mark.parametrize("case", _RAW, ids=[c[0] for c in _RAW])
def test_raw_update_rejects_inconsistent_arguments(case):
    _, over, exc, message = case
    r = _Raw()
    with pytest.raises(exc, match=message):
        r.update(**over)


def test_raw_update_accepts_the_valid_arguments():
    r = _Raw()
    r.update()
    assert (r.t["count"] >= r.k).all()
    r.update(rescore=True)


@pytest.mark.parametrize("over,exc,message", [
    (dict(block=torch.zeros(16, 8, dtype=torch.float64)), TypeError, "database block must be float32"),
    (dict(block=torch.zeros(8, 16).t()), ValueError, "block must have unit stride"),
    (dict(scale=torch.empty(15)), ValueError, "scale must have size 16"),
    (dict(slack=torch.empty(16, dtype=torch.float16)), TypeError, "slack must be float32"),
    (dict(status=torch.zeros(2, dtype=torch.int64)), ValueError, "status must have size 1"),
    (dict(row_base=-1), ValueError, "row_base must be >= 0"),
    (dict(slack_factor=float("nan")), ValueError, "slack_factor must be finite and >= 0"),
    (dict(slack_factor=-1.0), ValueError, "slack_factor must be finite and >= 0"),
])
def test_raw_prepare_rejects_inconsistent_arguments(over, exc, message):
    with pytest.raises(exc, match=message):
        _Raw().prepare(**over)


def test_raw_prepare_rejects_bad_conversion_buffers():
    nb, D = 16, 8
    block = torch.randn(nb, D)
    outs = dict(scale=torch.empty(nb), slack=torch.empty(nb), status=torch.full((1,), I64_MAX, dtype=torch.int64))

    def call(converted, blk=block):
        EXT.cosine_topk_prepare_block(tensor_arg(blk), *[tensor_arg(t) for t in outs.values()], 0, True, 0.01, 1, 0,
                                      tensor_arg(converted))
    with pytest.raises(TypeError, match="converted must be bfloat16"):
        call(torch.empty(nb, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="converted must have size 16"):
        call(torch.empty(nb - 1, D, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="converted must have size 8"):
        call(torch.empty(nb, D + 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="converted must be contiguous"):
        call(torch.empty(D, nb, dtype=torch.bfloat16).t())
    with pytest.raises(TypeError, match="needs no conversion"):
        call(torch.empty(nb, D, dtype=torch.bfloat16), blk=block.bfloat16())
    shared = torch.randn(2 * nb, D).view(-1).view(torch.bfloat16)  # block = its first nb float32 rows
    for start in (0, nb * D * 2 - 8):  # the same bytes; the last 16 bytes of the block
        with pytest.raises(ValueError, match="must not overlap"):
            call(shared[start:start + nb * D].view(nb, D), blk=shared.view(torch.float32).view(2 * nb, D)[:nb])
    call(shared[nb * D * 2:nb * D * 3].view(nb, D), blk=shared.view(torch.float32).view(2 * nb, D)[:nb])  # adjacent
    good = torch.empty(nb, D, dtype=torch.bfloat16)
    call(good)
    assert torch.equal(good.view(torch.int16), block.bfloat16().view(torch.int16))


@pytest.mark.parametrize("rel", [-0.1, 1.0, float("nan"), float("inf")])
def test_raw_update_rejects_bad_slack_rel(rel):
    r = _Raw()
    t = r.t
    with pytest.raises(ValueError, match="slack_rel must be in"):
        EXT.cosine_topk_update(*[tensor_arg(t[n]) for n in t], 0, 0, r.k, -1, True, 1, 0, rel)


@pytest.mark.parametrize("over", [dict(q_begin=I64_MAX)], ids=["q_begin_int64_max"])
def test_raw_update_huge_query_offset_cannot_reach_memory(over):
    """q_begin + rows overflowed int64 in the range check (then count[q] was read far out of bounds).
    Run in a child process so that a crash is a failure, not the end of the test run."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch\n"
        "import test_reliability_topk as t\n"
        "try:\n"
        f"    t._Raw().update(**{over!r})\n"
        "    print('accepted')\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(simcore.__file__)))
    res = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, f"crashed (code {res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.startswith("ValueError"), res.stdout


def test_raw_update_with_garbage_reservoir_scores():
    """A full reservoir holding NaN/Inf scores and arbitrary indices (state Python should never
    produce): the compaction must stay inside the reservoir (ASan-checked under .ci/sanitize)."""
    for fill in (float("nan"), float("inf"), float("-inf")):
        r = _Raw(Q=3, nb=64, k=5)
        res = r.t["reservoir"]
        cap = res.shape[1]
        sc = res.view(torch.float32).view(3, cap, 4)
        sc[:, :, 0] = torch.rand(3, cap)
        sc[:, ::3, 0] = fill
        res[:, :, 1] = torch.randint(-2**62, 2**62, (3, cap))
        r.t["count"].fill_(cap)
        r.t["scores"] = torch.rand(3, 64) + 1.0  # beats everything: forces compactions
        r.update()
        assert ((r.t["count"] >= 0) & (r.t["count"] <= cap)).all()


# =========================================================================== properties (hypothesis)
def _check(scores, index, q, db, k, normalized, exclude_pairs, tol):
    """Shapes, descending order, no duplicate, each score is its index's true score, and the
    scores are the reference's k best (ties within tol may pick different indices)."""
    Q = q.shape[0]
    assert scores.shape == (Q, k) and index.shape == (Q, k)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    qd, dd = q.double(), db.double()
    if not normalized:
        qd, dd = F.normalize(qd, dim=1), F.normalize(dd, dim=1)
    full = qd @ dd.T
    if exclude_pairs is not None and len(exclude_pairs):
        full[exclude_pairs[:, 0], exclude_pairs[:, 1]] = float("-inf")
    ref_s, ref_i = reference(q.double(), db.double(), k, normalized=normalized, exclude=exclude_pairs)
    valid = index >= 0
    assert torch.equal(valid, ref_i >= 0)
    assert (scores[~valid] == float("-inf")).all()
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    if valid.any():
        got = full.gather(1, index.clamp_min(0))
        assert (got[valid] - scores[valid].double()).abs().max() <= tol
        assert (ref_s[valid].double() - scores[valid].double()).abs().max() <= tol
    for row in index:
        r = row[row >= 0]
        assert r.unique().numel() == r.numel()


@settings(max_examples=70, **SETTINGS)
@given(data=st.data())
def test_cosine_topk_matches_reference(data):
    draw = data.draw
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    Q, N, D = draw(st.integers(1, 12), label="Q"), draw(st.integers(1, 400), label="N"), draw(st.integers(1, 48),
                                                                                                 label="D")
    k = draw(st.one_of(st.just(1), st.just(N), st.integers(1, N)), label="k")
    qdt = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), label="q dtype")
    ddt = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="db dtype")
    normalized = draw(st.booleans(), label="normalized")
    q = torch.randn(Q, D, generator=g).to(qdt)
    db = (torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 3).to(ddt)
    if draw(st.booleans(), label="duplicate rows"):
        db[N // 2:] = db[: N - N // 2].clone()  # exact ties
    if draw(st.booleans(), label="q transposed"):
        q = q.t().contiguous().t()
    layout = draw(st.sampled_from(["contiguous", "strided rows", "column-major", "chunks"]), label="db layout")
    database = db
    if layout == "strided rows":
        big = torch.zeros(2 * N, D, dtype=ddt)
        big[::2] = db
        database = big[::2]
    elif layout == "column-major":
        database = db.t().contiguous().t()
    elif layout == "chunks":
        cuts = sorted(draw(st.lists(st.integers(0, N), max_size=4), label="cuts"))
        bounds = [0] + cuts + [N]
        database = iter([db[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    ex_kind = draw(st.sampled_from([None, "self", "pairs"]), label="exclude")
    exclude, pairs = None, None
    if ex_kind == "self":
        exclude = "self"
        m = min(Q, N)
        pairs = torch.stack([torch.arange(m), torch.arange(m)], 1)
    elif ex_kind == "pairs":
        E = draw(st.integers(1, 3 * Q))  # E = 0: test_empty_exclude_tensor
        pairs = torch.stack([torch.randint(Q, (E,), generator=g), torch.randint(N, (E,), generator=g)], 1)
        exclude = pairs
    block = draw(st.sampled_from([None, 1, 7, 64]), label="block_size")
    with simcore.search.fp32_via_bf16(draw(st.sampled_from([None, True]), label="fp32 via bf16 (cosine)")):
        s, i = simcore.cosine_topk(q, database, k, normalized=normalized, exclude=exclude, block_size=block,
                                   progress=False)
    qf = q.float()
    dbf = db.float()
    scale = 1.0 if not normalized else float(qf.norm(dim=1).max() * dbf.norm(dim=1).max())
    # float32 accumulation; half queries are searched in float32 from their half values
    _check(s, i, qf, dbf, k, normalized, pairs, 2e-5 * max(scale, 1.0) * max(1.0, D / 16))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_flat_index_save_load_round_trip(data, tmp_path_factory):
    draw = data.draw
    dim, n = draw(st.integers(1, 16)), draw(st.integers(0, 50))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    metric = draw(st.sampled_from(["cosine", "ip"]))
    index = simcore.FlatIndex(dim, dtype, metric=metric)
    if n:
        index.add(torch.randn(n, dim) * 100)
    path = tmp_path_factory.mktemp("fi") / "x.simc"
    index.save(path)
    back = simcore.FlatIndex.load(path)
    assert (back.dim, back.dtype, back.metric, len(back)) == (dim, dtype, metric, n)
    assert torch.equal(back.vectors.view(torch.uint8) if n else back.vectors, index.vectors.view(torch.uint8)
                       if n else index.vectors)
    if n:
        k = draw(st.integers(1, n))
        q = torch.randn(3, dim)
        a, b = index.search(q, k), back.search(q, k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# =========================================================================== determinism
def test_bit_identical_across_runs(seed):
    g = torch.Generator().manual_seed(seed)
    q, db = torch.randn(50, 32, generator=g), torch.randn(3000, 32, generator=g)
    a = simcore.cosine_topk(q, db, 20, block_size=500)
    b = simcore.cosine_topk(q, db, 20, block_size=500)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_thread_counts(seed):
    g = torch.Generator().manual_seed(seed)
    q, db = torch.randn(64, 48, generator=g), torch.randn(20000, 48, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = simcore.cosine_topk(q, db, 50)
        torch.set_num_threads(2)
        b = simcore.cosine_topk(q, db, 50)
    finally:
        torch.set_num_threads(old)
    assert (a[0] - b[0]).abs().max() <= 1e-6
    gap = (a[0][:, :-1] - a[0][:, 1:]).abs()
    clear = torch.ones_like(a[1], dtype=torch.bool)
    clear[:, :-1] &= gap > 2e-6
    clear[:, 1:] &= gap > 2e-6
    clear[:, -1] = False  # the k-th may be swapped with the (k+1)-th
    assert torch.equal(a[1][clear], b[1][clear])


def test_update_kernel_bit_identical_across_thread_counts(seed):
    """Same tile, 1 vs 2 vs 3 threads (tiles of >= 2M scores per thread are split)."""
    g = torch.Generator().manual_seed(seed)
    Q, nb, k = 1024, 8192, 10
    tile = torch.randn(Q, nb, generator=g)
    scale = torch.rand(nb, generator=g) + 0.5
    out = {}
    for threads in (1, 2, 3):
        r = _Raw(Q=Q, nb=nb, k=k)
        r.t.update(scores=tile, scale=scale, slack=torch.zeros(nb))
        r.i["num_threads"] = threads
        r.update()
        out[threads] = (r.t["reservoir"].clone(), r.t["count"].clone(), r.t["threshold"].clone())
    for t in (2, 3):
        for u, v in zip(out[1], out[t]):
            assert torch.equal(u, v)


# =========================================================================== leaks
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine keeps freed memory resident; ASan checks accesses there")
@pytest.mark.parametrize("name", ["prepare", "update", "update_rescore", "error_path"])
def test_no_leak_over_10000_kernel_calls(name):
    r = _Raw()

    def call():
        if name == "prepare":
            r.prepare()
        elif name == "update":
            r.t["count"].zero_()
            r.update()
        elif name == "update_rescore":
            r.t["count"].zero_()
            r.update(rescore=True)
        else:
            try:
                r.update(q_begin=1)
            except ValueError:
                pass

    for _ in range(1000):
        call()
    gc.collect()
    r0 = _rss_bytes()
    for _ in range(10_000):
        call()
    gc.collect()
    grown = _rss_bytes() - r0
    assert grown <= 1 << 20, f"resident memory grew by {grown} bytes over 10,000 calls"


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine keeps freed memory resident")
def test_no_leak_public_search():
    q, db = _qdb(8, 500, 32)
    index = simcore.FlatIndex(32)
    index.add(db)
    for _ in range(50):
        simcore.cosine_topk(q, db, 10)
        index.search(q, 5)
    gc.collect()
    r0 = _rss_bytes()
    for _ in range(200):
        simcore.cosine_topk(q, db, 10)
        index.search(q, 5)
    gc.collect()
    # 2 MiB over 400 searches: >= 5 KB per search fails (each allocates a reservoir and tiles)
    assert _rss_bytes() - r0 <= 2 << 20


# =========================================================================== threads
def test_concurrent_searches_match_sequential():
    data = [_qdb(16, 3000, 32, seed=s) for s in range(6)]
    seq = [simcore.cosine_topk(q, db, 25, block_size=700) for q, db in data]
    results, errors = {}, []

    def runner(tid):
        try:
            for rep in range(5):
                for i in range(tid % 3, 6, 3):
                    q, db = data[i]
                    results[(tid, rep, i)] = simcore.cosine_topk(q, db, 25, block_size=700)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=runner, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 * 5 * 2
    for (tid, rep, i), (s, ix) in results.items():
        assert torch.equal(s, seq[i][0]) and torch.equal(ix, seq[i][1])


@pytest.mark.parametrize("kernel", ["prepare", "update"])
def test_bindings_release_the_gil(kernel):
    """As in test_reliability_margin: with a huge switch interval the main thread runs during
    a kernel call only if the binding released the GIL."""
    if kernel == "prepare":
        r = _Raw(Q=1, nb=1 << 21, D=32)
        r.p.update(block=torch.randn(1 << 21, 32), scale=torch.empty(1 << 21), slack=torch.empty(1 << 21))
        call = lambda: r.prepare(num_threads=1)  # noqa: E731
    else:
        r = _Raw(Q=2048, nb=4096)
        r.t.update(scores=torch.rand(2048, 4096), scale=torch.ones(4096), slack=torch.zeros(4096))

        def call():
            r.t["count"].zero_()
            r.t["threshold"].fill_(float("-inf"))
            r.update()
    call()
    entered, done, progress = threading.Event(), [False], [0]

    def worker():
        entered.set()
        for _ in range(50):
            call()
            if progress[0]:
                break
        done[0] = True

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        entered.wait()
        while not done[0]:
            progress[0] += 1
            os.sched_yield()
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert progress[0] > 0, f"{kernel} held the GIL for the whole call"


# =========================================================================== numerics
def test_empty_exclude_tensor():
    q, db = _qdb()
    a = simcore.cosine_topk(q, db, 3, exclude=torch.empty(0, 2, dtype=torch.int64))
    b = simcore.cosine_topk(q, db, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_float16_extremes():
    """The largest finite float16 values in queries and database: finite, correct scores."""
    big = torch.finfo(torch.float16).max
    g = torch.Generator().manual_seed(0)
    db = torch.randn(300, 16, generator=g).sign().half() * big
    db[::7] = torch.finfo(torch.float16).tiny
    q = torch.randn(5, 16, generator=g).sign().half() * big
    s, i = simcore.cosine_topk(q, db, 10)
    assert torch.isfinite(s).all()
    _check(s, i, q.double(), db.double(), 10, False, None, 1e-5)


def test_queries_with_a_float32_norm_overflow():
    q = torch.tensor([[1e20, 2e20, 0.0]])
    db = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    s, i = simcore.cosine_topk(q, db, 3)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0, -1 / 5 ** 0.5]]), atol=1e-6) and i.tolist() == [[0, 1, 2]]


def test_bfloat16_database_rows_beyond_float32_norm():
    # float32 dot products with such a row overflow before the 1/norm scale: refused, never scored inf.
    db = torch.tensor([[0.0, 0.0, 0.0, 1.0], [3e38, 3e38, 3e38, 3e38]]).bfloat16()
    with pytest.raises(ValueError, match="database row 1 .*norm above 1e38"):
        simcore.cosine_topk(torch.ones(1, 4), db, 2)
