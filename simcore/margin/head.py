"""PartialMarginHead: class centres for a margin-softmax loss with a truly sparse optimizer.

``PartialMarginHead(..., process_group=g)`` returns the class-sharded subclass
without this module importing it: a subclass declared with
``class ShardedPartialMarginHead(PartialMarginHead, sharded_form=True)``
registers itself as the head's sharded form when its module is imported
(:mod:`simcore.margin.sharded`, which ``import simcore`` always imports), and
``__new__`` builds that class when a process group is given. The dependency
runs one way only: sharded → head.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from simcore.margin.checks import (FLOAT_DTYPES, check_dynamic_scalars, check_family, check_inputs, check_margins,
                                   check_validate, margin_dtype, per_row_margins)
from simcore.margin.engine import MarginSpec, centre_ids, target_cosines
from simcore.margin.ops import runs_compiled, sampled_margin_loss
from simcore.margin.row_optimizer import row_adamw_, row_sgd_, row_table, stacked_rows
from simcore.margin.sampling import check_sampled, sample_classes

__all__ = ["PartialMarginHead", "HeadOptimizer"]

_SGD_KEYS, _ADAMW_KEYS = ("lr", "momentum", "weight_decay"), ("lr", "betas", "eps", "weight_decay")


class HeadOptimizer(torch.optim.Optimizer):
    """``head.row_optimizer``: the head's row-wise optimizer seen as a ``torch.optim.Optimizer``,
    so that PyTorch's tools drive it unchanged: ``scaler.unscale_`` / ``scaler.step`` of a
    ``torch.amp.GradScaler`` (unscale, inf/NaN check, skipped step, the scale's update),
    ``torch.optim.lr_scheduler`` (its one param group holds the head's ``lr`` and, for
    ``"sgd"``, ``momentum`` or, for ``"adamw"``, ``betas``, ``eps``, plus ``weight_decay``).

    Its parameter is a stand-in whose ``.grad`` is the recorded gradient of the sampled
    centre rows ((n, D) float32, duplicates summed), so GradScaler checks and unscales
    exactly the rows the step applies. The optimizer state lives in the head's buffers.
    """

    # GradScaler.step then hands step() ``grad_scale`` and ``found_inf`` tensors instead of
    # reading found_inf on the host: the skip happens on the device, with no synchronisation.
    _step_supports_amp_scaling = True

    def __init__(self, head, defaults):
        self._head = head
        # capturable: the step reads nothing on the host (no synchronisation, CUDA-graph safe); and
        # torch.compile adds the key to a param group that lacks it, which would recompile once
        super().__init__(head._sink_params, {**defaults, "capturable": True})
        # the same list the head's forward publishes: a traced step sees one object throughout
        self.param_groups[0]["params"] = head._sink_params

    @torch.no_grad()
    def step(self, closure=None):
        """The head's update of the recorded rows (unscaled by ``grad_scale`` and skipped
        where ``found_inf`` is set, when GradScaler.step passes them); returns the row ids."""
        if closure is not None:
            raise RuntimeError("the head's optimizer takes no closure")
        return self._head._apply_recorded(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._head.discard_recorded_gradients()

    def __getstate__(self):  # copies and pickles keep the link to their head
        return {**super().__getstate__(), "_head": self._head}


def _stand_in(grad):
    """A leaf tensor of ``grad``'s shape, backed by one element, whose ``.grad`` is ``grad``."""
    holder = grad.new_zeros(()).expand(grad.shape)
    holder.grad = grad
    return holder


class _GatherRecorded(torch.autograd.Function):
    """``weight.index_select(0, centres)`` whose gradient goes to ``sink`` (a float32 leaf of the
    rows' shape, one element of storage): autograd itself records the rows' gradient in
    ``sink.grad``, with no hook and no Python side effect in backward, so ``torch.compile``
    traces a whole training step (forward, backward, ``head.step()``) as one graph."""

    @staticmethod
    def forward(ctx, weight, centres, sink):
        return weight.index_select(0, centres)

    @staticmethod
    def backward(ctx, grad):
        return None, None, grad.to(torch.float32)


