"""This process's place in a ``torchrun`` world (docs/train.md, "Several GPUs").

``init_distributed`` returns None in one process; under ``torchrun`` (WORLD_SIZE > 1, or a process
group the caller initialised) a ``Dist``: gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``. Its
collectives are the few the trainer needs: a handful of host integers per step, one agreement
on errors (so that no rank waits for a failed one forever), the rows of the new centres (or, streamed
from shards, their sums) and a streamed data set's position at a checkpoint.
"""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from simcore.isc.training.config import TrainSetupError, resolve_device

__all__ = ["Dist", "gather_objects", "init_distributed", "finish_distributed"]


class Dist:
    """The process group (WORLD), rank, world size, local rank, device, and whether ``train``
    created the group (and so destroys it at the end)."""

    def __init__(self, rank, world, local_rank, device, created):
        self.rank, self.world, self.local_rank, self.device, self.created = rank, world, local_rank, device, created
        self.group = dist.group.WORLD
        nccl = dist.get_backend() == "nccl"
        # bulk collectives (centre embeddings) run on the backend's device (NCCL: this rank's GPU)
        self.comm = torch.device(device) if nccl else torch.device("cpu")
        # the per-step exchange of a few host integers goes through gloo on the host: through NCCL
        # it would copy to the GPU and back, and so wait for the step the GPU is still computing
        self.control = dist.new_group(backend="gloo") if nccl else self.group

    def gather_ints(self, values):
        """(world, len(values)) int64 on the host: every rank's ``values``."""
        t = torch.tensor(values, dtype=torch.int64)
        out = torch.empty(self.world * t.numel(), dtype=torch.int64)
        dist.all_gather_into_tensor(out, t, group=self.control)
        return out.view(self.world, t.numel())

    def agree(self, error, what):
        """A collective: raise on every rank if any rank has an ``error`` (its own error there, a
        TrainSetupError naming the failed ranks elsewhere), so that no rank waits for another forever."""
        failed = self.gather_ints([int(error is not None)])[:, 0].nonzero().flatten().tolist()
        if error is not None:
            raise error
        if failed:
            raise TrainSetupError(f"rank(s) {failed} failed to {what} (see the error on those ranks)")

    def gather_objects(self, obj):
        """Every rank's ``obj`` (picklable; small: a checkpoint's data position), in rank order."""
        return gather_objects(obj, self.control)

    def sum_(self, tensor):
        """``tensor`` summed over the ranks, in place (through the backend's device); returns it."""
        buf = tensor.to(self.comm)
        dist.all_reduce(buf, group=self.group)
        tensor.copy_(buf)
        return tensor

    def gather_rows(self, local, n, dim):
        """The (n, dim) float32 rows of items 0..n-1 when rank r holds items r, r+R, r+2R, ... (``local``)."""
        per = -(-n // self.world)
        buf = torch.zeros(per, dim, dtype=torch.float32, device=self.comm)
        if local.numel():
            buf[:local.shape[0]] = local.to(self.comm, torch.float32)
        out = torch.empty(self.world * per, dim, dtype=torch.float32, device=self.comm)
        dist.all_gather_into_tensor(out, buf, group=self.group)
        out = out.cpu().view(self.world, per, dim)
        rows = torch.empty(n, dim)
        for q in range(self.world):
            rows[q::self.world] = out[q, :len(range(q, n, self.world))]
        return rows


def _rank_device(device_name, local):
    device = resolve_device(device_name)
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    return device


def gather_objects(obj, group=None):
    """Every rank's ``obj`` (picklable, small) through ``group`` (None: the default group), in rank order."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def init_distributed(device_name):
    """None in one process; under ``torchrun`` (WORLD_SIZE > 1, or a process group the caller
    initialised) the rank's Dist: gloo on the CPU, NCCL on CUDA with ``cuda:LOCAL_RANK``."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Dist(dist.get_rank(), dist.get_world_size(), local, _rank_device(device_name, local), created=False)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise TrainSetupError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise TrainSetupError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with torchrun "
                              "(docs/train.md, 'Several GPUs')")
    if not dist.is_available():
        raise TrainSetupError("this torch has no torch.distributed: train in one process")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = _rank_device(device_name, local)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, created=True)


def finish_distributed(dd):
    """End what ``init_distributed`` started: the process group it created, or its own gloo group."""
    if dd is None or not dist.is_initialized():
        return
    if dd.created:
        # the head and its optimizer reference each other: free them (and the process group they
        # hold) now, not in the interpreter's finalisation
        gc.collect()
        dist.destroy_process_group()
    elif dd.control is not dd.group:
        dist.destroy_process_group(dd.control)   # the caller's group lives on; train's own gloo group ends
