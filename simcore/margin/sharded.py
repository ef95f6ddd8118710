"""Class-sharded margin-softmax head over torch.distributed (Partial FC, model parallel).

``PartialMarginHead(C, D, ..., process_group=group)`` returns a
:class:`ShardedPartialMarginHead`: rank r of the group owns the contiguous block
of class centres :func:`shard_bounds` ``(C, R, r)`` and their optimizer state.
Each step:

1. one small all-gather of per-rank metadata (batch size, dim, dtype, label
   range, config checksum): every rank checks every rank's input, so bad input
   raises the same error on every rank instead of hanging a collective;
2. all-gather of the embeddings and labels, padded to the largest local batch
   (unequal batch sizes per rank are supported);
3. on each rank, the fused pass 1 of :mod:`simcore.margin.engine` over the
   centres it owns that are sampled (positives of the *global* batch on this
   shard + uniform negatives from this shard), with target column −1 for rows
   whose class lives elsewhere;
4. all-reduce MAX of the row max, then one all-reduce SUM of the rescaled
   exp-sums and of the target logit (owned by exactly one rank per row): the
   global log-sum-exp; every rank now holds the same per-row losses;
5. the fused pass 2 with the global log-sum-exp: the gradient of the global
   mean loss with respect to this shard's centre rows (exact, recorded for
   ``step()``) and its partial gradient with respect to all N gathered
   embeddings; the backward of the all-gather reduce-scatters (sums over ranks)
   those partials, so each rank receives the gradient of its own rows.

Gradient scaling: the loss each rank returns is the mean over the *global*
batch, so rank r's own embeddings receive ∂L/∂x_r exactly. Data-parallel
wrappers (DDP, FSDP) *average* backbone gradients over the R ranks, which would
give (1/R)·∂L/∂θ; with ``grad_reduction="mean"`` (default) the embedding
gradient is multiplied by R so that DDP's average is exactly ∂L/∂θ of the
single-process loss on the global batch (for equal or unequal batch sizes).
Use ``grad_reduction="sum"`` if you sum backbone gradients across ranks yourself.

This module registers :class:`ShardedPartialMarginHead` as the sharded form of
:class:`~simcore.margin.head.PartialMarginHead` by declaring it with
``sharded_form=True`` (see :mod:`simcore.margin.head`); the head never imports it.

Semantics, sampling, checkpoint resharding and scaling: docs/distributed.md.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch
import torch.distributed as dist

from simcore import dispatch
from simcore.margin.checks import per_row_margins
from simcore.margin.engine import current_engine_options, fused_margin_softmax, margin_grad, target_cosines
from simcore.margin.gemm import gemm_operand_dtype
from simcore.margin.head import PartialMarginHead
from simcore.margin.ops import scaled_by_upstream
from simcore.margin.row_optimizer import stacked_rows
from simcore.margin.sampling import check_sampled, sample_classes

__all__ = ["ShardedPartialMarginHead", "shard_bounds", "load_resharded"]

_FORMAT = "simcore.sharded_margin_head.v1"
_META = 13  # int64 fields per rank in the metadata all-gather
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Classes ``[start, end)`` owned by ``rank``: contiguous blocks, the first
    ``num_classes % world_size`` ranks hold one class more (as InsightFace)."""
    base, rem = divmod(int(num_classes), int(world_size))
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