class _Hyperparameter:
    """A head attribute (``lr``, ``momentum``, ...) stored in ``row_optimizer.param_groups[0]`` when
    the head's optimizer uses it (so that schedulers reach it), else on the head."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, head, owner=None):
        if head is None:
            return self
        group = head.row_optimizer.param_groups[0]
        return group[self.name] if self.name in group else head._unused_hyperparameters[self.name]

    def __set__(self, head, value):
        group = head.row_optimizer.param_groups[0]
        (group if self.name in group else head._unused_hyperparameters)[self.name] = value


def _check_head_args(num_classes, embedding_dim, dtype, lr, momentum, weight_decay, eps, betas, sample_rate,
                     optimizer, loss):
    """The constructor's arguments besides the margins and the family options."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if loss is not None and not (isinstance(loss, nn.Module) and hasattr(loss, "kernel_args")):
        raise TypeError(f"loss must be one of simcore's margin-family modules (simcore.ArcFace, CamSoftmax, "
                        f"AdaFace, MagFace, CurricularFace), got {type(loss).__name__}")


class PartialMarginHead(nn.Module):
    """Class centres for a margin-softmax loss over sampled classes, with a truly
    sparse update: each step touches only the sampled rows of the centres and of
    their optimizer state (InsightFace's PartialFC V1 behaviour).

    The centres (``weight``, (C, D)) are a parameter with ``requires_grad=False``:
    standard optimizers and DDP ignore it. ``loss.backward()`` sends the embedding
    gradient to the backbone as usual and records the gradient of the sampled
    centre rows in the head; ``head.step()`` then applies the head's own row-wise
    optimizer ("sgd": momentum + L2 weight decay, PyTorch SGD semantics; "adamw":
    Adam with per-row step counts and decoupled weight decay, on sampled rows only)::

        head = PartialMarginHead(num_classes, 512, margin=0.5, scale=64.0, sample_rate=0.1, lr=0.1)
        opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
        for images, labels in loader:
            loss = head(backbone(images), labels)
            opt.zero_grad(); head.zero_grad()
            loss.backward()
            opt.step(); head.step()

    ``head.row_optimizer`` is that optimizer as a ``torch.optim.Optimizer``: LR
    schedulers drive it (``head.lr`` is its param group's ``lr``) and, under AMP,
    ``scaler.unscale_(head.row_optimizer)``, ``head.clip_grad_norm_(max_norm)`` and
    ``scaler.step(head.row_optimizer)`` unscale, clip and step it (skipping the step on
    inf/NaN) as for the backbone (docs/margin_softmax.md, "Training on GPUs").
    Gradients from several backward passes before ``step()`` accumulate (duplicate
    rows are summed).

    ``process_group`` (a ``torch.distributed`` group): the centres are sharded
    across its ranks and the constructor returns a
    :class:`simcore.ShardedPartialMarginHead` (docs/distributed.md).

    ``validate``: how the forward checks values that live on the device (label range,
    ``sampled=`` ids, per-row margins, CurricularFace's t, a scheduled Cam-Softmax
    exponent), :func:`simcore.margin.checks.value_check`:
    ``"first"`` (default) reads them on the host for CPU tensors and, for CUDA tensors,
    on the first call per input shape, then checks them on the device with
    ``torch._assert_async`` (no synchronisation); ``"always"`` reads them on every call
    (one synchronisation each on CUDA); ``"never"`` skips them. Types, shapes and
    devices are checked on every call. A steady-state step of this head on CUDA issues
    no host synchronisation (docs/margin_softmax.md, "What syncs remain").
    """

    _sharded_form = None  # the subclass declared with sharded_form=True (simcore.margin.sharded)
    _records_with_hook = False  # True: record row gradients with a tensor hook (the sharded head)

    def __init_subclass__(cls, *, sharded_form=False, **kwargs):
        super().__init_subclass__(**kwargs)
        if sharded_form:
            PartialMarginHead._sharded_form = cls

    def __new__(cls, *args, process_group=None, **kwargs):
        if process_group is not None and cls is PartialMarginHead:
            if PartialMarginHead._sharded_form is None:
                raise RuntimeError("no sharded head is registered: import simcore.margin.sharded")
            cls = PartialMarginHead._sharded_form
        return super().__new__(cls)

    def __init__(self, num_classes, embedding_dim, *, margin=0.5, scale=64.0, sample_rate=0.1, m1=1.0, m3=0.0,
                 optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                 device=None, dtype=None, process_group=None, loss=None, subcenters=1, filter_threshold=None,
                 validate="first"):
        super().__init__()
        if process_group is not None:  # PartialMarginHead(...) itself dispatches in __new__
            raise ValueError(f"{type(self).__name__} does not shard: use PartialMarginHead(..., process_group=g) "
                             "or simcore.ShardedPartialMarginHead")
        _check_head_args(num_classes, embedding_dim, dtype, lr, momentum, weight_decay, eps, betas, sample_rate,
                         optimizer, loss)
        check_margins(m1, margin, m3, scale)
        check_family(subcenters, filter_threshold)
        self.validate = check_validate(validate)
        self.loss = loss  # a submodule: its statistics (EMAs) are saved with the head
        self.subcenters, self.filter_threshold = subcenters, filter_threshold
        self.m1, self.margin, self.m3, self.scale, self.sample_rate = m1, margin, m3, scale, sample_rate
        self.optimizer = optimizer
        self.weight = nn.Parameter(row_table((num_classes * subcenters, embedding_dim), device=device, dtype=dtype),
                                   requires_grad=False)
        nn.init.normal_(self.weight, std=0.01)
        hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        used = _SGD_KEYS if optimizer == "sgd" else _ADAMW_KEYS
        # Recorded row gradients: ``_sink.grad`` for the rows ``_sink_ids`` of the latest forward
        # (the usual case, see _GatherRecorded), plus ``_pieces`` [(centre row ids, float32 rows)]
        # from hook-recorded passes and earlier passes of an accumulation; ``_pending`` merges them.
        self._pieces = []
        self.register_buffer("_sink_ids", torch.empty(0, dtype=torch.int64, device=self.weight.device),
                             persistent=False)
        self._make_sink()
        self.row_optimizer = HeadOptimizer(self, {k: v for k, v in hyper.items() if k in used})
        self._unused_hyperparameters = {k: v for k, v in hyper.items() if k not in used}
        self._init_state(num_classes * subcenters)

    def _sink_rows(self):
        """Rows gathered per step when every step samples ceil(sample_rate·C) classes (static)."""
        c = self.weight.shape[0] // self.subcenters
        return min(c, math.ceil(self.sample_rate * c)) * self.subcenters

    def _make_sink(self):
        """The gradient sink of :class:`_GatherRecorded`: a float32 leaf of the gathered rows' shape
        backed by one element (no memory beyond its gradient)."""
        rows, d = self._sink_rows(), self.weight.shape[1]  # (the sharded head: its own shard's rows)
        self._sink = torch.zeros((), dtype=torch.float32, device=self.weight.device).expand(rows, d)
        self._sink.requires_grad_(True)
        self._sink_params = [self._sink]
        if hasattr(self, "row_optimizer"):
            self.row_optimizer.param_groups[0]["params"] = self._sink_params
        if self._sink_ids.shape != (rows,) or self._sink_ids.device != self.weight.device:
            self._sink_ids = torch.zeros(rows, dtype=torch.int64, device=self.weight.device)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the sink follows the weight
        out = super()._apply(fn, recurse)
        if hasattr(self, "_sink") and (self._sink.device != self.weight.device):
            self._discard_sink()
            self._make_sink()
        return out

    def _discard_sink(self):
        self._sink.grad = None

    @property
    def _pending(self):
        """The recorded gradient as [(centre row ids, float32 rows)] (at most one pair: duplicate
        rows of several backward passes summed)."""
        return self._consolidate()

    lr = _Hyperparameter()
    momentum = _Hyperparameter()
    weight_decay = _Hyperparameter()
    betas = _Hyperparameter()
    eps = _Hyperparameter()

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] // self.subcenters

    def _init_state(self, rows):
        like = dict(device=self.weight.device, dtype=torch.float32)
        d = self.weight.shape[1]
        if self.optimizer == "sgd":
            self.register_buffer("momentum_buffer", row_table((rows, d), **like).zero_() if self.momentum else None)
        else:
            self.register_buffer("exp_avg", row_table((rows, d), **like).zero_())
            self.register_buffer("exp_avg_sq", row_table((rows, d), **like).zero_())
            self.register_buffer("row_step", row_table((rows,), dtype=torch.int64, device=self.weight.device).zero_())

    def forward(self, embeddings, labels, *, generator=None, sampled=None, return_sampled=False):
        """Loss (mean over the batch) over the positives plus sampled negatives.
        ``sampled``: use these sorted unique class ids (they must include every
        label) instead of drawing them."""
        w = self.weight
        check_inputs(embeddings, labels, w, self.sample_rate, None, "mean", subcenters=self.subcenters,
                     validate=self.validate)
        num_samples = math.ceil(self.sample_rate * self.num_classes)
        if sampled is not None:
            check_sampled(sampled, labels, self.num_classes, validate=self.validate)
        elif num_samples >= self.num_classes:
            sampled = torch.arange(self.num_classes, device=labels.device)
        else:  # the labels are checked above
            sampled = sample_classes(labels, self.num_classes, num_samples, generator, validate="never")
        loss = self._sampled_loss(embeddings, labels, sampled)
        return (loss, sampled) if return_sampled else loss

    def _sampled_loss(self, embeddings, labels, sampled):
        """The mean loss over the classes ``sampled``. With the compiled ops the engine reads the
        sampled centres straight from ``weight`` and, in training, writes their gradient rows
        into the sink: no (S·K, D) copy of the rows is gathered. Otherwise the rows are gathered."""
        centres = centre_ids(sampled, self.subcenters)
        recording = torch.is_grad_enabled() and self.training
        if runs_compiled(embeddings, self.weight) and (not recording or self._static_sink_fits(centres)):
            sink = self._arm_sink(centres) if recording else None
            return self._margin_loss(embeddings, labels, self.weight, sampled, row_sink=sink)
        rows = self.gathered_rows(sampled)
        target = torch.searchsorted(sampled, labels)
        return self._margin_loss(embeddings, target, rows, torch.arange(sampled.numel(), device=sampled.device))

    def _static_sink_fits(self, centres):
        """Whether the gradient sink records these rows (else a tensor hook does)."""
        return (not self._records_with_hook and centres.shape == self._sink_ids.shape
                and self._sink.device == self.weight.device)

    def _arm_sink(self, centres):
        """The sink, set to record the gradient of rows ``centres`` (an earlier backward pass's
        rows not yet applied are kept aside first)."""
        sink = self._sink
        if sink.grad is not None:
            self._pieces.append((self._sink_ids.clone(), sink.grad))
            sink.grad = None
        self._sink_ids.copy_(centres)
        if not self._pieces:
            self.row_optimizer.param_groups[0]["params"] = self._sink_params
        else:
            self._publish([g for _, g in self._pieces] + [None])
        return sink

    def gathered_rows(self, classes):
        """The centre rows of ``classes`` (their K sub-centres each), gathered; in training with
        gradients on, their gradient is recorded for :meth:`step`."""
        centres = centre_ids(classes, self.subcenters)
        if not (torch.is_grad_enabled() and self.training):
            return self.weight.index_select(0, centres)
        if not self._static_sink_fits(centres):
            # a size other than the static one (more labels than sampled classes, a caller's
            # `sampled`, the sharded head): the gradient is recorded by a hook, as before issue 14
            rows = self.weight.index_select(0, centres)
            rows.requires_grad_(True)
            rows.register_hook(lambda g: self._record(centres, g))
            return rows
        return _GatherRecorded.apply(self.weight, centres, self._arm_sink(centres))

    def _consolidate(self):
        """The recorded gradient as [(centre row ids, float32 rows)], at most one pair. The usual
        case (one backward pass since the last step) is the sink's gradient as it is; several
        pieces (gradients of several backward passes accumulated before ``step()``) are merged
        into one with a unique over their ids (data-dependent: a synchronisation on CUDA)."""
        sink = self._sink
        if sink.grad is not None and not self._pieces:
            return [(self._sink_ids, sink.grad)]
        if sink.grad is not None:
            self._pieces.append((self._sink_ids.clone(), sink.grad))
            sink.grad = None
        if len(self._pieces) > 1:
            ids = torch.cat([i for i, _ in self._pieces])
            rows = torch.cat([g for _, g in self._pieces])
            centres, inverse = torch.unique(ids, return_inverse=True)
            grad = rows.new_zeros(centres.numel(), rows.shape[1]).index_add_(0, inverse, rows)
            self._pieces[:] = [(centres, grad)]
            self._publish([grad])
        return list(self._pieces)

    def _record(self, centres, grad):
        """Add one backward pass's gradient of rows ``centres`` to the recorded one, and show it
        to ``row_optimizer`` (GradScaler reads it there)."""
        self._pieces.append((centres, grad.detach().to(torch.float32)))
        self._publish([self._consolidate()[0][1]])

    def _publish(self, grads):
        """Show ``grads`` to ``row_optimizer``; None stands for the sink (its gradient to come)."""
        self.row_optimizer.param_groups[0]["params"] = [self._sink if g is None else _stand_in(g) for g in grads]

    def _margin_loss(self, embeddings, labels, weight, sampled, row_sink=None):
        """Mean loss of the head's variant over the classes ``sampled`` of ``weight`` (the centres,
        or gathered rows with ``labels`` their positions); ``row_sink``: see sampled_margin_loss."""
        spec, margins, reg = self.loss_spec(embeddings,
                                            lambda: target_cosines(embeddings, labels, weight, self.subcenters))
        rm = None if margins is None else per_row_margins(*margins, embeddings.shape[0], embeddings.device,
                                                          margin_dtype(embeddings), validate=self.validate)
        loss = sampled_margin_loss(embeddings, labels, weight, sampled, spec, "mean", rm, row_sink=row_sink)
        return loss if reg is None else loss + reg.mean().to(loss.dtype)

    def loss_spec(self, embeddings, target_cos):
        """(MarginSpec, per-row (m1, m2, m3) or None, per-row regulariser or None) of this batch:
        the head's own margins, or its ``loss`` module's (which may update its statistics;
        ``target_cos()`` gives the rows' target cosines when a statistic needs them)."""
        family = dict(subcenters=self.subcenters,
                      filter_threshold=math.inf if self.filter_threshold is None else float(self.filter_threshold))
        if self.loss is None:
            return MarginSpec(self.m1, self.margin, self.m3, self.scale, **family), None, None
        fields, margins, reg = self.loss.kernel_args(embeddings, target_cos)
        # tensor state (CurricularFace's t, a scheduled Cam-Softmax exponent) reaches the kernels unread
        check_dynamic_scalars(fields.get("cam_power"), fields.get("curricular_t"), self.validate)
        return MarginSpec(**fields, **family), margins, reg

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the recorded centre gradients (and any parameter gradients)."""
        super().zero_grad(set_to_none)
        self._pieces.clear()
        self._discard_sink()

    def discard_recorded_gradients(self):
        """Forget the recorded centre gradients only."""
        self._pieces.clear()
        self._discard_sink()
        self.row_optimizer.param_groups[0]["params"] = self._sink_params

    def step(self):
        """Apply the recorded gradients to the sampled rows only; returns the updated row ids.
        The same as ``row_optimizer.step()``; under AMP call ``scaler.step(head.row_optimizer)``."""
        return self.row_optimizer.step()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the recorded centre gradient as ``torch.nn.utils.clip_grad_norm_`` clips the
        equivalent dense (C, D) gradient (of all ranks, for the sharded head); returns the total
        norm as a tensor (no host synchronisation). Under AMP, ``scaler.unscale_(head.row_optimizer)``
        first."""
        norm_type = float(norm_type)
        pending = self._pending
        grad = pending[0][1] if pending else self.weight.new_zeros(0, dtype=torch.float32)
        total = self._global_norm(torch.linalg.vector_norm(grad, norm_type), norm_type)
        grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def _global_norm(self, local, norm_type):
        """The gradient norm over every shard (one all-reduce in the sharded head)."""
        return local

    def _apply_recorded(self, grad_scale=None, found_inf=None):
        """The update of the recorded rows; ``grad_scale``: the loss scale still in the gradient;
        ``found_inf``: a tensor, > 0 means keep rows and state as they are (GradScaler's skip)."""
        pending = self._pending
        if not pending:
            return None
        idx, grad = pending[0]
        self.discard_recorded_gradients()
        # one fused pass over the rows and their state, in place (simcore.margin.row_optimizer)
        if self.optimizer == "sgd":
            momentum_buffer = None
            if self.momentum:
                if self.momentum_buffer is None:
                    raise RuntimeError("this head was built with momentum=0 and has no momentum buffer; "
                                       "build it with the momentum it will use")
                momentum_buffer = self.momentum_buffer
            row_sgd_(self.weight, idx, grad, momentum_buffer, grad_scale, found_inf, lr=self.lr,
                     momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            row_adamw_(self.weight, idx, grad, self.exp_avg, self.exp_avg_sq, self.row_step, grad_scale, found_inf,
                       lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        return idx

    @torch.no_grad()
    def grow(self, new_centres: torch.Tensor) -> torch.Tensor:
        """Append classes whose centres are ``new_centres`` (n, D) (drip training: e.g.
        :meth:`centres_from_embeddings` of the model's own embeddings). Their optimizer
        state starts at zero. Returns the new class ids."""
        if not isinstance(new_centres, torch.Tensor) or new_centres.dim() != 2 \
                or new_centres.shape[1] != self.weight.shape[1] or new_centres.shape[0] % self.subcenters:
            rows = "n" if self.subcenters == 1 else f"n·{self.subcenters}"  # K sub-centres per class, class-major
            raise ValueError(f"new_centres must be a ({rows}, {self.weight.shape[1]}) tensor")
        if not torch.isfinite(new_centres).all():
            raise ValueError("new_centres holds NaN or Inf")
        old = self.num_classes
        n = new_centres.shape[0]  # rows (n / K classes)
        self.weight = nn.Parameter(stacked_rows([self.weight, new_centres.to(self.weight)]), requires_grad=False)
        for name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "row_step"):
            buf = getattr(self, name, None)
            if buf is not None:
                setattr(self, name, stacked_rows([buf, buf.new_zeros((n,) + buf.shape[1:])]))
        self._pieces.clear()
        self._make_sink()
        return torch.arange(old, old + n // self.subcenters, device=self.weight.device)

    @staticmethod
    @torch.no_grad()
    def centres_from_embeddings(embeddings: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean of the L2-normalised ``embeddings`` per group id (0..G−1), e.g. a clean
        image and its augmented copies: the centre rows for :meth:`grow`."""
        if groups.dtype != torch.int64 or groups.dim() != 1 or groups.shape[0] != embeddings.shape[0]:
            raise ValueError("groups must be int64 of shape (n,) matching embeddings")
        if groups.numel() and groups.min().item() < 0:
            raise ValueError(f"groups must be ids >= 0, got {groups.min().item()}")
        x = torch.nn.functional.normalize(embeddings.float(), dim=1)
        g = int(groups.max().item()) + 1 if groups.numel() else 0
        sums = torch.zeros(g, x.shape[1], device=x.device).index_add_(0, groups, x)
        counts = torch.bincount(groups, minlength=g).clamp_min(1).unsqueeze(1)
        return sums / counts

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_dim={self.weight.shape[1]}, m1={self.m1}, "
                f"margin={self.margin}, m3={self.m3}, scale={self.scale}, sample_rate={self.sample_rate}, "
                f"optimizer={self.optimizer!r}, lr={self.lr}, subcenters={self.subcenters}, "
                f"filter_threshold={self.filter_threshold}")
