"""A whole training step on the CPU: simcore's head against the heads a user would otherwise pick,
the head's share of the step, its memory, and the data loader's rate against the step's (issue 15).

Run (main env, no timm: SmallCNN; 10k and 100k classes; 53 s on 2 shared cores with 1 thread):
    SIMCORE_BENCH_THREADS=1 python -m pytest benchmarks/bench_train.py -q -s
With timm (resnet18) and the 1M-class group (6.5 minutes there, 4.6 GB peak RSS; RESULTS.md):
    SIMCORE_BENCH_THREADS=1 SIMCORE_BENCH_CLASSES=10000,100000,1000000 \
        python -m pytest benchmarks/bench_train.py -q -s
Environment: SIMCORE_BENCH_CLASSES (comma-separated class counts, default 10000,100000),
SIMCORE_BENCH_BACKBONE (default resnet18 when timm imports, else smallcnn),
SIMCORE_BENCH_IMAGE_SIZE (64), SIMCORE_BENCH_BATCH (64), SIMCORE_BENCH_DIM (128),
SIMCORE_BENCH_THREADS (torch's intra-op threads for this module; default: torch's own). On the shared
machine under load (load average 5-7 on 2 cores) 2 threads make every small op wait for a descheduled
OpenMP thread: the head alone at 10k classes took 140 ms with 2 threads and 2.3 ms with 1
(sr=0.1), so the recorded runs use SIMCORE_BENCH_THREADS=1.

A step = backbone forward + head/loss + backward + both optimizer steps; every head uses SGD with
momentum 0.9 (InsightFace's choice; one optimizer state per centre), the backbone SGD with momentum.
Per class count (group ``train-<C>``), rows:
  simcore sr=0.1, simcore sr=1.0   simcore.PartialMarginHead (ArcFace m=0.4, s=40; its sparse row SGD)
  pml ArcFaceLoss (peer)            pytorch-metric-learning ArcFaceLoss, torch.optim.SGD on its W
  dense Linear + eager ArcFace      normalise W and x, cos, margin on the target, scale, F.cross_entropy;
                                    torch.optim.SGD on W (InsightFace's single-process path)
  backbone + trivial loss           the same step with the head replaced by mean(emb²): the head's share
                                    of a step is 1 - t(trivial) / t(step)
  head alone: ...                   the head's forward+backward+optimizer step on fixed embeddings (B, D)
  3 GEMMs (floor)                   torch.mm at (B, S, D), S = ceil(0.1 C): the head floor of sr=0.1
Memory: peak bytes of torch's CPU allocator during one call (benchmarks/conftest.py, after a warm-up
call so that lazily allocated optimizer state counts as held), plus the head's persistent state
(centres + optimizer state, counted from the tensors) in ``state_bytes``.
Group ``data-loading``: simcore.isc.data.ImageDataset with the training augmentation
(simcore.isc.train's RandomAugment) over a folder of JPEGs cut from scikit-image's photographs,
through simcore.isc.data.make_loader, in-process and with 1 and 2 worker processes.

Floor and predictions (written before the first run). Head GEMMs: 3·2·B·S·D FLOPs. At B=64, D=128:
  10k classes:  sr=0.1 S=1,000 -> 0.049 GFLOP; sr=1.0 -> 0.49 GFLOP
  100k:         sr=0.1 -> 0.49 GFLOP;          sr=1.0 -> 4.9 GFLOP
  1M:           sr=0.1 -> 4.9 GFLOP;           sr=1.0 (and the dense peers) -> 49 GFLOP
At the ~50-135 GFLOP/s of torch.mm on 2 threads here (RESULTS.md), the 1M/0.1 head floor is
36-100 ms. resnet18 at 64 px is ~0.30 GFLOP/image forward, ~0.9 fwd+bwd: ~57 GFLOP a step of 64,
0.4-1.1 s at the same rates (small convolutions run below it). Beyond the GEMMs the sparse head moves
the sampled rows (S·D·4 = 51 MB at 1M/0.1) a handful of times (gather, gradient, momentum rows,
updated rows written back): ~0.3-0.5 GB of traffic, 50-100 ms. Prediction: at 1M/0.1 the head is
~10-20 % of a resnet18 step (the claim to check says <= 10 %). Memory: centres C·D·4 = 512 MB and
one momentum state as much (1.02 GB held at 1M), plus during a step ~5 copies of the sampled rows
(~250 MB) and a B×S cosine block (<= 26 MB); the dense peers hold the same 1.02 GB and add during
a step a full weight gradient (512 MB), a normalised copy of W (512 MB) and several B×C logit
temporaries (256 MB each).
The dense peers at 1M: ~49 GFLOP of GEMMs plus ~10 passes over 64M logits: predicted 1-3 s a
step beside the backbone, which they can run in on this machine (~3 GB transient): they are run.

Every ratio that counts is taken between rows of one run; the summary at the end prints them.
"""
import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F