# --------------------------------------------------------------------------- autograd pieces
class _GatherRows(torch.autograd.Function):
    """All-gather of (b_r, D) rows with unequal b_r (padded to max b_r); the backward
    sums the gradient over ranks and returns each rank its own rows, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group, grad_scale):
        world, bmax, d = len(sizes), max(sizes), x.shape[1]
        b = sizes[rank]
        if b == bmax:
            src = x.contiguous()
        else:
            src = x.new_zeros(bmax, d)
            src[:b] = x
        buf = x.new_empty(world * bmax, d)
        dist.all_gather_into_tensor(buf, src, group=group)
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        if all(s == bmax for s in sizes):
            ctx.valid = None
            return buf
        ctx.valid = torch.cat([torch.arange(s, device=x.device) + k * bmax for k, s in enumerate(sizes)])
        return buf.index_select(0, ctx.valid)

    @staticmethod
    def backward(ctx, grad):
        sizes, world = ctx.sizes, len(ctx.sizes)
        bmax = max(sizes)
        if ctx.valid is None:
            full = grad.contiguous()
        else:
            full = grad.new_zeros(world * bmax, grad.shape[1])
            full.index_copy_(0, ctx.valid, grad)
        out = grad.new_empty(bmax, grad.shape[1])
        dist.reduce_scatter_tensor(out, full, group=ctx.group)
        out = out[:sizes[ctx.rank]]
        if ctx.grad_scale != 1:
            out = out * ctx.grad_scale
        return out, None, None, None, None


def _combine(run_max, run_sum, tlogit, tcol, group):
    """Global (lse, target logit) per row from every shard's pass-1 pieces."""
    gmax = run_max.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    both = torch.stack([run_sum * torch.exp(run_max - gmax), torch.where(tcol >= 0, tlogit, torch.zeros_like(tlogit))])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return gmax + torch.log(both[0]), both[1]


class _ShardLoss(torch.autograd.Function):
    """Mean over the N gathered rows of the margin-softmax loss whose classes are
    spread over the group; ``rows`` are this rank's sampled centre rows, ``spec`` the
    variant (MarginSpec), ``row_margins`` optional (N, 3) per-row margins (their
    gradient comes from the rank owning each row's class, so the reduce-scatter of
    the all-gather's backward sums it exactly once), ``target_cos`` every row's
    target cosine when the variant needs it before pass 1 (CurricularFace)."""

    @staticmethod
    def forward(ctx, xg, rows, tcol, spec, row_margins, target_cos, group, need_gx, need_gw, need_gm):
        n, s = xg.shape[0], rows.shape[0] // spec.subcenters
        dev = xg.device
        grads = need_gx or need_gw or need_gm
        gx = gw = None
        row_weight = torch.full((n,), 1.0 / n, dtype=torch.float32, device=dev)
        if s == 0:  # nothing sampled on this shard: still take part in the all-reduces
            f32 = torch.float32
            lse, tl = _combine(torch.full((n,), -math.inf, dtype=f32, device=dev), torch.zeros(n, dtype=f32, device=dev),
                               torch.zeros(n, dtype=f32, device=dev), tcol, group)
            loss_rows = lse - tl
            tcos = torch.full((n,), math.nan, dtype=f32, device=dev)
            gx = torch.zeros_like(xg) if need_gx else None
            gw = rows.new_zeros(rows.shape) if need_gw else None
        else:
            gx = torch.empty_like(xg, memory_format=torch.contiguous_format) if need_gx else None
            gw = torch.empty_like(rows, memory_format=torch.contiguous_format) if need_gw else None
            opts = current_engine_options()
            loss_rows, tcos = fused_margin_softmax(
                xg.contiguous(), None, rows, torch.arange(s, device=dev), spec,
                row_margins=None if row_margins is None else row_margins.detach(), target_cos=target_cos,
                row_weight=row_weight if grads else None, grad_x=gx, grad_w=gw, target_col=tcol,
                combine=lambda m, su, t: _combine(m, su, t, tcol, group),
                gemm_dtype=gemm_operand_dtype(xg, rows, opts.lowp_gemms, opts.cpu_bf16))
        gm = None
        if need_gm:
            gm = margin_grad(loss_rows, torch.where(tcol >= 0, tcos, torch.zeros_like(tcos)), row_margins.detach(),
                             spec.scale, row_weight)
            gm = torch.where((tcol >= 0)[:, None], gm, torch.zeros_like(gm))
        ctx.save_for_backward(*(t for t in (gx, gw, gm) if t is not None))
        ctx.needs, ctx.consumed = (need_gx, need_gw, need_gm), False
        ctx.set_materialize_grads(False)
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 10
        if ctx.consumed:
            raise RuntimeError("simcore sharded head: a second backward through the same graph is not supported")
        ctx.consumed = True
        saved = list(ctx.saved_tensors)
        gx, gw, gm = (scaled_by_upstream(saved.pop(0), grad_loss) if need else None for need in ctx.needs)
        return gx, gw, None, None, gm, None, None, None, None, None


