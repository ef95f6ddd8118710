"""The one atomic writer (simcore.atomic_write) and every writer built on it, each with its write failing:
a failed write raises simcore.WriteError (one line), leaves the old file bit-identical and no temporary file."""
import contextlib
import os
import resource
import signal

import numpy as np
import pytest
import torch

import simcore
from simcore import WriteError, atomic_write

OLD = b"the old file, bit for bit\n" * 3


@contextlib.contextmanager
def disk_full(limit=1024):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (a file-size limit, SIGXFSZ ignored)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _old(path):
    path.write_bytes(OLD)
    return path


def _assert_untouched(path):
    assert path.read_bytes() == OLD
    assert [f for f in os.listdir(path.parent) if f.endswith(".tmp")] == []


def test_the_writer_replaces_the_file_whole(tmp_path):
    p = _old(tmp_path / "f.bin")
    with atomic_write(p) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(p)
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert p.read_bytes() == OLD                      # not before the block ends
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    with atomic_write(tmp_path / "made" / "deeper" / "g.txt", sync=False) as tmp:
        open(tmp, "w").write("x")
    assert (tmp_path / "made" / "deeper" / "g.txt").read_text() == "x"


@pytest.mark.parametrize("failure", ["oserror", "disk-full", "io-error-type", "folder"])
def test_a_failed_write_is_one_line_and_leaves_the_old_file(tmp_path, failure):
    p = _old(tmp_path / "f.bin")
    target = tmp_path if failure == "folder" else p
    with pytest.raises(WriteError) as e:
        if failure == "disk-full":
            with disk_full(), atomic_write(p) as tmp, open(tmp, "wb") as f:
                f.write(b"x" * 10_000)
        else:
            with atomic_write(target, io_errors=(RuntimeError,)) as tmp:
                open(tmp, "wb").write(b"partial")
                if failure == "oserror":
                    raise OSError(28, "No space left on device")
                if failure == "io-error-type":
                    raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{target}: cannot write (")
    assert isinstance(e.value, OSError)
    _assert_untouched(p)


def test_other_exceptions_pass_unchanged_and_leave_no_temporary_file(tmp_path):
    p = _old(tmp_path / "f.bin")
    with pytest.raises(KeyError):
        with atomic_write(p) as tmp:
            open(tmp, "wb").write(b"partial")
            raise KeyError("a bug, not a failed write")
    _assert_untouched(p)


def _write_predictions(p):
    from simcore.isc.metrics import write_predictions
    write_predictions(p, [(f"Q{i}", f"R{i}", 0.5) for i in range(500)])


def _write_descriptors(p):
    from simcore.isc.embed import write_descriptors
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    write_descriptors(p, {"query": x, "reference": x, "query_ids": [f"Q{i}" for i in range(200)],
                          "reference_ids": [f"R{i}" for i in range(200)], "train": None})


def _plot(p):
    from simcore.isc.metrics import evaluate
    m = evaluate([("Q0", "R0", 0.9), ("Q1", "R2", 0.5)], [("Q0", "R0"), ("Q1", "R1")])
    m.plot(p)


def _flat_index(p):
    index = simcore.FlatIndex(16)
    index.add(torch.randn(200, 16))
    index.save(p)


def _image(p):
    from PIL import Image

    from simcore.isc.files import save_image
    save_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), p)


def _checkpoint(p):                    # how simcore train writes its checkpoints
    with atomic_write(p, io_errors=(RuntimeError,)) as tmp:
        torch.save({"weights": torch.randn(1000)}, tmp)


def _text(p):
    from simcore.isc.files import write_text
    write_text(p, "x" * 5000)


WRITERS = {"predictions.csv": _write_predictions, "descriptors.h5": _write_descriptors, "pr.png": _plot,
           "index.simc": _flat_index, "image.png": _image, "last.pt": _checkpoint, "results.json": _text}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_writer_with_its_write_failing(tmp_path, name):
    p = _old(tmp_path / name)
    with pytest.raises(WriteError, match="cannot write \\(") as e:      # torch.save says it its own way
        with disk_full(1024):
            WRITERS[name](p)
    assert "\n" not in str(e.value) and ("File too large" in str(e.value) or name == "last.pt")
    _assert_untouched(p)
    WRITERS[name](p)                                   # and with room, the new file whole
    assert p.read_bytes() != OLD and os.listdir(tmp_path) == [name]


def test_a_flat_index_round_trips_through_the_writer(tmp_path):
    index = simcore.FlatIndex(8)
    index.add(torch.randn(5, 8))
    index.save(tmp_path / "i.simc")
    assert torch.equal(simcore.FlatIndex.load(tmp_path / "i.simc").vectors, index.vectors)