import simcore
from conftest import peak_memory_bytes

B = int(os.environ.get("SIMCORE_BENCH_BATCH", 64))
D = int(os.environ.get("SIMCORE_BENCH_DIM", 128))
IMAGE_SIZE = int(os.environ.get("SIMCORE_BENCH_IMAGE_SIZE", 64))
THREADS = int(os.environ.get("SIMCORE_BENCH_THREADS", 0)) or None   # None: torch's default
CLASSES = [int(c) for c in os.environ.get("SIMCORE_BENCH_CLASSES", "10000,100000").split(",") if c.strip()]
MARGIN, SCALE, LR_HEAD, LR_BB, MOMENTUM = 0.4, 40.0, 0.1, 0.01, 0.9
ROUNDS_STEP, ROUNDS_HEAD = 5, 5
LOADER_BATCHES = 3          # batches per timed call of the data-loading rows


def _pick_backbone():
    name = os.environ.get("SIMCORE_BENCH_BACKBONE")
    if name:
        return name, ""
    try:
        import timm  # noqa: F401
        return "resnet18", ""
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing inside timm
        return "smallcnn", f"timm not importable ({type(e).__name__}: {e}); fallback: simcore.isc.backbones.SmallCNN"


BACKBONE, BACKBONE_NOTE = _pick_backbone()
SUMMARY = {}   # (group, key) -> dict(median, peak, state, items)


def _label(c):
    return f"{c // 1_000_000}M" if c % 1_000_000 == 0 else f"{c // 1000}k"


def _backbone():
    from simcore.isc.backbones import backbone_spec, build_backbone
    torch.manual_seed(0)
    model = build_backbone(backbone_spec(BACKBONE, D, IMAGE_SIZE))
    return model, torch.optim.SGD(model.parameters(), lr=LR_BB, momentum=MOMENTUM)


class DenseArcFace(torch.nn.Module):
    """InsightFace's single-process ArcFace: nn.Linear weights, normalised W and x, cosines, the
    additive angular margin on the target, scale, cross-entropy; W trained by a dense optimizer."""

    def __init__(self, c, d, margin=MARGIN, scale=SCALE):
        super().__init__()
        self.fc = torch.nn.Linear(d, c, bias=False)
        torch.nn.init.normal_(self.fc.weight, std=0.01)
        self.cos_m, self.sin_m, self.scale = math.cos(margin), math.sin(margin), scale

    def forward(self, x, y):
        cos = F.linear(F.normalize(x), F.normalize(self.fc.weight)).clamp(-1, 1)
        t = cos.gather(1, y[:, None])
        phi = t * self.cos_m - (1 - t * t).clamp_min(0).sqrt() * self.sin_m   # cos(θ + m)
        return F.cross_entropy(cos.scatter(1, y[:, None], phi) * self.scale, y)


