"""Checks of the commands' values, one helper per kind of value, run before a command does any work.

Each helper returns the value (converted: ``int``, ``float``, a path) or raises ``ConfigError``, whose
message is one line naming the flag, the accepted range and the value given; the command line prints
it and exits with code 2. The Python functions behind the commands call the same helpers, so a bad
value is refused the same way whichever door it came in by.
"""
from __future__ import annotations

import math
import numbers
import os

__all__ = ["ConfigError", "integer", "number", "choice", "device", "input_file", "output_file", "output_folder",
           "plot_file", "pca_fit"]


class ConfigError(ValueError):
    """A bad value of a command's flag: one line naming the flag and the accepted range; exit code 2."""


def _fmt(x):
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(lo, hi, lo_open=False, hi_open=False):
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_fmt(hi)}"
    return "any value"


def integer(flag, value, lo=None, hi=None):
    """``value`` as an int in [lo, hi] (either bound may be None). bool and non-integral numbers are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(value, str):
        try:
            value, ok = int(value.strip()), True
        except ValueError:
            ok = False
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{flag} must be an integer {_range_text(lo, hi)}, got {value!r}")
    return int(value)


def number(flag, value, lo=None, hi=None, *, lo_open=False, hi_open=False):
    """``value`` as a finite float in the range (closed bounds unless ``lo_open`` / ``hi_open``);
    NaN and infinities are always refused."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    bad = not math.isfinite(x) or \
        (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi))
    if bad:
        raise ConfigError(f"{flag} must be a finite number {_range_text(lo, hi, lo_open, hi_open)}, got {value!r}")
    return x


def choice(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def device(flag, name):
    """A torch device name: "auto" (cuda when torch sees one, else cpu), "cpu", "cuda" or "cuda:N" of a
    GPU torch sees. Returns the resolved name."""
    import torch
    name = str(name).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = name[5:] or "0"
        if not index.isdigit():
            raise ConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, got {name!r}")
        if int(index) >= count:
            raise ConfigError(f"{flag} {name}: torch sees {count} CUDA device(s)"
                              f"{f' (cuda:0 to cuda:{count - 1})' if count else ''}")
        return name
    raise ConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, got {name!r}")


def input_file(flag, path):
    """An existing regular file (or a link to one). ``flag`` None: a positional argument (the path says it)."""
    path = os.fspath(path)
    name = path if flag is None else f"{flag} {path}"
    if not os.path.exists(path):
        raise ConfigError(f"{name}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: not a regular file")
    return path


def _writable_parent(flag, path, what):
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):                 # a missing folder is made by the writer: check its root
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable, so the {what} cannot be written")


def output_file(flag, path, what="file"):
    """A path a file can be written to: not a folder, in a writable folder (made when missing)."""
    path = os.fspath(path)
    if not path:
        raise ConfigError(f"{flag} needs a file name")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a folder; give a file name for the {what}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: exists and is not a regular file")
    _writable_parent(flag, path, what)
    return path


def output_folder(flag, path, what="files"):
    """A folder to write into: an existing folder, or a new one in a writable folder."""
    path = os.fspath(path)
    if not path:
        raise ConfigError(f"{flag} needs a folder name")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: exists and is not a folder (the {what} go into a folder)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: the folder is not writable")
        return path
    _writable_parent(flag, path, what)
    return path


def plot_file(flag, path):
    """An image file matplotlib can write, by its extension (and matplotlib importable)."""
    path = output_file(flag, path, "plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ConfigError(f"{flag}: plotting needs matplotlib: pip install 'simcore[isc]' "
                          "(or pip install matplotlib)") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in formats:
        raise ConfigError(f"{flag} {path}: the file name must end in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def pca_fit(flag, fitted, n_train):
    """``fitted`` (a fitted ``PCAWhitening``) when each of its dims has variance in the training set;
    otherwise whitening would divide by a zero variance, silently: refused with the numbers."""
    dim, varying = int(fitted.eigenvalues.numel()), fitted.varying_dims()
    if varying < dim:
        raise ConfigError(f"{flag} {dim}: the {n_train} training descriptors vary in only {varying} of those "
                          f"directions (whitening the other {dim - varying} scales noise up); give {flag} <= "
                          f"{varying} or more training images")
    return fitted
