"""How far a half-precision tile GEMM's score may lie from the float32 rescoring: the terms
the kernels use to decide which rows to rescore (proofs in docs/cosine_topk.md)."""
from __future__ import annotations

import math

import torch

from simcore import dispatch


def _gamma(dim):
    """gamma_D = D u / (1 - D u), u = 2^-24: float32 dot products of D terms in any order."""
    return dim * 2.0 ** -24 / max(1.0 - dim * 2.0 ** -24, 2.0 ** -24)


def rescore_bounds(qf, qg, gemm_dtype, db_dtype, dim, device):
    """(slack_factor, query_slack, slack_rel) for a half tile GEMM: row j is rescored
    unless v + m_q * slack_j + rel * |v| <= threshold, with v the GEMM score times
    scale_j and slack_j = (slack_factor ||d_j|| + ||bf16(d_j) - d_j|| + floor) scale_j
    (prepare kernel). ``qf`` are the float32 queries, ``qg`` their GEMM-dtype copy.

    CPU bfloat16 GEMMs (oneDNN: float32 accumulation, one nearest-even rounding of the
    output) use the per-query bound below. With q' = bf16(q), e = q' - q, d' = bf16(d),
    f = d' - d, A the GEMM's float32 sum, v its bfloat16 output and R the float32
    rescoring dot, g = gamma_D:
      |S' - S| = |sum q'_i f_i + e_i d_i| <= ||q'|| ||f|| + ||e|| ||d||   (S = q.d, S' = q'.d')
      |A - S'| <= g ||q'|| ||d'||,  |S - R| <= g ||q|| ||d||,  |v - A| <= u |v|  (u = 2^-8).
    With M = max(||q||, ||q'||) and eps = max over queries of ||e|| / M, the sum is
    <= M ((eps + 2g) ||d|| + (1 + g) ||f||) + u |v|; the factor 1.25 on m_q and rel
    covers (1 + g) and the float32 roundings of the scan itself.
    Elsewhere (CUDA, where torch may reduce bfloat16/float16 GEMMs in reduced precision),
    the worst-case relative bound of ``slack_factor`` with m_q = ||q|| and rel = 0."""
    qn = qf.norm(dim=1)
    if dispatch.cuda_path(device) or gemm_dtype != torch.bfloat16:
        return slack_factor(gemm_dtype, db_dtype, dim), qn.contiguous(), 0.0
    q64, g64 = qf.double(), qg.double()
    m = torch.maximum(q64.norm(dim=1), g64.norm(dim=1))
    err = (g64 - q64).norm(dim=1)
    eps = float((err / m.clamp_min(1e-300)).max())
    g = _gamma(dim)
    return eps + 2 * g, (1.25 * m).float().contiguous(), 1.25 * 2.0 ** -8


def slack_factor(gemm_dtype, db_dtype, dim):
    """Worst-case bound on |approx - rescored| / (||q|| ||d||) for a half tile GEMM:

    With P = sum |q_i d_i| <= ||q|| ||d|| (Cauchy-Schwarz), u the GEMM dtype's unit
    roundoff and g = gamma_D = D 2^-24 / (1 - D 2^-24) (float32 summation of D terms,
    any order): rounding the query and, when the database dtype differs (float32 or
    float16 -> bfloat16), the row moves each product by a factor within (1 +- u)^a,
    a = 1 or 2; half products are exact in float32, their sum is within g (1+u)^a P;
    rounding the output adds u (1+u)^a (1+g) P; the float32 rescoring dot is within
    g P of the exact sum. Total: ((1+u)^a (1+g)(1+u) - 1 + g) P, times 1.25 for the
    float32 roundings of the scan (scale, slack, sum), plus the float16 subnormal
    floor of a unit query (sqrt(D) 2^-25). Near-underflow errors are covered by the
    absolute floor the prepare kernel adds (topk_slack_floor in cosine_topk.h)."""
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[gemm_dtype]
    rounded_inputs = 1 if db_dtype == gemm_dtype else 2
    g = _gamma(dim)
    bound = (1 + u) ** rounded_inputs * (1 + g) * (1 + u) - 1 + g
    subnormal = math.sqrt(dim) * 2.0 ** -25 if gemm_dtype == torch.float16 else 0.0
    return 1.25 * bound + subnormal