def _head(kind, c):
    """(loss module (emb, labels) -> loss, head optimizer step, head zero_grad, persistent state tensors)."""
    if kind.startswith("simcore"):
        sr = 0.1 if "0.1" in kind else 1.0
        opt = "adamw" if "adamw" in kind else "sgd"
        head = simcore.PartialMarginHead(c, D, margin=MARGIN, scale=SCALE, sample_rate=sr, optimizer=opt,
                                         lr=LR_HEAD, momentum=MOMENTUM)
        state = lambda: [head.weight] + [b for n, b in head.named_buffers() if not n.startswith("_")]  # noqa: E731
        return head, head.step, head.zero_grad, state
    if kind == "pml":
        losses = pytest.importorskip("pytorch_metric_learning.losses")
        head = losses.ArcFaceLoss(num_classes=c, embedding_size=D, margin=math.degrees(MARGIN), scale=SCALE)
    elif kind == "dense":
        head = DenseArcFace(c, D)
    else:
        raise ValueError(kind)
    opt = torch.optim.SGD(head.parameters(), lr=LR_HEAD, momentum=MOMENTUM)
    state = lambda: list(head.parameters()) + [t for s in opt.state.values() for t in s.values()  # noqa: E731
                                               if isinstance(t, torch.Tensor)]
    return head, opt.step, lambda: opt.zero_grad(set_to_none=True), state


def _data(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(c, (B,), generator=g)


def _full_step(kind, c):
    model, bb_opt = _backbone()
    x, y = _data(c)
    if kind == "trivial":
        def run():
            bb_opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            bb_opt.step()
        return run, lambda: []
    head, head_step, head_zero, state = _head(kind, c)

    def run():
        loss = head(model(x), y)
        bb_opt.zero_grad(set_to_none=True)
        head_zero()
        loss.backward()
        bb_opt.step()
        head_step()
    return run, state


def _head_alone(kind, c):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B, D, generator=g).requires_grad_()
    y = torch.randint(c, (B,), generator=g)
    head, head_step, head_zero, state = _head(kind, c)

    def run():
        emb.grad = None
        head_zero()
        head(emb, y).backward()
        head_step()
    return run, state


def _floor(c):
    s = math.ceil(0.1 * c)
    g = torch.Generator().manual_seed(2)
    x, w, gl = torch.randn(B, D, generator=g), torch.randn(s, D, generator=g), torch.randn(B, s, generator=g)

    def run():
        torch.mm(x, w.t())
        torch.mm(gl, w)
        torch.mm(gl.t(), x)
    return run, lambda: []


ROWS = {  # key: (impl name, role, builder, kind, rounds)
    "floor": ("3 GEMMs at S=0.1C (head floor)", "floor", _floor, None, ROUNDS_HEAD),
    "step_pml": ("step: pml ArcFaceLoss", "peer", _full_step, "pml", ROUNDS_STEP),
    "step_dense": ("step: dense Linear + eager ArcFace", "other", _full_step, "dense", ROUNDS_STEP),
    "step_simcore0.1": ("step: simcore sr=0.1", "simcore", _full_step, "simcore0.1", ROUNDS_STEP),
    "step_simcore1.0": ("step: simcore sr=1.0", "simcore", _full_step, "simcore1.0", ROUNDS_STEP),
    "step_trivial": ("step: backbone + trivial loss", "other", _full_step, "trivial", ROUNDS_STEP),
    "head_pml": ("head alone: pml ArcFaceLoss", "other", _head_alone, "pml", ROUNDS_HEAD),
    "head_dense": ("head alone: dense + eager ArcFace", "other", _head_alone, "dense", ROUNDS_HEAD),
    "head_simcore0.1": ("head alone: simcore sr=0.1", "other", _head_alone, "simcore0.1", ROUNDS_HEAD),
    "head_simcore1.0": ("head alone: simcore sr=1.0", "other", _head_alone, "simcore1.0", ROUNDS_HEAD),
    "head_simcore0.1adamw": ("head alone: simcore sr=0.1 adamw", "other", _head_alone, "simcore0.1adamw",
                             ROUNDS_HEAD),
}


def _cases():
    for c in CLASSES:
        for key in ROWS:
            if key == "head_simcore0.1adamw" and c != max(CLASSES):
                continue
            yield pytest.param(c, key, id=f"{_label(c)}-{key}",
                               marks=pytest.mark.benchmark(group=f"train-{_label(c)}"))


