"""OKT (BWLA): an orthogonal Kronecker transform R1 ⊗ R2 per input site, learned by EM so that every
(row, group) of the transformed weights follows a symmetric bimodal ("double bell") distribution, which sign
codes with a scale and an offset (Ŵ = α·b + μ) binarize with little error. Derivation, measurements, and what
the paper does and does not say: offline/NOTES_bwla.md.

Model. With W̃_n = R1 · W_n.reshape(n1, n2) · R2 (the same fold as KOTMS: activations get R1·x·R2 online),
each weight x of row n, group g is drawn from ½N(μ_ng − c_ng, σ_n²) + ½N(μ_ng + c_ng, σ_n²). The width
σ_n = SIGMA_RATIO · ‖W_n‖/√K is fixed per row: an orthogonal transform keeps ‖W_n‖, so the model's scale does
not move with the factors. The objective is the negative log-likelihood per weight (½log 2π dropped)

    L(R1, R2, μ, c) = mean_{n,g,j} [ (x − μ)²/2σ_n² + c²/2σ_n² − log cosh(c (x − μ)/σ_n²) + log σ_n ],

learned by expectation / conditional maximisation from R1 = R2 = I, the factors updated alternately:
  E-step   the expected sign of every weight, t = 2γ − 1 = tanh(c (x − μ)/σ²) (γ: posterior of the + mode);
  CM-step  (μ, c) per (row, group): the 2x2 normal equations g μ + c Σt = Σx, μ Σt + g c = Σ t x;
  CM-step  one factor with the other frozen: the weighted orthogonal Procrustes solution that moves the
           transformed weights to their expected modes T = μ + c t, min Σ_n ‖R1 W_n R2 − T_n‖²/σ_n²:
           R1 = U Vᵀ of SVD(Σ_n T_n (W_n R2)ᵀ/σ_n²) (per diagonal block when R1 is block-diagonal), or
           R2 = U Vᵀ of SVD(Σ_n (R1 W_n)ᵀ T_n/σ_n²).
Each step maximises the EM lower bound exactly over its variables, so L never increases. EM creeps on
plateaus, so each factor step is also tried over-relaxed (adaptive over-relaxed EM, Salakhutdinov & Roweis
2003): D = R_oldᵀ R_new = cay(S), R_old · cay(ω S) for a growing ω, kept only when it lowers L further.
As σ → 0 the targets become μ + c·sign(x − μ) and L tends to the weight-space binarization error
‖W̃ − (α b + μ)‖²: OKT minimises a smoothed binarization error over orthogonal Kronecker transforms.
"""

from __future__ import annotations

import math

import torch

OVERRELAX_GROWTH = 1.5  # adaptive over-relaxed EM: the step multiplier grows by this while it pays, else resets
SIGMA_RATIO = 0.5  # mode width σ_n / the row's RMS weight: wide enough that EM moves (0.25 learns slower, 1.0 worse)


def learn_okt(w: torch.Tensor, n1: int, n2: int, group_size: int, left_blocks: int = 1, learn_left: bool = True,
              recipe=None, site_inputs=None, iters: int | None = None,
              ) -> tuple[torch.Tensor | None, torch.Tensor, list[float]]:
    """OKT of the stacked weights `w` [N, n1*n2] that read one input: (R1 or None, R2, loss history), the
    history holding L at the start and after each EM iteration (iters + 1 values, never increasing).

    R1 is block-diagonal with `left_blocks` blocks (shard-local under tensor parallelism); learn_left=False
    learns R2 only (R1 = I, returned as None). `iters` EM iterations (each updates R1 then R2; default
    recipe.okt_iters). Data-free: `site_inputs` is not used (the signature of `pipeline.transform_learner`).
    group_size -1 = one group per row."""
    iters = recipe.okt_iters if iters is None else iters
    n, k = w.shape
    if k != n1 * n2 or n1 % left_blocks:
        raise ValueError(f"OKT: K={k} != {n1}x{n2} or n1 not divisible by left_blocks={left_blocks}")
    w3 = w.detach().float().reshape(n, n1, n2)
    gs = k if group_size == -1 else group_size
    sigma2 = (SIGMA_RATIO ** 2 * w3.pow(2).sum((1, 2)) / k).clamp(min=1e-30).reshape(n, 1, 1)
    nll = _NegLogLikelihood(sigma2)
    left, right = torch.eye(n1), torch.eye(n2)
    x = _grouped(w3, gs)
    mu, c = _init_modes(x)
    history = [nll(x, mu, c)]
    omega = {"left": OVERRELAX_GROWTH, "right": OVERRELAX_GROWTH}
    for _ in range(iters):
        for side in (("left",) if learn_left else ()) + ("right",):
            t = torch.tanh(c * (x - mu) / sigma2)  # E-step: expected sign 2γ - 1 of every weight
            mu, c = _fit_modes(x, t)  # CM-step: (μ, c)
            target = (mu + c * t).reshape(n, n1, n2) / sigma2  # expected modes, rows weighted by 1/σ_n²
            if side == "left":  # CM-step: R1 with R2 frozen
                a = torch.matmul(w3, right)
                old, blocks = left, left_blocks
                new = _procrustes(torch.einsum("nab,ncb->ac", target, a), blocks)
                transformed = lambda r: _grouped(torch.matmul(r, a), gs)  # noqa: E731
            else:  # CM-step: R2 with R1 frozen
                b = torch.matmul(left, w3)
                old, blocks = right, 1
                new = _procrustes(torch.einsum("nba,nbc->ac", b, target), blocks)
                transformed = lambda r: _grouped(torch.matmul(b, r), gs)  # noqa: E731
            x, loss = transformed(new), None
            further = _extrapolate(old, new, omega[side], blocks)  # over-relaxed step, kept if L is lower
            if further is not None:
                x_further = transformed(further)
                loss, loss_further = nll(x, mu, c), nll(x_further, mu, c)
                if loss_further < loss:
                    new, x, loss = further, x_further, loss_further
                    omega[side] *= OVERRELAX_GROWTH
                else:
                    omega[side] = OVERRELAX_GROWTH
            if side == "left":
                left = new
            else:
                right = new
        history.append(nll(x, mu, c) if loss is None else loss)
    return (left.contiguous() if learn_left else None), right.contiguous(), history


