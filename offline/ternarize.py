"""Ternarize stage: W ~= alpha * t + mu per (row, K-group), t in {-1, 0, 1}.

`ternarize_rtn` is the plain TWN-threshold baseline; `gptq_ternarize` is E2M-ATQ (stage 1 weight-space
fit, stage 2 output-aware closed-form refit) inside GPTQ's column-block error feedback.
"""

from __future__ import annotations

import torch

TWN_RATIO = 0.75  # TWN threshold: delta = 0.75 * mean|W - mu|


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    return w.reshape(n, k // gs, gs)


def ternarize_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain round-to-nearest ternary (TWN init of PT²-LLM/TWLA): mu = mean, threshold 0.75*mean|W-mu|,
    alpha = least-squares scale of the kept entries. Returns t int8 [N, K], alpha [N, G], mu [N, G]."""
    wg = _grouped(w.float(), group_size)
    mu = wg.mean(-1, keepdim=True)
    c = wg - mu
    delta = TWN_RATIO * c.abs().mean(-1, keepdim=True)
    t = torch.where(c > delta, 1.0, torch.where(c < -delta, -1.0, 0.0))
    alpha = (t * c).sum(-1, keepdim=True) / t.abs().sum(-1, keepdim=True).clamp(min=1)
    return t.reshape(w.shape).to(torch.int8), alpha.squeeze(-1), mu.squeeze(-1)


def stage1_fit(w: torch.Tensor, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E2M-ATQ stage 1 (weight space): from the TWN init, alternate mu <- mu + mean(W - W_hat),
    delta <- 0.75 mean|W - mu|, t by threshold, alpha = least squares. w: [N, G, gs] -> t, alpha, mu."""
    mu = w.mean(-1, keepdim=True)
    t = alpha = None
    for it in range(iters + 1):
        if it:
            mu = mu + (w - (alpha * t + mu)).mean(-1, keepdim=True)
        c = w - mu
        delta = TWN_RATIO * c.abs().mean(-1, keepdim=True)
        t = torch.where(c > delta, 1.0, torch.where(c < -delta, -1.0, 0.0))
        alpha = (t * c).sum(-1, keepdim=True) / t.abs().sum(-1, keepdim=True).clamp(min=1)
    return t, alpha, mu


def stage2_refit(w: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M-ATQ stage 2 (output aware): with t frozen, (alpha, mu) per row minimising
    ||(w - alpha t - mu 1) X||² = (w - ŵ) S (w - ŵ)ᵀ, S = XᵀX: the 2x2 normal equations
        [t S tᵀ  t S 1] [alpha]   [t S wᵀ]
        [1 S tᵀ  1 S 1] [ mu  ] = [1 S wᵀ].
    w, t: [N, gs]; s: [gs, gs]. Rows whose system is singular (t all zero) keep mu = weighted mean."""
    one = torch.ones(w.shape[-1], dtype=w.dtype)
    st, s1 = t @ s, s @ one
    a11 = (st * t).sum(-1)
    a12 = t @ s1
    a22 = one @ s1
    b1 = (st * w).sum(-1)
    b2 = w @ s1
    det = a11 * a22 - a12 * a12
    ok = det.abs() > 1e-12 * (a11.abs() * a22.abs()).clamp(min=1e-30)
    alpha = torch.where(ok, (b1 * a22 - a12 * b2) / torch.where(ok, det, 1.0), 0.0)
    mu = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1.0), b2 / a22.clamp(min=1e-30))
    return alpha.unsqueeze(-1), mu.unsqueeze(-1)


def gptq_ternarize(w: torch.Tensor, h: torch.Tensor, group_size: int, stage2: bool = True,
                   stage1_iters: int = 15, percdamp: float = 0.1, blocksize: int = 128,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E2M-ATQ with GPTQ column-block error feedback on the damped Hessian h = XᵀX (of the rotated
    inputs). Per K-group (one GPTQ block each): stage 1 on the current (error-updated) weights, stage 2
    with S = h[group, group]; each column's error then flows into the not-yet-quantized columns.
    Per-row scales (group_size -1): alpha/mu from stage 1 on the whole row, t by nearest level per
    block, stage 2 once at the end with the full h. Returns t int8 [N, K], alpha [N, G], mu [N, G]."""
    w = w.detach().float().clone()
    w0 = w.clone()
    n, k = w.shape
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hd = h.clone()
    hd.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    per_row = group_size == -1
    bs = blocksize if per_row else group_size
    t_all = torch.zeros(n, k)
    if per_row:
        _, a_row, m_row = stage1_fit(w.unsqueeze(1), stage1_iters)
        a_row, m_row = a_row.squeeze(1), m_row.squeeze(1)
        alphas, mus = [a_row], [m_row]
    else:
        alphas, mus = [], []
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        if per_row:
            t1 = torch.clamp(torch.round((w1 - m_row) / a_row.clamp(min=1e-12)), -1, 1)
            q1 = a_row * t1 + m_row
        else:
            t1, a, m = stage1_fit(w1.unsqueeze(1), stage1_iters)
            t1, a, m = t1.squeeze(1), a.squeeze(1), m.squeeze(1)
            if stage2:
                a, m = stage2_refit(w1, t1, hd[i1:i2, i1:i2])
            q1 = a * t1 + m
            alphas.append(a)
            mus.append(m)
        hinv1 = hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            e = (w1[:, i] - q1[:, i]) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        t_all[:, i1:i2] = t1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if per_row and stage2:
        a, m = stage2_refit(w0, t_all, hd)  # whole-row output error of the original layer
        alphas, mus = [a], [m]
    return t_all.to(torch.int8), torch.cat(alphas, 1), torch.cat(mus, 1)