def _state_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("classes,key", list(_cases()))
def test_train_step(benchmark, classes, key):
    impl, role, build, kind, rounds = ROWS[key]
    fn, state = build(c=classes) if kind is None else build(kind, classes)
    if classes >= 1_000_000 and key not in ("floor",):
        rounds = min(rounds, 3)
    fn()  # warm-up: lazily allocated optimizer state is then held, not counted as the step's peak
    peak = peak_memory_bytes(fn)
    held = _state_bytes(state())
    benchmark.extra_info.update(impl=impl, role=role, peak_bytes=peak, state_bytes=held, items=B,
                                classes=classes, backbone=BACKBONE, image_size=IMAGE_SIZE)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    SUMMARY[(classes, key)] = dict(median=benchmark.stats.stats.median, peak=peak, state=held)
    del fn, state
    gc.collect()


# ---------------------------------------------------------------------------------- data loading

@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """96 JPEGs (quality 90): 320×320 crops of six scikit-image photographs (ISC images are a few
    hundred pixels a side); the loader decodes each at a reduced scale and resizes to IMAGE_SIZE."""
    np = pytest.importorskip("numpy")
    skdata = pytest.importorskip("skimage.data")
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    i = 0
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        im = np.asarray(getattr(skdata, name)())
        im = np.stack([im] * 3, 2) if im.ndim == 2 else im[..., :3]
        size = min(320, im.shape[0], im.shape[1])
        for _ in range(16):
            y0, x0 = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
            Image.fromarray(im[y0:y0 + size, x0:x0 + size]).save(root / f"T{i:04d}.jpg", quality=90)
            i += 1
    return root


LOADERS = {  # key: (impl, workers, augment)
    "decode_inproc": ("decode only, in-process", 0, False),
    "augment_inproc": ("decode + augment, in-process", 0, True),
    "augment_1worker": ("decode + augment, 1 worker", 1, True),
    "augment_2workers": ("decode + augment, 2 workers", 2, True),
}


@pytest.mark.benchmark(group="data-loading")
@pytest.mark.parametrize("key", list(LOADERS))
def test_data_loading(benchmark, jpeg_folder, key):
    from simcore.isc import augment as A
    from simcore.isc import data as Dt
    from simcore.isc.train import TRAIN_OPS_WEIGHTS

    impl, workers, augment = LOADERS[key]
    images = Dt.load_image_set(jpeg_folder)
    aug = A.RandomAugment(num_ops=(1, 3), intensity=(0.2, 1.0), weights=TRAIN_OPS_WEIGHTS) if augment else None
    dataset = Dt.ImageDataset(images.paths, images.labels, IMAGE_SIZE, aug)
    sampler = Dt.StageBatchSampler(range(len(images.paths)), B, seed=0, augment=augment)   # unbounded
    loader = Dt.make_loader(dataset, sampler, workers=workers)
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed

    def run():
        for _ in range(LOADER_BATCHES):
            next(it)
    benchmark.extra_info.update(impl=impl, role="other", items=B * LOADER_BATCHES, workers=workers)
    benchmark.pedantic(run, rounds=3, warmup_rounds=0, iterations=1)
    SUMMARY[("data", key)] = dict(median=benchmark.stats.stats.median, items=B * LOADER_BATCHES)
    del it, loader


# ---------------------------------------------------------------------------------- the summary

