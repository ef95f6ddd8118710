"""The ``simcore`` command line, run as ``python -m simcore.isc.cli`` in a subprocess on tiny files."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

import h5py



def run(*args, cwd):
    """The real command: ``python -m simcore.isc.cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "simcore.isc.cli", *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_inproc(capsys, monkeypatch):
    """The same entry point, ``simcore.isc.cli.main``, in-process (each subprocess pays torch's import time)."""
    from simcore.isc.cli import main

    def go(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return go


@pytest.fixture
def files(tmp_path):
    """References R0..R9, queries: Q0..Q5 noisy copies of R0..R5, Q6..Q9 unrelated; a training set."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 16)).astype(np.float32)
    q = np.concatenate([ref[:6] + 0.05 * rng.standard_normal((6, 16)), rng.standard_normal((4, 16))]).astype(np.float32)
    train = rng.standard_normal((40, 16)).astype(np.float32)
    qids, rids = [f"Q{i}" for i in range(10)], [f"R{i}" for i in range(10)]
    with h5py.File(tmp_path / "desc.h5", "w") as f:
        f["query"], f["reference"] = q, ref
        f.create_dataset("query_ids", data=np.array(qids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("reference_ids", data=np.array(rids, dtype=object), dtype=h5py.string_dtype())
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "r.npy", ref)
    np.save(tmp_path / "train.npy", train)
    with open(tmp_path / "gt.csv", "w") as f:
        f.write("query_id,reference_id\n")
        for i in range(10):
            f.write(f"Q{i},{f'R{i}' if i < 6 else ''}\n")
    return tmp_path


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_match_then_eval_hdf5(files):
    r = run("match", "desc.h5", "-o", "pred.csv", "--k", "3", "--json", cwd=files)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["predictions"] == 30 and summary["metric"] == "ip"
    rows = read_csv(files / "pred.csv")
    assert rows[0] == ["query_id", "reference_id", "score"] and len(rows) == 31
    scores = [float(s) for _, _, s in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    # The copies are everyone's best matches, far above the rest: a perfect µAP.
    assert {tuple(x[:2]) for x in rows[1:7]} == {(f"Q{i}", f"R{i}") for i in range(6)}
    e = run("eval", "pred.csv", "gt.csv", cwd=files)
    assert e.returncode == 0, e.stderr
    assert "micro_ap: 1.0000" in e.stdout.splitlines()
    assert "recall_at_p90: 1.0000" in e.stdout.splitlines()
    j = run("eval", "pred.csv", "gt.csv", "--json", "--plot", "pr.png", cwd=files)
    assert j.returncode == 0, j.stderr
    d = json.loads(j.stdout)
    assert d["micro_ap"] == pytest.approx(1.0) and d["num_ground_truth"] == 6 and d["num_predictions"] == 30
    assert (files / "pr.png").read_bytes()[:4] == b"\x89PNG"


def test_match_npy_with_cap_and_normalisations(files, run_inproc):
    run = run_inproc
    r = run("match", "--query", "q.npy", "--reference", "r.npy", "--max-results", "7", "-o", "p.csv", cwd=files)
    assert r.returncode == 0, r.stderr
    rows = read_csv(files / "p.csv")[1:]
    assert len(rows) == 7 and rows[0][0].isdigit()          # .npy ids are row numbers
    for norm in ["score", "negative", "shift"]:
        r = run("match", "desc.h5", "--train", "train.npy", "--normalize", norm, "--neighbors", "5",
                "-o", f"{norm}.csv", "--json", cwd=files)
        assert r.returncode == 0, (norm, r.stderr)
        assert json.loads(r.stdout)["metric"] == ("l2" if norm == "shift" else "ip")
        e = run("eval", f"{norm}.csv", "gt.csv", "--json", cwd=files)
        assert e.returncode == 0 and json.loads(e.stdout)["recall_at_rank1"] == 1.0, (norm, e.stdout, e.stderr)
    r = run("match", "desc.h5", "--train", "train.npy", "--pca", "8", "-o", "pca.csv", cwd=files)
    assert r.returncode == 0, r.stderr


def test_match_dba_smooths_the_training_set_once(files, run_inproc):
    import torch
    from simcore.isc import descriptors as D
    from simcore.isc.metrics import read_predictions

    r = run_inproc("match", "desc.h5", "--train", "train.npy", "--normalize", "negative", "--dba", "--beta", "0.9",
                   "--k", "10", "-o", "dba.csv", "--json", cwd=files)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dba"] is True
    with h5py.File(files / "desc.h5", "r") as f:
        q, ref = torch.from_numpy(f["query"][()]), torch.from_numpy(f["reference"][()])
    t = D.database_side_augmentation(torch.from_numpy(np.load(files / "train.npy")))
    m = D.match(D.negative_embedding_subtraction(q, t, beta=0.9), D.negative_embedding_subtraction(ref, t, beta=0.9))
    expected = m.to_triples([f"Q{i}" for i in range(10)], [f"R{i}" for i in range(10)])
    got = read_predictions(files / "dba.csv")
    assert [x[:2] for x in got] == [x[:2] for x in expected]
    np.testing.assert_allclose([x[2] for x in got], [x[2] for x in expected], rtol=1e-6, atol=1e-6)
    r = run_inproc("match", "desc.h5", "--train", "train.npy", "--normalize", "negative", "--beta", "0.9",
                   "--k", "10", "-o", "plain.csv", cwd=files)
    assert r.returncode == 0, r.stderr
    plain = read_predictions(files / "plain.csv")
    assert not np.allclose([x[2] for x in plain], [x[2] for x in got])     # the smoothing changes the scores


@pytest.mark.parametrize("setup,args,message", [
    (None, ["match", "missing.h5"], "missing.h5: no such file"),
    ("nodata", ["match", "bad.h5"], "bad.h5: no dataset 'query'"),
    ("text", ["match", "--query", "q.txt", "--reference", "r.npy"], "q.txt: unknown descriptor format"),
    ("nan", ["match", "--query", "nan.npy", "--reference", "r.npy"], "nan.npy: query descriptors contain NaN"),
    ("1d", ["match", "--query", "v.npy", "--reference", "r.npy"], "v.npy: query descriptors must be a 2-D array"),
    ("dims", ["match", "--query", "q.npy", "--reference", "r8.npy"], "r8.npy: reference descriptors have 8 dims"),
    (None, ["match", "desc.h5", "--normalize", "score"], "need --train"),
    (None, ["match", "desc.h5", "--train", "train.npy", "--normalize", "score", "--dba"],
     "--dba smooths the training set for --normalize negative only"),
    ("train5", ["match", "desc.h5", "--train", "t5.npy", "--normalize", "negative", "--neighbors", "3", "--dba"],
     "t5.npy: --dba: asked for 10 training neighbours but the training set has 5 rows"),
    (None, ["eval", "nope.csv", "gt.csv"], "nope.csv: no such file"),
    ("badpred", ["eval", "badpred.csv", "gt.csv"], "badpred.csv: line 3: score 'x' is not a number"),
    ("dup", ["eval", "dup.csv", "gt.csv"], "dup.csv: duplicate prediction for the pair (query 'Q1', reference 'R1')"),
    ("badgt", ["eval", "dup.csv", "badgt.csv"], "badgt.csv: line 2: expected 2 columns"),
])
def test_errors_are_one_line_with_exit_code_2(files, setup, args, message, run_inproc):
    if setup == "nodata":
        with h5py.File(files / "bad.h5", "w") as f:
            f["something"] = np.zeros((2, 2), np.float32)
    elif setup == "text":
        (files / "q.txt").write_text("1 2 3\n")
    elif setup == "nan":
        a = np.ones((3, 16), np.float32)
        a[1, 2] = np.nan
        np.save(files / "nan.npy", a)
    elif setup == "1d":
        np.save(files / "v.npy", np.ones(16, np.float32))
    elif setup == "train5":
        np.save(files / "t5.npy", np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    elif setup == "dims":
        np.save(files / "r8.npy", np.ones((3, 8), np.float32))
    elif setup == "badpred":
        (files / "badpred.csv").write_text("query_id,reference_id,score\nQ1,R1,0.5\nQ2,R2,x\n")
    elif setup in ("dup", "badgt"):
        (files / "dup.csv").write_text("Q1,R1,0.5\nQ1,R1,0.4\n")
        (files / "badgt.csv").write_text("query_id,reference_id\nQ1,R1,R2\n")
    r = run_inproc(*args, cwd=files)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0], lines[0]


GARBAGE = bytes(range(256)) * 64          # neither UTF-8 text, nor .npy, nor HDF5


def write_unreadable_inputs(d):
    """Binary and garbage files in the places where each reader expects something else."""
    for name in ("garbage.bin", "garbage.npy", "garbage.h5"):
        (d / name).write_bytes(GARBAGE)
    (d / "ok.csv").write_text("Q1,R1,0.5\n")
    (d / "hugefield.csv").write_text("x" * 200_000 + "\n")             # past the csv module's field limit
    with h5py.File(d / "badids.h5", "w") as f:
        f["query"], f["reference"] = np.ones((2, 16), np.float32), np.ones((2, 16), np.float32)
        f["query_ids"], f["reference_ids"] = np.array([b"\xff\xfe", b"q"]), np.array([b"a", b"b"])
    with h5py.File(d / "group.h5", "w") as f:
        f.create_group("query")
    with h5py.File(d / "corrupt.h5", "w") as f:
        f.create_dataset("query", data=np.ones((64, 16), np.float32), chunks=(64, 16), compression="gzip")
        chunk = f["query"].id.get_chunk_info(0)
    raw = bytearray((d / "corrupt.h5").read_bytes())
    raw[chunk.byte_offset:chunk.byte_offset + chunk.size] = b"\x55" * chunk.size   # no longer a zlib stream
    (d / "corrupt.h5").write_bytes(bytes(raw))


@pytest.mark.parametrize("args,message", [
    (["eval", "desc.h5", "gt.csv"], "desc.h5: not a UTF-8 text file"),              # an HDF5 file as predictions
    (["eval", "garbage.bin", "gt.csv"], "garbage.bin: not a UTF-8 text file"),
    (["eval", "ok.csv", "q.npy"], "q.npy: not a UTF-8 text file"),                  # a .npy as ground truth
    (["eval", "hugefield.csv", "gt.csv"], "hugefield.csv: line 1: not a CSV"),
    (["eval", "ok.csv", "hugefield.csv"], "hugefield.csv: line 1: not a CSV"),
    (["match", "--query", "garbage.npy", "--reference", "r.npy"], "garbage.npy: not a readable .npy array"),
    (["match", "garbage.h5"], "garbage.h5: not a readable HDF5 file"),
    (["match", "--query", "q.npy", "--reference", "garbage.h5"], "garbage.h5: not a readable HDF5 file"),
    (["match", "desc.h5", "--train", "garbage.npy", "--normalize", "negative"], "garbage.npy: not a readable"),
    (["match", "--query", "q.npy", "--reference", "r.npy", "--query-ids", "desc.h5"],
     "desc.h5: not a UTF-8 text file of query ids"),
    (["match", "--query", "q.npy", "--reference", "r.npy", "--reference-ids", "garbage.bin"],
     "garbage.bin: not a UTF-8 text file of reference ids"),
    (["match", "badids.h5"], "badids.h5: dataset 'query_ids' holds ids that are not UTF-8 text"),
    (["match", "--query", "group.h5", "--reference", "r.npy"], "group.h5: 'query' is an HDF5 group, not a dataset"),
    (["match", "--query", "corrupt.h5", "--reference", "r.npy"], "corrupt.h5: cannot read dataset 'query'"),
])
def test_binary_and_garbage_inputs_are_one_line_errors(files, args, message, run_inproc):
    write_unreadable_inputs(files)
    r = run_inproc(*args, cwd=files)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0], lines[0]


def test_errors_in_a_subprocess(files):
    r = run("eval", "nope.csv", "gt.csv", cwd=files)
    assert r.returncode == 2 and r.stderr.strip() == "simcore eval: error: nope.csv: no such file"
    r = run("match", "--query", "q.npy", "--reference", "missing.npy", cwd=files)
    assert r.returncode == 2 and r.stderr.strip() == "simcore match: error: --reference missing.npy: no such file"
    r = run("eval", "desc.h5", "gt.csv", cwd=files)                  # a binary file: no traceback
    assert r.returncode == 2 and r.stderr.strip() == ("simcore eval: error: desc.h5: not a UTF-8 text file "
                                                      "(a binary file?); expected a CSV query_id,reference_id,score")
