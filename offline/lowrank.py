"""Low-rank stage: the 16-bit branch y += A (B x) of format v2, fitted together with the quantized residual.

Every fit has the signature fit(w, quantize, rank, recipe, site_inputs) -> (QuantWeight, A [N, r], B [r, K]):
w is the layer's weight in the original basis; quantize(residual) runs the layer's transform and weight stage on
a residual (original basis) and returns (QuantWeight, its dequantized value in the original basis);
site_inputs() returns calibration rows [T, K] of the layer's input. A and B are returned already rounded to fp16,
as stored, and the residual is formed with the rounded values. `pipeline.lowrank_fit` picks the fit by name.

    svd   truncated SVD of W, residual quantized once (SVDQuant-style split, no learning: the baseline)
"""

from __future__ import annotations

from typing import Callable

import torch

from twla_vllm.format import LOWRANK_DTYPE
from twla_vllm.simulate import QuantWeight

Quantize = Callable[[torch.Tensor], tuple[QuantWeight, torch.Tensor]]


def svd_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation A @ B of w (A = U_r S_r^½, B = S_r^½ V_rᵀ, balanced), rounded to fp16."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).to(LOWRANK_DTYPE).float()
    b = (root[:, None] * vh[:rank]).to(LOWRANK_DTYPE).float()
    return a, b


def fit_svd(w: torch.Tensor, quantize: Quantize, rank: int, recipe, site_inputs=None,
            ) -> tuple[QuantWeight, torch.Tensor, torch.Tensor]:
    a, b = svd_split(w.float(), rank)
    qw, _ = quantize(w.float() - a @ b)
    return qw, a, b

