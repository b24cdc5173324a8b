"""Low-rank stage: the 16-bit branch y += A (B x) of format v2, fitted together with the quantized residual.

Every fit has the signature fit(w, quantize, rank, recipe, site_inputs) -> (QuantWeight, A [N, r], B [r, K]):
w is the layer's weight in the original basis; quantize(residual) runs the layer's transform and weight stage on
a residual (original basis) and returns (QuantWeight, its dequantized value in the original basis);
site_inputs() returns calibration rows [T, K] of the layer's input. A and B are returned already rounded to fp16,
as stored, and the residual is formed with the rounded values. `pipeline.lowrank_fit` picks the fit by name.

    svd   truncated SVD of W, residual quantized once (SVDQuant-style split, no learning: the baseline)
    psp   BWLA's proximal SVD projection: branch and binarized residual fitted alternately on the layer
          output error (`psp`; equations in offline/NOTES_bwla.md)
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


# --------------------------------------------------------------------------------------------
# PSP (BWLA): the branch and the binarization fitted alternately, the branch by a proximal SVD step
# --------------------------------------------------------------------------------------------
class OutputMetric:
    """The layer-output error of a weight difference D on the calibration rows X: ‖D Xᵀ‖² = tr(D H Dᵀ) with
    H = XᵀX, and the same with the damped H_δ = H + δ·mean(diag H)·I, H_δ = C Cᵀ (Cholesky), which the rank-r
    projection uses (X has fewer rows than K in wide layers; the damping keeps the projection well posed, as in
    GPTQ). Without calibration rows: the Frobenius norm (H = I)."""

    def __init__(self, x: torch.Tensor | None, k: int, percdamp: float):
        if x is None:
            self.h, self.chol = None, torch.eye(k, dtype=torch.float64)
            return
        x = x.double()
        self.h = x.t() @ x
        hd = self.h.clone()
        hd.diagonal().add_(percdamp * float(self.h.diagonal().mean()) + 1e-12)
        self.chol = torch.linalg.cholesky(hd)

    def error(self, d: torch.Tensor) -> float:
        d = d.double()
        return float((d * d).sum() if self.h is None else ((d @ self.h) * d).sum())

    def project(self, z: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """argmin over rank-r L = A B of ‖(Z − L) C‖²: the truncated SVD of Z C, mapped back through C⁻¹,
        each rank-1 term split so that ‖a_i‖ = ‖b_i‖ (fp16 keeps both in range); rounded to fp16."""
        u, s, vh = torch.linalg.svd(z.double() @ self.chol, full_matrices=False)
        b = torch.linalg.solve_triangular(self.chol.t(), vh[:rank].t(), upper=True).t()  # V_rᵀ C⁻¹
        a = u[:, :rank] * s[:rank]
        scale = (b.norm(dim=1) / a.norm(dim=0).clamp(min=1e-30)).sqrt()
        return ((a * scale).to(LOWRANK_DTYPE).float(), (b / scale[:, None]).to(LOWRANK_DTYPE).float())


def psp(w: torch.Tensor, quantize: Quantize, rank: int, iters: int, percdamp: float = 0.1,
        x: torch.Tensor | None = None) -> tuple[QuantWeight, torch.Tensor, torch.Tensor, list[float]]:
    """PSP: minimise the layer-output error E(A, B, Q) = ‖(W − A B − Ŵ_Q) Xᵀ‖² / ‖W Xᵀ‖² over the fp16 rank-r
    branch A B and the quantized residual Q (transformed and binarized by `quantize`), alternately:

        A B = 0 (B = 0)                                the first binarization sees W itself
        repeat `iters` times:
            Q_t = quantize(W − A_t B_t)                transform + weight stage (GPTQ) of the residual
            A_{t+1} B_{t+1} = Π_r(W − Ŵ_{Q_t})          proximal SVD step: what the binarization left
        Q = quantize(W − A B) with the last branch

    Π_r, the proximal operator of the rank-≤ r constraint in the output metric, is the truncated SVD in that
    metric (`OutputMetric.project`): each step minimises E over the branch with Q frozen, as GPTQ does over Q
    with the branch frozen. Returns the (Q, A, B) with the lowest E met (GPTQ is not an exact minimiser, so E
    need not fall at every step) and E after each binarization."""
    w = w.detach().float()
    metric = OutputMetric(x, w.shape[1], percdamp)
    ref = metric.error(w)
    a = torch.zeros(w.shape[0], rank)
    b = torch.zeros(rank, w.shape[1])
    history: list[float] = []
    best = None
    for t in range(iters + 1):
        low = a @ b
        qw, deq = quantize(w - low)
        err = metric.error(w - low - deq) / ref
        history.append(err)
        if best is None or err < best[0]:
            best = (err, qw, a, b)
        if t < iters:
            a, b = metric.project(w - deq, rank)
    return best[1], best[2], best[3], history


def fit_psp(w: torch.Tensor, quantize: Quantize, rank: int, recipe, site_inputs=None,
            ) -> tuple[QuantWeight, torch.Tensor, torch.Tensor]:
    """BWLA's PSP branch (`psp`): recipe.psp_iters proximal SVD steps (recipe.psp_iters + 1 runs of the weight
    stage) in the output metric of the layer's calibration rows."""
    qw, a, b, _ = psp(w, quantize, rank, recipe.psp_iters, recipe.percdamp,
                      None if site_inputs is None else site_inputs())
    return qw, a, b