def _derived():
    """The issue's figures from the rows of this run (ratios in one run only)."""
    out = [f"bench_train: backbone {BACKBONE}" + (f" [{BACKBONE_NOTE}]" if BACKBONE_NOTE else "")
           + f", {IMAGE_SIZE} px, B={B}, D={D}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"load average {os.getloadavg()[0]:.1f}"]
    mb = 2 ** 20
    for c in CLASSES:
        r = {k: v for (cc, k), v in SUMMARY.items() if cc == c}
        if not r:
            continue
        ips = {k: B / v["median"] for k, v in r.items()}
        out.append(f"[{_label(c)} classes] images/s: " + ", ".join(
            f"{k.split('_', 1)[1]} {ips[k]:.1f}" for k in r if k.startswith("step_")))
        pairs = [(s, p) for s in ("step_simcore0.1", "step_simcore1.0") for p in ("step_pml", "step_dense")
                 if s in ips and p in ips]
        if pairs:
            out.append("  images/s ratio simcore/peer (> 1: simcore faster): " + ", ".join(
                f"{s[5:]}/{p[5:]} {ips[s] / ips[p]:.2f}" for s, p in pairs))
        hp = [(s, p) for s in ("head_simcore0.1", "head_simcore1.0") for p in ("head_pml", "head_dense")
              if s in r and p in r]
        if hp:
            out.append("  head alone, time ratio peer/simcore (> 1: simcore faster): " + ", ".join(
                f"{p[5:]}/{s[5:]} {r[p]['median'] / r[s]['median']:.1f}" for s, p in hp))
        if "step_trivial" in r:
            t0 = r["step_trivial"]["median"]
            for s in ("simcore0.1", "simcore1.0", "pml", "dense"):
                if f"step_{s}" in r:
                    ts = r[f"step_{s}"]["median"]
                    alone = r.get(f"head_{s}", {}).get("median")
                    extra = f", head alone / (trivial step + head alone) {alone / (t0 + alone):.1%}" if alone else ""
                    out.append(f"  head share of step, {s}: 1 - trivial/step {1 - t0 / ts:.1%}{extra}")
        if "floor" in r:
            s_rows = math.ceil(0.1 * c)
            gflop = 3 * 2 * B * s_rows * D / 1e9
            rate = gflop / r["floor"]["median"]
            line = f"  floor: 3 GEMMs at S={s_rows:,}: {gflop:.3f} GFLOP in {r['floor']['median'] * 1e3:.1f} ms " \
                   f"({rate:.0f} GFLOP/s)"
            for s, sr in (("head_simcore0.1", 0.1), ("head_simcore1.0", 1.0), ("head_dense", 1.0), ("head_pml", 1.0)):
                if s in r:
                    f_ms = 3 * 2 * B * math.ceil(sr * c) * D / 1e9 / rate * 1e3
                    line += f"; {s[5:]} {r[s]['median'] * 1e3:.1f} ms = {r[s]['median'] * 1e3 / f_ms:.2f}x its floor"
            out.append(line)
        for s, states in (("simcore0.1", 1), ("simcore1.0", 1), ("simcore0.1adamw", 2), ("pml", 1), ("dense", 1)):
            h = r.get(f"head_{s}")
            if not h:
                continue
            pred = c * D * 4 * (1 + states)
            rows = math.ceil((0.1 if "0.1" in s else 1.0) * c) * D * 4
            step = r.get(f"step_{s}")
            out.append(f"  memory {s}: held {h['state'] / mb:.0f} MB (predicted C·D·4·(1+{states}) = {pred / mb:.0f} MB)"
                       f" + head-step peak {h['peak'] / mb:.1f} MB = {h['peak'] / rows:.2f}x its rows "
                       f"(S·D·4 = {rows / mb:.1f} MB)"
                       + (f"; whole step peak {step['peak'] / mb:.0f} MB" if step else ""))
        if "step_trivial" in r:
            out.append(f"  memory: backbone + trivial loss step peak {r['step_trivial']['peak'] / mb:.0f} MB")
    d = {k: v for (g, k), v in SUMMARY.items() if g == "data"}
    if d:
        rates = {k: v["items"] / v["median"] for k, v in d.items()}
        out.append("[data loading] images/s: " + ", ".join(f"{LOADERS[k][0]} {v:.0f}" for k, v in rates.items()))
        per_worker = rates.get("augment_1worker")
        if per_worker:
            for c in CLASSES:
                s = SUMMARY.get((c, "step_simcore0.1"))
                if s:
                    need = (B / s["median"]) / per_worker
                    out.append(f"  {_label(c)} classes: the simcore sr=0.1 step consumes {B / s['median']:.1f} images/s"
                               f" = {need:.2f} worker(s) at {per_worker:.0f} images/s each")
    return out


@pytest.fixture(scope="module", autouse=True)
def _threads_and_summary(request):
    before = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    yield
    if SUMMARY:
        tr = request.config.pluginmanager.getplugin("terminalreporter")
        for line in _derived():
            (tr.write_line if tr is not None else print)(line)
    torch.set_num_threads(before)
