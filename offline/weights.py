"""Quantize-weights stage: W ~= s_n * (a * v + m) per (row, K-group) for a weight code (ternary, binary, int4).

Three steps, the same for every code:
1. Stage 1, weight space: the code's initial fit and alternating refinement of (alpha, mu, v) with
   W ~= alpha * v + mu (ternary: E2M-ATQ's TWN threshold rule; binary: sign around the mean; int4: min-max).
2. Stage 2, output aware (E2M-ATQ): with v frozen, (alpha, mu) minimising ||(w - alpha v - mu 1) X||², the
   2x2 normal equations on S = XᵀX of the group's columns.
3. Integer grid (format v2): one fp16 scale s_n per row (from the row's largest level, with headroom for GPTQ's
   updates), then per group the integer (a, m) nearest the stage-2 optimum that minimises the same output
   error among the 3x3 integer neighbours of round(alpha/s), round(mu/s), under a*v + m in [-127, 127].
`gptq_quantize` runs them inside GPTQ's column-block error feedback, so each group's error is the error of the
integer-grid weights the checkpoint stores.
"""

from __future__ import annotations

import functools

import torch

from twla_vllm.format import INT_WEIGHT_MAX, WeightCode
from twla_vllm.simulate import QuantWeight

TWN_RATIO = 0.75  # TWN threshold: delta = 0.75 * mean|W - mu|
GRID_HEADROOM = 1.15  # row scale covers 15% more than the pre-GPTQ levels: later groups move under feedback


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    return w.reshape(n, k // gs, gs)


def _ls_alpha(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v * c).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp(min=1)


def stage1_fit(w: torch.Tensor, code: WeightCode, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight-space fit per group, w [..., gs] -> (v, alpha, mu) with v integer code values (float), alpha >= 0.
    iters = 0 is the plain round-to-nearest baseline of the code."""
    mu = w.mean(-1, keepdim=True)
    v = alpha = None
    for it in range(iters + 1):
        if code.name == "ternary":  # E2M-ATQ: mu <- mu + mean residual, TWN threshold, LS alpha
            if it:
                mu = mu + (w - (alpha * v + mu)).mean(-1, keepdim=True)
            c = w - mu
            delta = TWN_RATIO * c.abs().mean(-1, keepdim=True)
            v = torch.where(c > delta, 1.0, torch.where(c < -delta, -1.0, 0.0))
            alpha = _ls_alpha(c, v)
        elif code.name == "binary":
            if it:
                mu = (w - alpha * v).mean(-1, keepdim=True)
            c = w - mu
            v = torch.where(c >= 0, 1.0, -1.0)
            alpha = (c * v).mean(-1, keepdim=True)
        else:  # uniform integer grid: min-max init, then least-squares (alpha, mu) and re-rounding
            if it == 0:
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                alpha = ((hi - lo) / (code.vmax - code.vmin)).clamp(min=1e-12)
                mu = lo - code.vmin * alpha
            else:
                alpha, mu = _weight_space_refit(w, v)
                alpha = alpha.clamp(min=1e-12)
            v = torch.clamp(torch.round((w - mu) / alpha), code.vmin, code.vmax)
    return v, alpha.clamp(min=0), mu


def _weight_space_refit(w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (alpha, mu) of w ~= alpha v + mu per group (v frozen)."""
    n = w.shape[-1]
    sv, svv = v.sum(-1, keepdim=True), (v * v).sum(-1, keepdim=True)
    sw, svw = w.sum(-1, keepdim=True), (v * w).sum(-1, keepdim=True)
    det = n * svv - sv * sv
    ok = det.abs() > 1e-12
    alpha = torch.where(ok, (n * svw - sv * sw) / torch.where(ok, det, 1.0), 0.0)
    mu = torch.where(ok, (svv * sw - sv * svw) / torch.where(ok, det, 1.0), sw / n)
    return alpha, mu


def stage2_refit(w: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M-ATQ stage 2 (output aware): with v frozen, (alpha, mu) per row minimising
    ||(w - alpha v - mu 1) X||² = (w - ŵ) S (w - ŵ)ᵀ, S = XᵀX: the 2x2 normal equations
        [v S vᵀ  v S 1] [alpha]   [v S wᵀ]
        [1 S vᵀ  1 S 1] [ mu  ] = [1 S wᵀ].
    w, v: [N, gs]; s: [gs, gs]. Rows whose system is singular (v constant) keep mu = weighted mean."""
    one = torch.ones(w.shape[-1], dtype=w.dtype)
    sv, s1 = v @ s, s @ one
    a11 = (sv * v).sum(-1)
    a12 = v @ s1
    a22 = one @ s1
    b1 = (sv * w).sum(-1)
    b2 = w @ s1
    det = a11 * a22 - a12 * a12
    ok = det.abs() > 1e-12 * (a11.abs() * a22.abs()).clamp(min=1e-30)
    alpha = torch.where(ok, (b1 * a22 - a12 * b2) / torch.where(ok, det, 1.0), 0.0)
    mu = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1.0), b2 / a22.clamp(min=1e-30))
    return alpha.unsqueeze(-1), mu.unsqueeze(-1)


def row_scale_for(alpha: torch.Tensor, mu: torch.Tensor, code: WeightCode, headroom: float = 1.0) -> torch.Tensor:
    """fp16-representable s_n [N, 1] so the row's largest level |alpha v + mu| maps to 127 (alpha, mu [N, G])."""
    top = torch.maximum(alpha * code.vmax + mu, -(alpha * code.vmin + mu)).amax(dim=1, keepdim=True)
    s = (top * headroom / INT_WEIGHT_MAX).clamp(min=1e-8)
    return s.half().clamp(min=torch.finfo(torch.float16).tiny).float()


@functools.lru_cache(maxsize=None)
def _neighbour_steps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, dm) [9, 1, 1] of the 3x3 integer neighbourhood in (da, dm) order, made once per device: to_int_grid runs
    once per group inside GPTQ's loop, where a fresh small tensor would be a host-to-device copy each time."""
    steps = torch.tensor([-1.0, 0.0, 1.0], device=device)
    return steps.repeat_interleave(3).view(9, 1, 1), steps.repeat(3).view(9, 1, 1)


def to_int_grid(w: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, s: torch.Tensor,
                code: WeightCode, hess: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (a, m) per row of one group: among the 3x3 neighbours of round(alpha/s), round(mu/s) that keep
    a >= 0 and a*v + m in [-127, 127], the one with the least (w - ŵ) S (w - ŵ)ᵀ (S = hess, or I); ties go to
    the first in (da, dm) order. w, v: [N, gs]; alpha, mu, s: [N, 1]. Returns int32 (a, m), each [N, 1].
    The nine candidates are scored in one batched pass (a GPU runs this once per group inside GPTQ's loop, where
    launches, not FLOPs, are the cost), over row chunks that keep the [9, rows, gs] residual near 64 MB."""
    a_max = 2 * INT_WEIGHT_MAX // (code.vmax - code.vmin)  # beyond this no m keeps every level in range
    da, dm = _neighbour_steps(w.device)
    rows = max(1, (1 << 24) // (9 * w.shape[-1]))
    out_a, out_m = [], []
    for r0 in range(0, w.shape[0], rows):
        sl = slice(r0, r0 + rows)
        a = (torch.round(alpha[sl] / s[sl]) + da).clamp(0, a_max)  # [9, n, 1]
        m = (torch.round(mu[sl] / s[sl]) + dm).clamp(-INT_WEIGHT_MAX - a * code.vmin, INT_WEIGHT_MAX - a * code.vmax)
        r = w[sl] - s[sl] * (a * v[sl] + m)  # [9, n, gs]
        err = ((r @ hess) * r).sum(-1) if hess is not None else (r * r).sum(-1)  # [9, n]
        best = err.argmin(0, keepdim=True).unsqueeze(-1)  # first minimum: the loop order's tie rule
        out_a.append(a.gather(0, best)[0])
        out_m.append(m.gather(0, best)[0])
    return torch.cat(out_a).to(torch.int32), torch.cat(out_m).to(torch.int32)


def fit_rtn(w: torch.Tensor, code: WeightCode, group_size: int, iters: int = 0) -> QuantWeight:
    """Weight-space fit per (row, group) without data: iters = 0 is the code's round-to-nearest baseline,
    iters > 0 stage 1 (E2M-ATQ's ATQ for ternary)."""
    w = w.detach().float()
    wg = _grouped(w, group_size)
    v, alpha, mu = stage1_fit(wg, code, iters)
    s = row_scale_for(alpha.squeeze(-1), mu.squeeze(-1), code)
    n, g, gs = wg.shape
    qa, qm = to_int_grid(wg.reshape(n * g, gs), v.reshape(n * g, gs), alpha.reshape(-1, 1), mu.reshape(-1, 1),
                         s.repeat_interleave(g, 0), code)
    return QuantWeight(code.codes(v.reshape(w.shape)), code, s.reshape(-1), qa.view(n, g).to(torch.int8),
                       qm.view(n, g).to(torch.int8))


def gptq_setup(w: torch.Tensor, h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's start: (a float32 copy of w with dead inputs — zero Hessian diagonal — zeroed, the damped Hessian, the
    upper Cholesky factor of its inverse)."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    return w, h, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def block_errors(w1: torch.Tensor, q1: torch.Tensor, hinv1: torch.Tensor) -> torch.Tensor:
    """GPTQ inside one column block with its quantized values q1 fixed: each column's error, scaled by the inverse
    Hessian's Cholesky diagonal, flows into the block's later columns. Returns the scaled errors E [N, B];
    `E @ Hinv[block, later]` is what the later blocks subtract. With q1 fixed, GPTQ's column recursion
    e_i = (w_i - q_i - sum_{j<i} e_j U_ji) / U_ii is the triangular system E U = W - Q (U = hinv1, upper), solved
    in one call instead of a Python loop of B steps (whose launches took ~a fifth of the GPU's weight stage)."""
    return torch.linalg.solve_triangular(hinv1, w1 - q1, upper=True, left=False)


def act_aware_target(w: torch.Tensor, hq: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weights that map the quantized activations X̃ closest to the layer's output on the 16-bit ones:
    argmin_W' ||X Wᵀ - X̃ W'ᵀ||² = W XᵀX̃ (X̃ᵀX̃)⁻¹, so that ||X Wᵀ - X̃ Ŵᵀ||² = ||X̃ (W' - Ŵ)ᵀ||² + const and
    GPTQ on (W', X̃ᵀX̃) minimises the served layer's output error, activation rounding included (the asymmetric
    target of GPTAQ, here for the activation quantization only). `damp` (relative to the mean diagonal) keeps the
    solve well posed where X̃ᵀX̃ is near singular."""
    k = hq.shape[0]
    reg = hq + damp * hq.diagonal().mean() * torch.eye(k, dtype=hq.dtype, device=hq.device)
    return torch.linalg.solve(reg.double(), cross.double() @ w.double().t()).t().float()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, code: WeightCode, group_size: int, stage2: bool = True,
                  stage1_iters: int = 15, percdamp: float = 0.1, blocksize: int = 128,
                  int_grid: bool = True) -> QuantWeight:
    """E2M-ATQ with GPTQ column-block error feedback on the damped Hessian h = XᵀX (of the transformed
    inputs). Per K-group (one GPTQ block each): stage 1 on the current (error-updated) weights, stage 2 with
    S = h[group, group], projection onto the integer grid; each column's error then flows into the
    not-yet-quantized columns. Per-row scales (group_size -1): alpha/mu from stage 1 on the whole row, v by
    nearest level per block, stage 2 and the grid once at the end with the full h. int_grid=False keeps fp16
    alpha/mu (format v1's scales, simulation only) to measure what the grid costs."""
    w0 = w.detach().float()
    n, k = w0.shape
    w, hd, hinv = gptq_setup(w0, h, percdamp)
    per_row = group_size == -1
    bs = blocksize if per_row else group_size
    _, a_pre, m_pre = stage1_fit(_grouped(w, group_size), code, stage1_iters)
    s = row_scale_for(a_pre.squeeze(-1), m_pre.squeeze(-1), code, GRID_HEADROOM)
    v_all = torch.zeros(n, k)
    qas, qms = [], []
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        if per_row:
            a, m = a_pre[:, 0], m_pre[:, 0]
            v1 = torch.clamp(torch.round((w1 - m) / a.clamp(min=1e-12)), code.vmin, code.vmax)
            if code.name == "binary":
                v1 = torch.where(w1 - m >= 0, 1.0, -1.0)
            q1 = a * v1 + m
        else:
            v1, a, m = (t.squeeze(1) for t in stage1_fit(w1.unsqueeze(1), code, stage1_iters))
            if stage2:
                a, m = stage2_refit(w1, v1, hd[i1:i2, i1:i2])
                if code.name != "int4":  # a symmetric code flips its values instead of a negative scale
                    v1, a = torch.where(a < 0, -v1, v1), a.abs()
            if int_grid:
                qa, qm = to_int_grid(w1, v1, a.clamp(min=0), m, s, code, hd[i1:i2, i1:i2] if stage2 else None)
                q1 = s * (qa * v1 + qm)
            else:
                qa, qm = a.half().float(), m.half().float()
                q1 = qa * v1 + qm
            qas.append(qa)
            qms.append(qm)
        err1 = block_errors(w1, q1, hinv[i1:i2, i1:i2])
        v_all[:, i1:i2] = v1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if per_row:  # whole-row output error of the original layer, then the grid
        a, m = stage2_refit(w0, v_all, hd) if stage2 else (a_pre[:, 0], m_pre[:, 0])
        if code.name != "int4":
            v_all = torch.where(a < 0, -v_all, v_all)
            a = a.abs()
        s = row_scale_for(a, m, code)
        qa, qm = to_int_grid(w0, v_all, a, m, s, code, hd if stage2 else None) if int_grid else (a.half().float(),
                                                                                              m.half().float())
        qas, qms = [qa], [qm]
    if not int_grid:
        return QuantWeight(code.codes(v_all), code, torch.ones(n), torch.cat(qas, 1), torch.cat(qms, 1))
    return QuantWeight(code.codes(v_all), code, s.reshape(-1), torch.cat(qas, 1).to(torch.int8),
                       torch.cat(qms, 1).to(torch.int8))
