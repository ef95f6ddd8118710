"""Argument checks shared by the margin losses and heads, and per-row margins.

Every public entry point checks its arguments here before any kernel runs, so bad
input raises a ``TypeError`` / ``ValueError`` naming the argument (the C++ kernels
check again at their boundary).

Checks of *values* (label range, per-row margin range, a caller's ``sampled`` ids,
a loss module's tensor t / Cam-Softmax exponent) need the values on the host: one
device-to-host synchronisation each on an accelerator. :func:`value_check` decides, per call, how they run (the ``validate=``
argument of the losses and heads, docs/margin_softmax.md "What syncs remain"):

* ``"first"`` (default): on the host (a readable ``ValueError``) for CPU tensors on
  every call (a CPU tensor needs no synchronisation) and for accelerator tensors on
  the first call per input signature (shapes, dtypes, devices, the check's own
  bounds); every later or traced call checks on the device with
  ``torch._assert_async`` (no synchronisation; a failure on CUDA is a device-side
  assertion, which ends the process's CUDA context, as an out-of-range index would);
* ``"always"``: on the host on every eager call (the behaviour before issue 14);
  traced calls check on the device;
* ``"never"``: no value checks here (the CPU kernels still range-check labels; on CUDA
  an out-of-range label then gives a NaN loss or a device-side assertion).

Metadata (types, dtypes, shapes, devices, layouts) is checked on every call whatever
``validate`` says: it costs no synchronisation.
"""
from __future__ import annotations

import math

import torch

from simcore import dispatch

__all__ = ["REDUCTIONS", "FLOAT_DTYPES", "VALIDATE_MODES", "check_inputs", "check_margins", "check_family",
           "check_validate", "value_check", "check_label_range", "check_dynamic_scalars", "per_row_margins",
           "margin_dtype"]

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VALIDATE_MODES = ("first", "always", "never")

_SEEN = set()  # signatures already checked on the host under validate="first"
_SEEN_MAX = 4096  # forgotten (and so checked again) beyond this many


def check_validate(validate):
    """``validate`` is one of :data:`VALIDATE_MODES` (True means "always", False "never")."""
    if validate is True:
        return "always"
    if validate is False:
        return "never"
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be 'first', 'always' or 'never' (or True / False), got {validate!r}")
    return validate


def value_check(validate, device, signature):
    """How a value check runs now: "host" (read the values, raise ValueError), "device"
    (``torch._assert_async``, no synchronisation) or None (skip). ``signature``: a hashable
    description of the call (shapes, dtypes, the bounds checked) for ``validate="first"``."""
    if validate == "never":
        return None
    if torch.compiler.is_compiling():
        return "device"
    if validate == "always" or not dispatch.cuda_path(device):
        return "host"
    if signature in _SEEN:
        return "device"
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    _SEEN.add(signature)
    return "host"


def _signature(*tensors):
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def check_margins(m1, m2, m3, scale):
    """Scalar margins and scale; a (B,) tensor m1/m2/m3 (per-row margins) is checked by
    :func:`per_row_margins` instead."""
    for name, v in (("m1", m1), ("m2", m2), ("m3", m3), ("scale", scale)):
        if isinstance(v, torch.Tensor) and name != "scale":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not isinstance(m1, torch.Tensor) and m1 <= 0:
        raise ValueError(f"m1 must be positive, got {m1}")
    if not isinstance(m2, torch.Tensor) and not 0 <= m2 < math.pi:
        raise ValueError(f"m2 (the angular margin) must lie in [0, pi), got {m2}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")


def check_family(subcenters, filter_threshold, weight=None):
    """``subcenters`` (and ``weight``'s row count against it) and ``filter_threshold``."""
    if isinstance(subcenters, bool) or not isinstance(subcenters, int) or not 1 <= subcenters <= 255:
        raise ValueError(f"subcenters must be an int in [1, 255], got {subcenters!r}")
    if weight is not None and weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters} "
                         "(sub-centre weights are (C·K, D), class-major)")
    if filter_threshold is not None and (isinstance(filter_threshold, bool)
                                         or not isinstance(filter_threshold, (int, float))
                                         or math.isnan(filter_threshold)):
        raise ValueError(f"filter_threshold must be a number or None, got {filter_threshold!r}")