def _extrapolate(old: torch.Tensor, new: torch.Tensor, omega: float, blocks: int) -> torch.Tensor | None:
    """The EM step old -> new taken `omega` times along the orthogonal group: D = oldᵀ new = cay(S) with S
    skew, then old · cay(omega S), projected back onto (block-diagonal) orthogonal matrices. None when D has an
    eigenvalue at -1 (a reflection: no Cayley parameter)."""
    eye = torch.eye(old.shape[0], dtype=torch.float64)
    d = old.double().t() @ new.double()
    try:
        s = torch.linalg.solve(eye + d, eye - d)
        step = torch.linalg.solve(eye + omega * (s - s.t()) / 2, eye - omega * (s - s.t()) / 2)
    except torch.linalg.LinAlgError:
        return None
    further = old.double() @ step
    if not bool(torch.isfinite(further).all()):
        return None
    return _procrustes(further.float(), blocks)


def _grouped(x: torch.Tensor, gs: int) -> torch.Tensor:
    """[N, n1, n2] -> [N, G, gs]: groups are contiguous in the row-major flattening, as the quantizer's."""
    return x.reshape(x.shape[0], -1, gs)


def _init_modes(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = xg.mean(-1, keepdim=True)
    return mu, (xg - mu).abs().mean(-1, keepdim=True)


def _fit_modes(xg: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, c) maximising the EM bound per group: g μ + c Σt = Σx, μ Σt + g c = Σ t x."""
    g = xg.shape[-1]
    st, sx, stx = t.sum(-1, keepdim=True), xg.sum(-1, keepdim=True), (t * xg).sum(-1, keepdim=True)
    det = g * g - st * st
    ok = det > 1e-9 * g * g  # all expected signs equal (a one-sided group): keep c = 0, μ = mean
    safe = torch.where(ok, det, torch.ones_like(det))
    mu = torch.where(ok, (g * sx - st * stx) / safe, sx / g)
    c = torch.where(ok, (g * stx - st * sx) / safe, torch.zeros_like(sx))
    return mu, c


class _NegLogLikelihood:
    """L per weight for fixed σ_n: mean of (x − μ)²/2σ² + c²/2σ² − log cosh(c (x − μ)/σ²) + log σ, with
    log cosh u = softplus(2u) − u − log 2 (one pass, no overflow)."""

    def __init__(self, sigma2: torch.Tensor):
        self.sigma2 = sigma2
        self.const = float(0.5 * torch.log(sigma2).mean()) + math.log(2)  # terms that never change

    def __call__(self, xg: torch.Tensor, mu: torch.Tensor, c: torch.Tensor) -> float:
        d = xg - mu
        u = d * (c / self.sigma2)
        per_group = ((d * d).sum(-1, keepdim=True) / 2 + d.shape[-1] * c * c / 2) / self.sigma2
        total = per_group.sum() - torch.nn.functional.softplus(2 * u).sum() + u.sum()
        return float(total) / xg.numel() + self.const


def _procrustes(m: torch.Tensor, blocks: int) -> torch.Tensor:
    """argmax_R tr(Rᵀ m) over orthogonal R (block-diagonal with `blocks` blocks): U Vᵀ of each block's SVD."""
    size = m.shape[0] // blocks
    out = torch.zeros_like(m)
    for i in range(blocks):
        sl = slice(i * size, (i + 1) * size)
        u, _, vh = torch.linalg.svd(m[sl, sl].double())
        out[sl, sl] = (u @ vh).float()
    return out