# --------------------------------------------------------------------------- the head
class ShardedPartialMarginHead(PartialMarginHead, sharded_form=True):
    """:class:`simcore.PartialMarginHead` with its class centres sharded over a
    ``torch.distributed`` process group. Build it as
    ``simcore.PartialMarginHead(C, D, ..., process_group=group)`` on every rank of
    ``group`` with identical arguments; ``head.weight`` is then this rank's
    (C_r, D) block of centres, classes ``head.shard = (start, end)``.

    ``forward(embeddings, labels)`` takes this rank's local batch (sizes may
    differ per rank, even 0 rows on some ranks) and returns the mean loss over the
    global batch (the same value on every rank). Call it on every rank in the same
    order, like any collective. ``step()``, ``zero_grad()``, ``lr``, ``row_optimizer``
    (GradScaler, LR schedulers) work as in the single-process head, on this rank's rows;
    ``clip_grad_norm_`` clips by the norm over all ranks (call it on every rank).

    ``grad_reduction``: ``"mean"`` (default) if the backbone's gradients are
    averaged across ranks (DDP, FSDP): the embedding gradient is multiplied by
    the world size so that the averaged backbone gradient equals that of the
    single-process loss on the global batch. ``"sum"``: no scaling, each rank gets
    exactly ∂L/∂(its embeddings).
    """

    # the rows sampled on a shard vary per step and rank: recorded by a tensor hook (with the all-reduce
    # of the overflow flag, below), not by the single-process head's static-size gradient sink
    _records_with_hook = True

    def __init__(self, num_classes, embedding_dim, *, process_group=None, grad_reduction="mean", **kwargs):
        if process_group is None:
            raise ValueError("ShardedPartialMarginHead needs a process_group (e.g. torch.distributed.group.WORLD)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) must be at least the world size ({world}): "
                             "every rank owns at least one class")
        start, end = shard_bounds(num_classes, world, rank)
        super().__init__(end - start, embedding_dim, **kwargs)
        self.process_group, self.world_size, self.rank = process_group, world, rank
        self.shard = (start, end)
        self._global_classes = num_classes
        self.grad_reduction = grad_reduction
        self._config_crc = self._config_checksum()

    def _config_checksum(self):
        """A checksum of the arguments that must be identical on every rank (checked in every forward)."""
        cfg = (self._global_classes, self.weight.shape[1], self.m1, self.margin, self.m3, self.scale,
               self.sample_rate, self.optimizer, self.world_size, self.subcenters, self.filter_threshold,
               repr(self.loss))
        return zlib.crc32(repr(cfg).encode())

    @property
    def num_classes(self) -> int:
        return self._global_classes

    # ------------------------------------------------------------------ checks shared by every rank
    def _local_problem(self, embeddings, labels, sampled):
        """This rank's own argument errors (an error message or None), found without communication."""
        w = self.weight
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return TypeError, "embeddings and labels must be torch.Tensors"
        if embeddings.dtype not in _DTYPE_CODES:
            return TypeError, (f"embeddings must be float32, float16 or bfloat16, got {embeddings.dtype} "
                               "(float64 is not supported by the sharded head)")
        if labels.dtype != torch.int64:
            return TypeError, f"labels must be int64 class ids, got {labels.dtype}"
        if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            return ValueError, (f"embeddings must be (B, D) and labels (B,), got {tuple(embeddings.shape)} and "
                                f"{tuple(labels.shape)}")
        if embeddings.device != w.device or labels.device != w.device:
            return ValueError, (f"embeddings and labels must be on the head's device {w.device}, got "
                                f"{embeddings.device} and {labels.device}")
        if sampled is not None and (not isinstance(sampled, torch.Tensor) or sampled.dtype != torch.int64
                                    or sampled.dim() != 1):
            return TypeError, "sampled must be a 1-D int64 tensor of global class ids"
        if not dispatch.use_compiled(w.device):
            return RuntimeError, "the sharded head needs simcore's compiled kernels (backend is 'reference')"
        return None

    def _local_meta(self, embeddings, labels, sampled, problem):
        """This rank's metadata row (_META int64) for the all-gather."""
        meta = torch.zeros(_META, dtype=torch.int64)
        meta[0] = 0 if problem is None else 1
        if problem is None:
            b, d = embeddings.shape
            meta[1], meta[2], meta[3] = b, d, _DTYPE_CODES[embeddings.dtype]
            meta[12] = int(torch.is_grad_enabled() and embeddings.requires_grad)
            if b:
                lo, hi = torch.aminmax(labels)
                meta[4], meta[5] = lo.item(), hi.item()
            if sampled is not None:  # count, sum and a position-weighted checksum of the ids
                sc = sampled.cpu()
                meta[6], meta[7] = 1, sc.numel()
                meta[8] = int(sc.sum()) if sc.numel() else 0
                meta[9] = int(((sc % 1000003) * (torch.arange(sc.numel()) % 1009 + 1)).sum()) if sc.numel() else 0
        meta[10] = self._config_crc
        meta[11] = self.weight.shape[1]
        return meta

    def _exchange_meta(self, embeddings, labels, sampled):
        """All-gather every rank's metadata and raise the same error on every rank if any
        rank's input is bad; returns the local batch size of every rank."""
        problem = self._local_problem(embeddings, labels, sampled)
        dev = self.weight.device
        gathered = torch.empty(self.world_size * _META, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(gathered, self._local_meta(embeddings, labels, sampled, problem).to(dev),
                                    group=self.process_group)
        return self._check_gathered_meta(gathered.cpu().view(self.world_size, _META), problem)

    def _check_gathered_meta(self, g, problem):
        """The checks every rank runs on the (world, _META) gathered metadata, in the same order."""
        where = f"simcore sharded head (rank {self.rank} of {self.world_size})"
        bad = [k for k in range(self.world_size) if g[k, 0]]
        if bad:
            if problem is not None:
                raise problem[0](f"{where}: {problem[1]}")
            raise ValueError(f"{where}: rank(s) {bad} passed invalid arguments (see the error on those ranks)")
        if len(set(g[:, 10].tolist())) != 1 or len(set(g[:, 11].tolist())) != 1:
            raise ValueError(f"{where}: the heads differ across ranks (num_classes, embedding_dim, margins, "
                             "sample_rate or optimizer): build the head with identical arguments on every rank")
        dims = g[:, 2].tolist()
        sizes = g[:, 1].tolist()
        if any(dd != self.weight.shape[1] for dd in dims):
            raise ValueError(f"{where}: embedding dim per rank is {dims} but the head's dim is "
                             f"{self.weight.shape[1]}")
        codes = g[:, 3].tolist()
        if len(set(codes)) != 1:
            raise TypeError(f"{where}: embeddings dtype differs across ranks: "
                            f"{[_DTYPE_NAMES[c] for c in codes]}")
        if len(set(g[:, 12].tolist())) != 1:
            raise ValueError(f"{where}: embeddings require grad on ranks {g[:, 12].nonzero().flatten().tolist()} "
                             "only: every rank must take part in the backward (its reduce-scatter) or none")
        n = sum(sizes)
        if n == 0:
            raise ValueError(f"{where}: empty global batch (every rank passed 0 rows)")
        c = self.num_classes
        for k in range(self.world_size):
            if sizes[k] and (g[k, 4] < 0 or g[k, 5] >= c):
                raise ValueError(f"{where}: labels on rank {k} lie in [{int(g[k, 4])}, {int(g[k, 5])}], outside "
                                 f"the global class range [0, {c})")
        flags = g[:, 6:10]
        if len({tuple(r) for r in flags.tolist()}) != 1:
            raise ValueError(f"{where}: `sampled` must be passed on every rank or on none, and be the same "
                             "tensor of global class ids on every rank (counts/checksums differ)")
        return sizes

    # ------------------------------------------------------------------ forward
    def forward(self, embeddings, labels, *, generator=None, sampled=None, return_sampled=False):
        """Mean loss over the global batch (all ranks' rows); identical on every rank.

        ``sampled``: optional sorted global class ids (the same on every rank, containing
        every label of the global batch) used instead of sampling. ``return_sampled``:
        also return the global ids sampled *on this rank's shard*; the union over ranks
        is the global sampled set.
        """
        sizes = self._exchange_meta(embeddings, labels, sampled)
        group, dev = self.process_group, self.weight.device
        scale = float(self.world_size) if self.grad_reduction == "mean" else 1.0
        xg = _GatherRows.apply(embeddings, sizes, self.rank, group, scale)
        lab = self._gather_labels(labels, sizes)
        start, end = self.shard
        c_local = end - start
        own = (lab >= start) & (lab < end)
        local_labels = lab[own] - start
        if sampled is not None:
            sampled = sampled.to(dev)
            # same inputs on every rank: same outcome (validate="never" skips it on every rank alike)
            check_sampled(sampled, lab, self.num_classes, validate=self.validate)
            local = sampled[(sampled >= start) & (sampled < end)] - start
        else:
            k = math.ceil(self.sample_rate * c_local)
            if k >= c_local:
                local = torch.arange(c_local, device=dev)
            else:
                # the labels' range was checked on every rank in the metadata exchange
                local = sample_classes(local_labels, c_local, k, generator, validate="never").to(dev)
        tcol = torch.full((lab.shape[0],), -1, dtype=torch.int64, device=dev)
        if local.numel():
            tcol[own] = torch.searchsorted(local, local_labels)
        train = torch.is_grad_enabled() and self.training
        rows = self.gathered_rows(local)
        found = []  # one all-reduce, shared by the variant's statistic and the kernels

        def target_cos():
            if not found:
                found.append(self._global_target_cosines(xg, lab, own, start))
            return found[0]

        spec, margins, reg = self.loss_spec(xg, target_cos)
        rm = None if margins is None else per_row_margins(*margins, xg.shape[0], dev, validate=self.validate)
        tcos = target_cos() if spec.curricular_t is not None else None
        need_gx = torch.is_grad_enabled() and xg.requires_grad
        need_gm = torch.is_grad_enabled() and rm is not None and rm.requires_grad
        loss = _ShardLoss.apply(xg, rows, tcol, spec, rm, tcos, group, need_gx, train, need_gm)
        if reg is not None:
            loss = loss + self._global_mean_of_local(reg, sizes)
        return (loss, local + start) if return_sampled else loss

    def _global_target_cosines(self, xg, lab, own, start):
        """Every gathered row's target cosine: computed by the rank owning its class, then summed."""
        tc = torch.zeros(xg.shape[0], dtype=torch.float32, device=xg.device)
        if bool(own.any()):
            tc[own] = target_cosines(xg.detach()[own], lab[own] - start, self.weight, self.subcenters)
        dist.all_reduce(tc, op=dist.ReduceOp.SUM, group=self.process_group)
        return tc

    def _global_mean_of_local(self, reg, sizes):
        """Mean over the global batch of a per-row term of the gathered rows (MagFace's regulariser):
        the value is the global mean on every rank; the gradient flows from this rank's own slice
        only, so the all-gather's backward delivers it to each row once (scaled as the embeddings)."""
        r0 = sum(sizes[:self.rank])
        local = reg[r0:r0 + sizes[self.rank]].sum()
        return (local - local.detach() + reg.detach().sum()) / float(sum(sizes))

    def _gather_labels(self, labels, sizes):
        bmax = max(sizes)
        src = torch.full((bmax,), -1, dtype=torch.int64, device=self.weight.device)
        src[:labels.shape[0]] = labels
        buf = torch.empty(self.world_size * bmax, dtype=torch.int64, device=src.device)
        dist.all_gather_into_tensor(buf, src, group=self.process_group)
        return buf[buf >= 0] if any(s != bmax for s in sizes) else buf

    # ------------------------------------------------------------------ AMP and clipping across ranks
    def _record(self, centres, grad):
        """As the single-process head, plus a 0-d gradient that is inf on every rank when any rank's
        recorded rows are not finite (one scalar all-reduce per backward): each rank's GradScaler then
        finds the same inf, skips the same step and keeps the same scale (DDP needs equal scales)."""
        super()._record(centres, grad)
        rows = self._pending[0][1]
        bad = (~torch.isfinite(rows)).any().to(torch.float32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.process_group)
        self._publish([rows, torch.where(bad > 0, math.inf, 0.0)])

    def _global_norm(self, local, norm_type):
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
            return local
        powered = local.pow(norm_type)
        dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=self.process_group)
        return powered.pow(1.0 / norm_type)

    @torch.no_grad()
    def grow(self, new_centres: torch.Tensor) -> torch.Tensor:
        """Append classes whose centres are ``new_centres`` ((n·K, D), K sub-centres per class,
        class-major), a collective: call it on every rank with the *same* tensor (a checksum is
        compared). The global class count becomes C + n, so :func:`shard_bounds` moves: each rank
        sends the rows (centres and optimizer state) it no longer owns to their new rank with one
        all-to-all per buffer, and keeps the new classes that fall in its new block; their optimizer
        state starts at zero. The result equals growing a single-process head and sharding it.
        Bad input (a rank's malformed or non-finite tensor, different row counts or values across
        ranks) raises on every rank before any row moves. Returns the new global class ids."""
        k, d = self.subcenters, self.weight.shape[1]
        where = f"simcore sharded head grow (rank {self.rank} of {self.world_size})"
        problem = None
        if not isinstance(new_centres, torch.Tensor) or new_centres.dim() != 2 or new_centres.shape[1] != d \
                or not new_centres.dtype.is_floating_point or new_centres.shape[0] % k:
            rows = "n" if k == 1 else f"n·{k}"
            problem = f"new_centres must be a ({rows}, {d}) floating-point tensor"
        elif not bool(torch.isfinite(new_centres).all()):
            problem = "new_centres holds NaN or Inf"
        meta = torch.zeros(3, dtype=torch.int64)
        if problem is None:
            host = new_centres.detach().to("cpu", torch.float32).contiguous()
            meta[1], meta[2] = host.shape[0], zlib.crc32(host.numpy())
        else:
            meta[0] = 1
        dev = self.weight.device
        gathered = torch.empty(self.world_size * 3, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(gathered, meta.to(dev), group=self.process_group)
        g = gathered.cpu().view(self.world_size, 3)
        bad = g[:, 0].nonzero().flatten().tolist()
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if bad:
            raise ValueError(f"{where}: rank(s) {bad} passed invalid new_centres (see the error on those ranks)")
        if len(set(g[:, 1].tolist())) != 1:
            raise ValueError(f"{where}: the ranks passed different numbers of new centre rows {g[:, 1].tolist()}: "
                             "grow is a collective, pass the same (n·K, D) tensor on every rank")
        if len(set(g[:, 2].tolist())) != 1:
            raise ValueError(f"{where}: new_centres differ across ranks (checksums differ): pass the same tensor on "
                             "every rank (compute it identically, e.g. on the CPU, or broadcast rank 0's)")
        old, n = self._global_classes, host.shape[0] // k
        new = old + n
        world, me = self.world_size, self.rank
        ob = [shard_bounds(old, world, q) for q in range(world)]
        nb = [shard_bounds(new, world, q) for q in range(world)]
        send = [max(0, min(ob[me][1], nb[q][1]) - max(ob[me][0], nb[q][0])) * k for q in range(world)]
        recv = [max(0, min(ob[q][1], nb[me][1]) - max(ob[q][0], nb[me][0])) * k for q in range(world)]
        a, b = max(nb[me][0], old), nb[me][1]          # the new classes this rank now owns
        fresh = host[(a - old) * k:(b - old) * k] if a < b else host[:0]

        def moved(buf):
            """This rank's rows of ``buf`` in the new layout (old classes only), via one all-to-all."""
            src = buf.to(torch.float32) if buf.dtype in (torch.float16, torch.bfloat16) else buf
            out = src.new_empty((sum(recv),) + tuple(buf.shape[1:]))
            dist.all_to_all_single(out, src.contiguous(), recv, send, group=self.process_group)
            return out.to(buf.dtype)

        weight = stacked_rows([moved(self.weight.detach()), fresh.to(device=dev, dtype=self.weight.dtype)])
        states = {}
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "row_step"):
            buf = getattr(self, name, None)
            if buf is not None:
                states[name] = stacked_rows([moved(buf), buf.new_zeros((fresh.shape[0],) + tuple(buf.shape[1:]))])
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        for name, buf in states.items():
            setattr(self, name, buf)
        self._global_classes, self.shard = new, nb[me]
        self._config_crc = self._config_checksum()
        self._pieces.clear()
        self._make_sink()
        return torch.arange(old, new, device=dev)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self):
        return {"format": _FORMAT, "num_classes": self.num_classes, "embedding_dim": self.weight.shape[1],
                "world_size": self.world_size, "rank": self.rank, "start": self.shard[0], "end": self.shard[1],
                "optimizer": self.optimizer, "subcenters": self.subcenters}

    def set_extra_state(self, state):
        pass  # checked in _load_from_state_dict, before any tensor is copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        info = state_dict.get(prefix + "_extra_state")
        mine = self.get_extra_state()
        if not isinstance(info, dict) or info.get("format") != _FORMAT:
            raise ValueError(f"rank {self.rank}: this state dict was not saved by a sharded head; load it with "
                             "simcore.load_resharded(head, [state_dict])")
        if any(info.get(k) != mine[k] for k in mine):
            raise ValueError(
                f"rank {self.rank}: checkpoint shard mismatch: it was saved by rank {info.get('rank')} of world size "
                f"{info.get('world_size')} (classes [{info.get('start')}, {info.get('end')}) of "
                f"{info.get('num_classes')}, dim {info.get('embedding_dim')}, optimizer {info.get('optimizer')!r}) "
                f"but this head is rank {self.rank} of {self.world_size} (classes [{self.shard[0]}, {self.shard[1]}) "
                f"of {self.num_classes}, dim {self.weight.shape[1]}, optimizer {self.optimizer!r}). To change the "
                "world size, pass every rank's saved state dict to simcore.load_resharded(head, shards)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        return (super().extra_repr() + f", rank={self.rank}, world_size={self.world_size}, "
                f"shard=[{self.shard[0]}, {self.shard[1]}), grad_reduction={self.grad_reduction!r}")