def _check_tensors(embeddings, labels, weight):
    """Types, dtypes, shapes, devices and layout of the three tensors of a loss call."""
    for name, t in (("embeddings", embeddings), ("labels", labels), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("embeddings", embeddings), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class ids, got {labels.dtype} (convert with labels.long(); "
                        "other integer types are rejected rather than reinterpreted)")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, dim), got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    b, d = embeddings.shape
    if b == 0:
        raise ValueError("empty batch: embeddings has 0 rows")
    if labels.shape[0] != b:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {b} rows")
    if weight.shape[1] != d:
        raise ValueError(f"weight has dim {weight.shape[1]} but embeddings has dim {d}")
    if weight.shape[0] == 0 or d == 0:
        raise ValueError(f"weight must have at least one class and one dimension, got {tuple(weight.shape)}")
    if not (embeddings.device == labels.device == weight.device):
        raise ValueError(f"embeddings, labels and weight must be on one device, got {embeddings.device}, "
                         f"{labels.device} and {weight.device}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError("weight must have unit stride along its last dimension (rows may be strided); "
                         "pass weight.contiguous()")


def check_inputs(embeddings, labels, weight, sample_rate, num_samples, reduction, subcenters=1, validate="first"):
    """Everything a loss call takes besides its margins: the tensors, the sampling
    arguments, ``reduction``, ``subcenters`` and the label range (as ``validate`` says:
    :func:`value_check`)."""
    _check_tensors(embeddings, labels, weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_samples is None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    check_family(subcenters, None, weight)
    check_label_range(labels, weight.shape[0] // subcenters, validate)


def check_label_range(labels, num_classes, validate):
    """Labels in [0, num_classes), as ``validate`` says (:func:`value_check`)."""
    how = value_check(validate, labels.device, ("labels", num_classes) + _signature(labels))
    if how is None or labels.numel() == 0:
        return
    if how == "device":
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"simcore: labels must lie in [0, {num_classes})")
        return
    lo, hi = torch.aminmax(labels)
    if lo.item() < 0 or hi.item() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo.item()}, {hi.item()}]")


def check_dynamic_scalars(cam_power, curricular_t, validate):
    """A module's state that reaches the kernels as a tensor (simcore.margin.engine.split_dynamic):
    ``cam_power`` finite and >= 0, ``curricular_t`` finite (floats and None are left alone: the
    kernels' boundary checks them), as ``validate`` says (:func:`value_check`). The CPU kernels
    check these values again; the CUDA kernels read them from device memory and give a NaN loss
    for a value out of range (``validate="never"``)."""
    for name, v, need in (("cam_power", cam_power, "a finite number >= 0"), ("curricular_t", curricular_t,
                                                                            "a finite number")):
        if not isinstance(v, torch.Tensor):
            continue
        how = value_check(validate, v.device, (name,) + _signature(v))
        if how is None:
            continue
        d = v.detach()
        ok = torch.isfinite(d).all()
        if name == "cam_power":
            ok = ok & (d >= 0).all()
        if how == "device":
            torch._assert_async(ok, f"simcore: {name} must be {need}")
        elif not ok.item():
            raise ValueError(f"{name} must be {need}, got {d.tolist()}")


def margin_dtype(embeddings):
    """dtype of per-row margins: float32 for the kernels, float64 beside float64 embeddings (the reference)."""
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def per_row_margins(m1, m2, m3, batch, device, dtype=torch.float32, validate="first"):
    """(B, 3) per-row (m1, m2, m3) when any of them is a (B,) tensor (differentiable; the
    scalars are broadcast), else None. Raises on a wrong shape or device, and on a wrong
    range as ``validate`` says (:func:`value_check`)."""
    if not any(isinstance(m, torch.Tensor) for m in (m1, m2, m3)):
        return None
    cols = []
    for name, m in (("m1", m1), ("m2", m2), ("m3", m3)):
        if isinstance(m, torch.Tensor):
            if m.shape != (batch,) or not m.is_floating_point():
                raise ValueError(f"{name} must be a float or a floating (B,) = ({batch},) tensor, got "
                                 f"{m.dtype} of shape {tuple(m.shape)}")
            if m.device != device:
                raise ValueError(f"{name} is on {m.device} but embeddings on {device}")
            cols.append(m.to(dtype))
        else:
            cols.append(torch.full((batch,), float(m), dtype=dtype, device=device))
    rm = torch.stack(cols, dim=1)
    # the CPU kernel checks again; the CUDA kernel cannot
    how = value_check(validate, device, ("row_margins",) + _signature(rm))
    if how is not None:
        d = rm.detach()
        ok = (torch.isfinite(d).all(1) & (d[:, 0] > 0) & (d[:, 1].abs() < math.pi)).all()
        if how == "device":
            torch._assert_async(ok, "simcore: per-row margins must be finite with m1 > 0 and |m2| < pi")
        elif not ok.item():
            raise ValueError("per-row margins must be finite with m1 > 0 and |m2| < pi")
    return rm
