"""``simcore match`` and ``simcore eval`` as Python functions: the command line (``simcore.isc.cli``)
parses the flags and prints; these read the files, match, evaluate and write.

- ``load_descriptors(path, role)``: (float32 array, ids) of ``query``, ``reference`` or ``train`` from
  an HDF5 file in the challenge layout or a .npy array.
- ``match_files(descriptors, train=, normalize=, pca=, ...)``: what ``simcore match`` does (PCA
  whitening, one external-set normalisation, the matcher), writing the predictions CSV.
- ``evaluate_files(predictions, ground_truth, plot=None)``: what ``simcore eval`` does; a ``Metrics``.

Bad input raises ``CLIError`` with one line naming the file and what is wrong; a bad option value,
``checks.ConfigError`` naming the flag and its range, before any file is read.
"""
from __future__ import annotations

import argparse
import os

from simcore.isc import checks

__all__ = ["CLIError", "user_errors", "error_line", "load_descriptors", "match_files", "evaluate_files"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2 (a bad flag value is a ``checks.ConfigError``)."""


def user_errors() -> tuple:
    """The exceptions every command reports as one line with exit code 2: bad input, not bugs."""
    from simcore import WriteError
    from simcore.isc.backbones import BackboneError
    from simcore.isc.data import CorruptImageError, NoImagesError
    from simcore.isc.embed import CheckpointError, EmbedSetupError
    from simcore.isc.encoded import CorruptRecordError
    from simcore.isc.metrics import FileFormatError
    from simcore.isc.reid import ReidNameError
    from simcore.isc.shards import ShardError
    from simcore.isc.train import CheckpointWriteError, TrainSetupError
    from simcore.isc.verification import VerificationFileError
    return (CLIError, checks.ConfigError, WriteError, FileFormatError, NoImagesError, CorruptImageError,
            BackboneError, CheckpointError, EmbedSetupError, TrainSetupError, CheckpointWriteError,
            CorruptRecordError, VerificationFileError, ReidNameError, ShardError)


def _worker_message(text):
    """The message a DataLoader worker's error was raised with: torch raises it again in the main process as
    "Caught X in DataLoader worker process N.\nOriginal Traceback ...\nmodule.X: message" (a strict run's
    undecodable image)."""
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def error_line(prog, e: BaseException):
    """The one line ``prog`` prints for a user error ``e`` (``user_errors()`` or an OSError naming a file), or
    None for an exception that is a bug (whose traceback must show)."""
    if isinstance(e, user_errors()):
        return f"{prog}: error: {_worker_message(str(e))}"
    if isinstance(e, OSError):
        name = getattr(e, "filename", None)
        return f"{prog}: error: {f'{name}: ' if name else ''}{e.strerror or e}"
    return None


def _h5py(path):
    try:
        import h5py
    except ImportError:
        raise CLIError(f"{path}: reading HDF5 needs h5py (pip install 'simcore[isc]' or pip install h5py)") from None
    return h5py


def _decode_ids(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _check_matrix(arr, path, what):
    import numpy as np
    if arr.ndim != 2:
        raise CLIError(f"{path}: {what} must be a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CLIError(f"{path}: {what} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise CLIError(f"{path}: {what} must hold floating-point descriptors, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise CLIError(f"{path}: {what} contain NaN or infinite values (first in row {bad})")
    return arr.astype(np.float32, copy=False)


def _read_ids_file(path, n, what):
    try:
        with open(path, encoding="utf-8-sig") as f:
            ids = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CLIError(f"{path}: cannot read {what} ids: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not a UTF-8 text file of {what} ids, one a line (a binary file?)") from None
    if len(ids) != n:
        raise CLIError(f"{path}: {len(ids)} {what} ids for {n} descriptor rows")
    return ids


def _load_npy(path, role, ids_path):
    import numpy as np
    try:
        arr = np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except Exception as e:  # noqa: BLE001 - any unreadable .npy is a user error
        raise CLIError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    arr = _check_matrix(arr, path, f"{role} descriptors")
    ids = _read_ids_file(ids_path, arr.shape[0], role) if ids_path else [str(i) for i in range(arr.shape[0])]
    return arr, ids


def _h5_dataset(f, path, key):
    """The whole dataset ``key`` of the open HDF5 file ``f`` as a numpy array; unreadable data is a CLIError."""
    import numpy as np
    h5py = _h5py(path)
    if not isinstance(f[key], h5py.Dataset):
        raise CLIError(f"{path}: '{key}' is an HDF5 group, not a dataset")
    try:
        return np.asarray(f[key][()])
    except (OSError, TypeError, ValueError) as e:   # corrupt chunks, missing filters, odd types
        raise CLIError(f"{path}: cannot read dataset '{key}' ({e})") from None


def _load_h5(path, role, ids_path, require_ids):
    h5py = _h5py(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CLIError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if role not in f:
            raise CLIError(f"{path}: no dataset '{role}' (found: {', '.join(sorted(f.keys())) or 'none'})")
        arr = _check_matrix(_h5_dataset(f, path, role), path, f"{role} descriptors (dataset '{role}')")
        key = f"{role}_ids"
        if ids_path:
            return arr, _read_ids_file(ids_path, arr.shape[0], role)
        if key not in f:
            if require_ids:
                raise CLIError(f"{path}: no dataset '{key}' (the challenge layout needs the ids beside '{role}')")
            return arr, [str(i) for i in range(arr.shape[0])]
        try:
            ids = _decode_ids(_h5_dataset(f, path, key).reshape(-1).tolist())
        except UnicodeDecodeError:
            raise CLIError(f"{path}: dataset '{key}' holds ids that are not UTF-8 text") from None
        if len(ids) != arr.shape[0]:
            raise CLIError(f"{path}: dataset '{key}' has {len(ids)} ids for {arr.shape[0]} rows of '{role}'")
        return arr, ids


def load_descriptors(path, role, ids_path=None, require_ids=False):
    """(float32 array (N, D), list of str ids) of ``role`` ('query', 'reference' or 'train') from ``path``."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr, ids = _load_npy(path, role, ids_path)
    elif ext in (".h5", ".hdf5", ".hdf"):
        arr, ids = _load_h5(path, role, ids_path, require_ids)
    else:
        raise CLIError(f"{path}: unknown descriptor format '{ext or '(none)'}' (expected .h5/.hdf5 or .npy)")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise CLIError(f"{ids_path or path}: duplicate {role} id {dup!r}")
    if any("," in i or "\n" in i for i in ids):
        raise CLIError(f"{ids_path or path}: {role} ids must not contain commas or newlines")
    return arr, ids


# ----------------------------------------------------------------------------------- commands

#: The external-set normalisations: (default beta or alpha, default neighbours).
NORMALIZE_DEFAULTS = {"score": (2.0, 10), "negative": (0.35, 10), "shift": (1.8, 100)}
#: --beta's upper bound: the published values lie in [0.35, 2]; far above, the correction term swamps the
#: similarities it corrects (and at 1e30 overflows float32 scores to -inf).
MAX_BETA = 1000.0


def _check_match_options(a):
    """Every option of ``simcore match`` alone (before a file is read): ConfigError naming the flag."""
    if a.descriptors is None and (a.query is None or a.reference is None):
        raise CLIError("match: give a descriptors file (HDF5 with 'query' and 'reference') "
                       "or both --query and --reference")
    checks.choice("--normalize", a.normalize, ("none",) + tuple(NORMALIZE_DEFAULTS))
    checks.choice("--metric", a.metric, ("auto", "ip", "l2"))
    if a.beta is not None:
        a.beta = checks.number("--beta", a.beta, 0.0, MAX_BETA)
    if a.neighbors is not None:
        a.neighbors = checks.integer("--neighbors", a.neighbors, 1)
    if a.pca is not None:
        a.pca = checks.integer("--pca", a.pca, 1)
    a.k = checks.integer("--k", a.k, 1)
    if a.max_results is not None:
        a.max_results = checks.integer("--max-results", a.max_results, 1)
    if a.dba and a.normalize != "negative":
        raise CLIError("match: --dba smooths the training set for --normalize negative only")
    if a.train is None and (a.normalize != "none" or a.pca is not None):
        raise CLIError(f"match: --normalize {a.normalize}{' and --pca' if a.pca else ''} need --train "
                       "(the external training descriptors)")
    for flag, path in ((None, a.descriptors), ("--query", a.query), ("--reference", a.reference),
                       ("--train", a.train), ("--query-ids", a.query_ids), ("--reference-ids", a.reference_ids)):
        if path is not None:
            checks.input_file(flag, path)
    checks.output_file("-o/--output", a.output, "predictions")


def _match_inputs(a):
    """(queries, query ids, references, reference ids, training descriptors or None) of ``simcore match``."""
    qpath = a.query or a.descriptors
    rpath = a.reference or a.descriptors
    q, qids = load_descriptors(qpath, "query", a.query_ids, require_ids=a.query is None)
    r, rids = load_descriptors(rpath, "reference", a.reference_ids, require_ids=a.reference is None)
    if q.shape[1] != r.shape[1]:
        raise CLIError(f"{rpath}: reference descriptors have {r.shape[1]} dims, the queries ({qpath}) {q.shape[1]}")
    t = None
    if a.train is not None:
        t, _ = load_descriptors(a.train, "train")
        if t.shape[1] != q.shape[1]:
            raise CLIError(f"{a.train}: training descriptors have {t.shape[1]} dims, the queries {q.shape[1]}")
    return q, qids, r, rids, t


def _post_process(a, qt, rt, tt):
    """PCA whitening and the --normalize step: (queries, references, training, metric, score_norm)."""
    from simcore.isc import descriptors as D

    if a.pca is not None:
        if not 1 <= a.pca <= qt.shape[1]:
            raise CLIError(f"match: --pca must be in [1, {qt.shape[1]}], got {a.pca}")
        if tt.shape[0] < 2:
            raise CLIError(f"{a.train}: PCA needs at least 2 training descriptors")
        pca = checks.pca_fit("--pca", D.PCAWhitening(a.pca).fit(tt), tt.shape[0])
        qt, rt, tt = pca.transform(qt), pca.transform(rt), pca.transform(tt)
    metric, score_norm = a.metric, None
    if a.normalize != "none":
        defaults = NORMALIZE_DEFAULTS[a.normalize]
        beta = defaults[0] if a.beta is None else a.beta
        nn_ = defaults[1] if a.neighbors is None else a.neighbors
        if not 1 <= nn_ <= tt.shape[0]:
            raise CLIError(f"{a.train}: --neighbors {nn_} needs at least that many training descriptors "
                           f"(the file has {tt.shape[0]})")
        if a.normalize == "score":
            score_norm = {"beta": beta, "n": nn_}
        elif a.normalize == "negative":
            if a.dba:
                try:
                    tt = D.database_side_augmentation(tt)        # the 1st place's k = 10, alpha = 3
                except ValueError as e:
                    raise CLIError(f"{a.train}: --dba: {e}") from None
            qt = D.negative_embedding_subtraction(qt, tt, beta=beta, k=nn_)
            rt = D.negative_embedding_subtraction(rt, tt, beta=beta, k=nn_)
        else:
            qt = D.query_shift(qt, tt, k=nn_, alpha=beta, top=min(3, nn_))
            if metric == "auto":
                metric = "l2"
    return qt, rt, tt, ("ip" if metric == "auto" else metric), score_norm


def match_files(descriptors=None, *, query=None, reference=None, train=None, query_ids=None, reference_ids=None,
                normalize="none", beta=None, neighbors=None, dba=False, pca=None, k=10, max_results=500_000,
                metric="auto", output="predictions.csv", progress=False) -> dict:
    """``simcore match``: read the descriptors, PCA-whiten (``pca``, fitted on ``train``), apply the
    ``normalize`` step (none, score, negative, shift) with its defaults unless ``beta`` / ``neighbors``,
    match (per-query top-``k``, the globally best ``max_results``) and write ``output``. Returns the
    summary that ``simcore match --json`` prints."""
    import torch

    from simcore.isc import descriptors as D
    from simcore.isc.metrics import write_predictions

    a = argparse.Namespace(descriptors=descriptors, query=query, reference=reference, train=train,
                           query_ids=query_ids, reference_ids=reference_ids, normalize=normalize, beta=beta,
                           neighbors=neighbors, dba=dba, pca=pca, k=k, max_results=max_results, metric=metric,
                           output=output)
    _check_match_options(a)
    q, qids, r, rids, t = _match_inputs(a)
    qt, rt = D.l2_normalize(torch.from_numpy(q)), D.l2_normalize(torch.from_numpy(r))
    tt = None if t is None else D.l2_normalize(torch.from_numpy(t))
    qt, rt, tt, metric, score_norm = _post_process(a, qt, rt, tt)
    m = D.match(qt, rt, k=a.k, max_results=a.max_results, metric=metric, train=tt, score_norm=score_norm,
                progress=progress)
    write_predictions(output, m.to_triples(qids, rids))
    return {"output": output, "predictions": len(m), "queries": len(qids), "references": len(rids),
            "k": a.k, "max_results": a.max_results, "metric": metric, "normalize": normalize, "dba": dba, "pca": pca}


def evaluate_files(predictions, ground_truth, *, plot=None):
    """``simcore eval``: the ISC 2021 ``Metrics`` of a predictions CSV against a ground-truth CSV;
    ``plot``: also save the precision-recall curve there (PNG, needs matplotlib)."""
    from simcore.isc.metrics import evaluate, read_ground_truth, read_predictions

    checks.input_file(None, predictions)
    checks.input_file(None, ground_truth)
    if plot is not None:
        checks.plot_file("--plot", plot)
    preds = read_predictions(predictions)
    if not preds:
        raise CLIError(f"{predictions}: no predictions (an empty file, or a header alone)")
    gt = read_ground_truth(ground_truth)
    if not any(r for _, r in gt):
        raise CLIError(f"{ground_truth}: no (query, reference) pairs: every reference_id is empty")
    try:
        m = evaluate(preds, gt)
    except ValueError as e:
        raise CLIError(f"{predictions}: {e}") from None
    if plot is not None:
        m.plot(plot, title=os.path.basename(predictions))
    return m
