"""TwinQuant mode (arXiv 2606.01556): W = L + R, a 16-bit low-rank component L = A·B and an int4 residual R
behind a learned online transform, both learned for the *quantized* output error on calibration activations.
The two learners are the pipeline's "learned" hooks (`pipeline.transform_learner`, `pipeline.lowrank_fit`);
`offline/NOTES_twinquant.md` says what the paper states, what is unknown and why these choices.

learn_transform — the residual's Kronecker transform P = left ⊗ rightᵀ (x' = vec(left · X · right) online,
weight folded offline as W' = W P⁻¹, `rotate.fold_weight`), minimising the relative quantized output error

    J(P) = Σ_t,n ( Q_a(P x_t) · Q_w(R P⁻¹)_n − R_n · x_t )²  /  Σ_t,n (R_n · x_t)²

over calibration rows x_t, with R = W − A₀B₀ the residual of the SVD split (the branch is 16-bit and reads the
untransformed x, so any transform of L cancels exactly: only R's transform matters). Q_w is int4 min-max per
(row, K-group), Q_a per-token min-max at the recipe's activation bits (per K-block of a row-parallel layer, as
served), both with straight-through rounding. P = P_O · P_G jointly learned: P_O orthogonal (Stiefel manifold,
each factor O₀ · cayley(S) as KOTMS) and P_G symmetric positive definite (each factor V · diag(exp σ) · Vᵀ,
V = cayley, |σ| ≤ ln(MAX_COND)/2): O · S is the polar decomposition, so the pair spans every invertible
factor with det > 0 (the general linear manifold) with an exact closed-form inverse V · diag(exp −σ) · Vᵀ and
cond ≤ MAX_COND per factor. Kronecker pairs compose ((L_O ⊗ R_Oᵀ)(L_G ⊗ R_Gᵀ) = L_O L_G ⊗ (R_G R_O)ᵀ), so
one (left, right) pair is stored and runs online.

fit_lowrank — the branch A·B (fp16) and the int4 residual R̂ (the dequantized codes), minimising the output
error on calibration rows X

    E(A, B, R̂) = ‖ X (W − A·B − R̂)ᵀ ‖²_F

by alternating from the SVD init (LoftQ's alternation, in the output metric): R̂ = quantize(W − A·B) through
the layer's transform and weight stage, then A·B = the minimiser of E for that R̂, the truncated SVD of
(W − R̂) in the metric H = XᵀX (closed form, `lowrank.OutputMetric.project`); the best (R̂, A·B) pair is kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from twla_vllm.simulate import QuantWeight

from .lowrank import OutputMetric, Quantize, svd_split
from .rotate import cayley, fold_weight, random_orthogonal

MAX_COND = 100.0  # per learned factor; P = left ⊗ rightᵀ then has cond <= MAX_COND² (fp32 folds stay exact)
ROWS_PER_STEP = 512  # weight rows and calibration tokens per Adam step: both index independent terms of J
TOKENS_PER_STEP = 512
EVAL_ROWS = 1024  # fixed subset on which the init is chosen and the result accepted
EVAL_TOKENS = 1024
WEIGHT_BITS = 4

SiteInputs = Callable[[], torch.Tensor]


# ------------------------------------------------------------------------------------ quantizer proxies -----
def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_weight(w: torch.Tensor, group_size: int, bits: int = WEIGHT_BITS) -> torch.Tensor:
    """Asymmetric min-max per (row, K-group), 2**bits levels, straight-through rounding (the int4 code's
    round-to-nearest init; the weight stage's GPTQ only does better)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = w.reshape(n, k // gs, gs)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    q = torch.clamp(_ste_round((g - lo) / s), 0, 2**bits - 1)
    return (q * s + lo).reshape(n, k)


def fake_quant_act(x: torch.Tensor, bits: int, clip: float = 1.0, blocks: int = 1) -> torch.Tensor:
    """`reference.quantize_per_token` (asymmetric, per token and contiguous K-block, clip * [min, max]) with
    straight-through rounding; identity for bits >= 16."""
    if bits >= 16:
        return x
    m, k = x.shape
    xb = x.reshape(m, blocks, k // blocks)
    lo, hi = xb.amin(-1, keepdim=True) * clip, xb.amax(-1, keepdim=True) * clip
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    z = _ste_round(-lo / s)
    q = torch.clamp(_ste_round(xb / s) + z, 0, 2**bits - 1)
    return ((q - z) * s).reshape(m, k)


def _transform(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, K] -> vec(left · x.reshape(n1, n2) · right); left None = identity."""
    n2 = right.shape[0]
    x3 = x.reshape(x.shape[0], -1, n2)
    if left is not None:
        x3 = torch.matmul(left, x3)
    return torch.matmul(x3, right).reshape(x.shape)


def _relative_error(xt: torch.Tensor, wt: torch.Tensor, target: torch.Tensor, group_size: int, act_bits: int,
                    act_clip: float, k_blocks: int) -> torch.Tensor:
    y = fake_quant_act(xt, act_bits, act_clip, k_blocks) @ fake_quant_weight(wt, group_size).t()
    return ((y - target) ** 2).sum() / (target**2).sum().clamp(min=1e-30)


@torch.no_grad()
def quantized_output_error(w: torch.Tensor, x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                           group_size: int, act_bits: int, act_clip: float = 1.0, k_blocks: int = 1) -> float:
    """J of the module docstring for given factors (None, None = no transform): x [T, K] original-basis
    inputs, w [N, K] original-basis weights; the weights are folded with `rotate.fold_weight`."""
    w, x = w.float(), x.float()
    if right is None:
        xt, wt = x, w
    else:
        eye = torch.eye(w.shape[1] // right.shape[0]) if left is None else left
        xt, wt = _transform(x, eye, right), fold_weight(w, eye, right)
    return float(_relative_error(xt, wt, x @ w.t(), group_size, act_bits, act_clip, k_blocks))


# ------------------------------------------------------------------------------------ learned factors -------
class _Factor(torch.nn.Module):
    """One Kronecker factor, block-diagonal (parameters per diagonal block): O = O₀ · cayley(S) (orthogonal)
    and, when `invertible`, the SPD part V · diag(exp σ) · Vᵀ with V = cayley(T), σ = σ_max · tanh(θ)."""

    def __init__(self, base: torch.Tensor, invertible: bool):
        super().__init__()
        blocks, m, _ = base.shape  # base: [blocks, m, m] orthogonal diagonal blocks O₀
        self.invertible = invertible
        self.register_buffer("base", base.float())
        self.s = torch.nn.Parameter(torch.zeros(blocks, m, m))
        if invertible:
            self.t = torch.nn.Parameter(torch.zeros(blocks, m, m))
            self.theta = torch.nn.Parameter(torch.zeros(blocks, m))
        self.sigma_max = math.log(MAX_COND) / 2

    def parts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(O, S, S⁻¹) as [blocks, m, m] batches (S None when the factor is orthogonal)."""
        o = self.base @ cayley(self.s)
        if not self.invertible:
            return o, None, None
        v = cayley(self.t)
        e = torch.exp(self.sigma_max * torch.tanh(self.theta))
        return o, (v * e.unsqueeze(-2)) @ v.transpose(-1, -2), (v / e.unsqueeze(-2)) @ v.transpose(-1, -2)


def _block_diag(m: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*m.unbind(0))


def _pair(left: _Factor | None, right: _Factor) -> tuple[torch.Tensor | None, torch.Tensor,
                                                         torch.Tensor | None, torch.Tensor]:
    """(left, right, left⁻ᵀ, right⁻ᵀ) of P = P_O · P_G: left = O_l S_l, right = S_r O_r, so the weight fold
    per row is left⁻ᵀ · W · right⁻ᵀ = (O_l S_l⁻¹) · W · (S_r⁻¹ O_r) — no matrix inverse anywhere."""
    o_r, s_r, si_r = right.parts()
    r = o_r if s_r is None else s_r @ o_r
    r_inv_t = o_r if s_r is None else si_r @ o_r
    if left is None:
        return None, r[0], None, r_inv_t[0]
    o_l, s_l, si_l = left.parts()
    lf = o_l if s_l is None else o_l @ s_l
    l_inv_t = o_l if s_l is None else o_l @ si_l
    return _block_diag(lf), r[0], _block_diag(l_inv_t), r_inv_t[0]


def _residual(w: torch.Tensor, recipe) -> torch.Tensor:
    """What the int4 stage will see: W minus the SVD-init branch when the recipe has one (the branch of the
    stacked weights of a site: an approximation of each member's own split, which `fit_lowrank` refines)."""
    if recipe.lowrank == "none" or recipe.lowrank_rank <= 0:
        return w
    a, b = svd_split(w, min(recipe.lowrank_rank, *w.shape))
    return w - a @ b


def learn_transform(w: torch.Tensor, n1: int, n2: int, group_size: int, left_blocks: int, learn_left: bool,
                    recipe, site_inputs: SiteInputs | None) -> tuple[torch.Tensor | None, torch.Tensor, list[float]]:
    """(left or None, right, loss history) minimising J (module docstring) for the stacked weights w [N, K] that
    read one input site, K = n1 * n2; left is block-diagonal with `left_blocks` blocks (shard-local under
    tensor parallelism). Adam on minibatches of ROWS_PER_STEP rows x TOKENS_PER_STEP tokens (J's terms are
    independent per row and per token, so a minibatch is an unbiased estimate); the init (identity or a
    random orthogonal O₀) and the result are judged on a fixed evaluation subset, and the init is returned
    when learning did not improve on it. recipe.twinquant_iters steps at recipe.twinquant_lr. The history is
    J on the evaluation subset at the init, then each step's minibatch J, then J on the evaluation subset for
    the returned factors.

    Orthogonal only (no SPD part) when learn_left is False — the pipeline folds that head-local factor into
    v_proj as a rotation (`rotate.fold_head_rotation`, exact for orthogonal factors only) — and when there are
    no calibration rows (site_inputs None): without activations nothing would stop an SPD part from moving all
    of the weights' difficulty onto the activations; J is then measured with x = I (weight-space error)."""
    gen = torch.Generator().manual_seed(recipe.seed * 7919 + w.shape[0] * 31 + w.shape[1])
    resid = _residual(w.detach().float(), recipe)
    x = None if site_inputs is None else site_inputs().float()
    invertible = learn_left and x is not None
    act_bits = 16 if x is None else int(round(recipe.act_bits))
    k_blocks = left_blocks if learn_left else 1
    n_rows = resid.shape[0]

    def rows(n: int, g: torch.Generator | None) -> torch.Tensor:
        return resid if n_rows <= n else resid[torch.randperm(n_rows, generator=g, device="cpu")[:n]]

    def tokens(n: int, g: torch.Generator | None) -> torch.Tensor:
        if x is None:
            return torch.eye(w.shape[1])[torch.randperm(w.shape[1], generator=g, device="cpu")[:n]]
        return x if x.shape[0] <= n else x[torch.randperm(x.shape[0], generator=g, device="cpu")[:n]]

    eval_w, eval_x = rows(EVAL_ROWS, gen), tokens(EVAL_TOKENS, gen)
    eval_y = eval_x @ eval_w.t()

    def build(base_left, base_right):
        left = _Factor(base_left, invertible) if learn_left else None
        return left, _Factor(base_right, invertible)

    def loss(left, right, xs, ws, ys) -> torch.Tensor:
        lf, rf, l_inv_t, r_inv_t = _pair(left, right)
        return _relative_error(_transform(xs, lf, rf), _transform(ws, l_inv_t, r_inv_t), ys, group_size, act_bits,
                               recipe.default_clip, k_blocks)

    candidates = []
    for base in ("identity", "random"):
        if base == "identity":
            bl, br = torch.eye(n1 // left_blocks).expand(left_blocks, -1, -1), torch.eye(n2)[None]
        else:
            bl = torch.stack([random_orthogonal(n1 // left_blocks, gen) for _ in range(left_blocks)])
            br = random_orthogonal(n2, gen)[None]
        left, right = build(bl, br)
        with torch.no_grad():
            candidates.append((float(loss(left, right, eval_x, eval_w, eval_y)), left, right))
    init_loss, left, right = min(candidates, key=lambda c: c[0])
    params = list(right.parameters()) + ([] if left is None else list(left.parameters()))
    opt = torch.optim.Adam(params, lr=recipe.twinquant_lr)
    history = [init_loss]
    for _ in range(recipe.twinquant_iters):
        xs, ws = tokens(TOKENS_PER_STEP, gen), rows(ROWS_PER_STEP, gen)
        j = loss(left, right, xs, ws, xs @ ws.t())
        opt.zero_grad()
        j.backward()
        opt.step()
        history.append(j.item())
    with torch.no_grad():
        final = float(loss(left, right, eval_x, eval_w, eval_y))
        if final > init_loss:  # keep the init (all parameters 0 on the chosen O₀): learning made J worse
            for p in params:
                p.zero_()
            final = init_loss
        history.append(final)
        lf, rf, _, _ = _pair(left, right)
    return (None if lf is None else lf.contiguous()), rf.contiguous(), history


# ------------------------------------------------------------------------------------ low-rank branch -------
def fit_lowrank(w: torch.Tensor, quantize: Quantize, rank: int, recipe, site_inputs: SiteInputs | None = None,
                ) -> tuple[QuantWeight, torch.Tensor, torch.Tensor]:
    """(QuantWeight of the residual, A [N, r], B [r, K]) minimising E (module docstring) by block-coordinate
    descent from the SVD split: recipe.twinquant_rounds rounds of

        R̂ = quantize(W − A·B)                   residual of the current (fp16) branch, transform + weight stage
        A·B = argmin_rank r E(·, ·, R̂)           the refit to what R̂ leaves (`lowrank.OutputMetric.project`:
                                                 truncated SVD in the metric H = XᵀX, damped by recipe.percdamp)

    Each (R̂, refit branch) pair is a candidate; so is the SVD split itself (its residual quantized once, as
    `lowrank.fit_svd`), so the result's E on the calibration rows is never above the SVD init's. The stored
    residual codes are R̂ and the stored branch is the fp16-rounded refit: E is measured on exactly that pair.
    Without calibration rows E is the weight-space error (H = I)."""
    w = w.detach().float()
    rank = min(rank, *w.shape)
    metric = OutputMetric(None if site_inputs is None else site_inputs().float(), w.shape[1], recipe.percdamp)
    a, b = svd_split(w, rank)
    qw, deq = quantize(w - a @ b)
    best = (metric.error(w - a @ b - deq), qw, a, b)
    for t in range(recipe.twinquant_rounds):
        a, b = metric.project(w - deq, rank)
        err = metric.error(w - a @ b - deq)
        if err < best[0]:
            best = (err, qw, a, b)
        if t + 1 < recipe.twinquant_rounds:
            qw, deq = quantize(w - a @ b)
    return best[1], best[2], best[3]
