"""Accuracy of the margin engine's GEMM operand schemes against float64, on CPU.

    PYTHONPATH=. python benchmarks/lowp_gemm_accuracy.py [seed] [trials]

Engine level (fused_margin_softmax with float32 gradient buffers), inputs exactly
representable in float16, so only the GEMM operands differ from the reference. On CPU the
half products are formed exactly in float32 (lowp_gemms="always" numerics), as cuBLAS forms
them; only the summation order differs from a GPU. Schemes: float32 operands, bfloat16,
float16 with the gradient block scaled into float16's range (the engine's choice), float16
cosines with a bfloat16 gradient block, and float16 without the scale. Prints the worst
norm-wise error ‖out − ref‖/‖ref‖ and the worst max|out − ref|/max|ref| per output, then two
cases outside float16's range (docs/margin_softmax.md, "fp16 and bf16 numerics").
"""
import sys

import torch

import simcore
from simcore.dispatch import tensor_arg
from simcore.margin import engine as E
from simcore.margin.engine import EngineOptions, MarginSpec, fused_margin_softmax
from simcore.reference.margin_softmax import margin_softmax_loss

SPECS = {"arcface": MarginSpec(1.0, 0.5, 0.0, 64.0), "cosface": MarginSpec(1.0, 0.0, 0.35, 64.0),
         "combined": MarginSpec(1.0, 0.3, 0.2, 40.0), "sphere": MarginSpec(1.35, 0.0, 0.0, 30.0)}
SCHEMES = [("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
           ("float16, scaled G", torch.float16, None), ("float16, bfloat16 G", torch.float16, "bf16_g"),
           ("float16, unscaled G", torch.float16, "unscaled")]
_MODE = {"v": None}
_gradient_block = E._BlockEngine._gradient_block


def _patched(self, blk, target_col, lse, row_weight, target_cos):
    if _MODE["v"] == "bf16_g":  # G rounded to bfloat16 (CPU: products formed in float32 anyway)
        self.ext.ms_grad_block(tensor_arg(blk.cos), tensor_arg(target_col), blk.start, self.params,
                               self.row_margins_arg, tensor_arg(lse), tensor_arg(row_weight), tensor_arg(target_cos),
                               self.executor)
        g = blk.cos
        if self.k > 1:
            g = blk.centre_cos
            self.ext.ms_subcenter_expand(tensor_arg(blk.cos), tensor_arg(self._winners(blk.cos.shape[1])), self.k,
                                         tensor_arg(g), self.executor)
        self.ginv = None
        return g.bfloat16()
    if _MODE["v"] == "unscaled":
        one = torch.ones(())
        saved, E.fp16_block_scale = E.fp16_block_scale, lambda g: (one, one)
        try:
            return _gradient_block(self, blk, target_col, lse, row_weight, target_cos)
        finally:
            E.fp16_block_scale = saved
    return _gradient_block(self, blk, target_col, lse, row_weight, target_cos)


E._BlockEngine._gradient_block = _patched


def run(x, y, w, sampled, spec, rw, dtype, mode, options):
    _MODE["v"] = mode
    gx, gw = torch.empty_like(x), torch.zeros_like(w)
    loss, _ = fused_margin_softmax(x, y, w, sampled, spec, row_weight=rw, grad_x=gx, grad_w=gw, gemm_dtype=dtype,
                                   options=options)
    return loss, gx, gw


def reference(x, y, w, sampled, spec, rw):
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    loss = margin_softmax_loss(xd, y, wd, sampled, m1=spec.m1, m2=spec.m2, m3=spec.m3, scale=spec.scale,
                               reduction="none")
    return (loss.detach(),) + torch.autograd.grad(loss, (xd, wd), rw.double())


def errors(out, ref):
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf"), float("inf")
    return ((o - r).norm() / r.norm()).item(), ((o - r).abs().max() / r.abs().max()).item()


def main(seed=0, trials=8):
    g = torch.Generator().manual_seed(seed)
    worst = {name: [0.0] * 6 for name, _, _ in SCHEMES}
    for _ in range(trials):
        for spec in SPECS.values():
            for d in (64, 256):
                for reduction in ("mean", "none"):
                    b, c = int(torch.randint(16, 128, (1,), generator=g)), int(torch.randint(500, 3000, (1,), generator=g))
                    x = (torch.randn(b, d, generator=g) * 8).half().float()
                    w = torch.randn(c, d, generator=g).half().float()
                    y = torch.randint(c, (b,), generator=g)
                    sampled = simcore.sample_classes(y, c, c // 2, g)
                    rw = torch.full((b,), 1.0 / b) if reduction == "mean" else torch.rand(b, generator=g)
                    ref = reference(x, y, w, sampled, spec, rw)
                    for blocked in (False, True):
                        options = EngineOptions(block_classes=256 if blocked else None)
                        for name, dtype, mode in SCHEMES:
                            out = run(x, y, w, sampled, spec, rw, dtype, mode, options)
                            errs = [errors(o, r) for o, r in zip(out, ref)]
                            flat = [e[0] for e in errs] + [e[1] for e in errs]
                            worst[name] = [max(a, e) for a, e in zip(worst[name], flat)]
    print(f"seed {seed}, {trials * len(SPECS) * 8} runs per scheme; worst norm-wise | worst max-element")
    print(f"{'scheme':22s} {'loss':>9s} {'dL/dx':>9s} {'dL/dW':>9s} | {'loss':>9s} {'dL/dx':>9s} {'dL/dW':>9s}")
    for name, v in worst.items():
        print(f"{name:22s} " + " ".join(f"{e:9.2e}" for e in v[:3]) + " | " + " ".join(f"{e:9.2e}" for e in v[3:]))
    spec = SPECS["arcface"]
    for label, b, weight in (("row weights 2^16 (GradScaler scale, reduction='none'), B = 32", 32, 65536.0),
                             ("row weights 1e-7", 32, 1e-7)):
        x = (torch.randn(b, 128, generator=g) * 8).half().float()
        w = torch.randn(2000, 128, generator=g).half().float()
        y = torch.randint(2000, (b,), generator=g)
        sampled, rw = torch.arange(2000), torch.full((b,), weight)
        ref = reference(x, y, w, sampled, spec, rw)
        print(label)
        for name, dtype, mode in SCHEMES:
            out = run(x, y, w, sampled, spec, rw, dtype, mode, EngineOptions())
            print(f"  {name:22s} " + " ".join(f"{errors(o, r)[0]:9.2e}" for o, r in zip(out, ref)))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
