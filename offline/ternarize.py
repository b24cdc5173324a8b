"""Ternary weight fits: W ~= alpha * t + mu per (row, K-group), t in {-1, 0, 1}."""

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