def _shard_info(sd, prefix, subcenters):
    info = sd.get(prefix + "_extra_state")
    if isinstance(info, dict) and info.get("format") == _FORMAT:
        return {"subcenters": 1, **info}
    w = sd.get(prefix + "weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"not a margin-head state dict: no 2-D {prefix + 'weight'!r}")
    c = w.shape[0] // subcenters  # a single-process head: its rows are classes x sub-centres
    return {"num_classes": c, "embedding_dim": w.shape[1], "world_size": 1, "rank": 0, "start": 0,
            "end": c, "optimizer": None, "subcenters": subcenters}


@torch.no_grad()
def load_resharded(head: PartialMarginHead, shards: Sequence, *, prefix: str = "") -> None:
    """Load centres and optimizer state saved at any world size into ``head`` (sharded
    at any world size, or a single-process :class:`simcore.PartialMarginHead`).

    ``shards``: the state dicts (or paths for ``torch.load``) saved from *every* rank
    (``head.state_dict()`` on each), in any order, or one single-process state dict.
    Each rank copies only its own rows; paths are memory-mapped, so a rank reads only
    the pages it needs. ``prefix``: the head's key prefix in the saved dicts (e.g.
    ``"head."`` for a whole model's state dict). No communication.
    """
    loaded = [torch.load(s, map_location="cpu", mmap=True, weights_only=True) if isinstance(s, (str, bytes))
              or hasattr(s, "__fspath__") else s for s in shards]
    if not loaded:
        raise ValueError("load_resharded needs at least one state dict")
    k = head.subcenters
    infos = [_shard_info(sd, prefix, k) for sd in loaded]
    if any(i["subcenters"] != k for i in infos):
        raise ValueError(f"the checkpoint has {infos[0]['subcenters']} sub-centres per class but the head has {k}")
    c, d = infos[0]["num_classes"], infos[0]["embedding_dim"]
    world = infos[0]["world_size"]
    if any(i["num_classes"] != c or i["embedding_dim"] != d or i["world_size"] != world for i in infos):
        raise ValueError("the shards disagree on num_classes, embedding_dim or world_size")
    if len(loaded) != world or sorted(i["rank"] for i in infos) != list(range(world)):
        raise ValueError(f"the checkpoint was saved at world size {world} but {len(loaded)} shard(s) were given "
                         f"(ranks {sorted(i['rank'] for i in infos)}): pass every rank's state dict")
    for i in infos:
        if (i["start"], i["end"]) != shard_bounds(c, world, i["rank"]):
            raise ValueError(f"shard of rank {i['rank']} holds classes [{i['start']}, {i['end']}), expected "
                             f"{shard_bounds(c, world, i['rank'])}")
    if c != head.num_classes or d != head.weight.shape[1]:
        raise ValueError(f"the checkpoint holds {c} classes of dim {d} but the head has {head.num_classes} of dim "
                         f"{head.weight.shape[1]}")
    opt = {i["optimizer"] for i in infos} - {None}
    if opt and opt != {head.optimizer}:
        raise ValueError(f"the checkpoint's optimizer is {opt.pop()!r} but the head's is {head.optimizer!r}")
    lo, hi = getattr(head, "shard", (0, head.num_classes))
    own = head.state_dict()
    targets = {key: v for key, v in own.items() if isinstance(v, torch.Tensor)}
    for key, dst in targets.items():
        if key.startswith("loss."):  # the variant's statistics (EMAs, step): the same on every rank
            src = loaded[0].get(prefix + key)
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
                raise ValueError(f"{prefix + key!r} is missing or has the wrong shape")
            dst.copy_(src)
            continue
        if dst.dim() == 0 or dst.shape[0] != (hi - lo) * k:
            raise ValueError(f"cannot reshard {key!r} of shape {tuple(dst.shape)}")
        for sd, info in zip(loaded, infos):
            a, b = max(lo, info["start"]), min(hi, info["end"])
            if a >= b:
                continue
            src = sd.get(prefix + key)
            if not isinstance(src, torch.Tensor) or src.shape[1:] != dst.shape[1:] \
                    or src.shape[0] != (info["end"] - info["start"]) * k:
                raise ValueError(f"shard of rank {info['rank']}: {prefix + key!r} is missing or has the wrong shape")
            dst[(a - lo) * k:(b - lo) * k].copy_(src[(a - info["start"]) * k:(b - info["start"]) * k])
    head.discard_recorded_gradients()
