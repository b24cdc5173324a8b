"""Paper-faithful mode (simulation only, not a checkpoint format): the weight structure of the released TWLA
code, so a user can see on their own model what that format buys and what it costs in honest bits.

Per 128-column GPTQ block (BiLLM / ARB-LLM heritage, `algorithms.md` §2.4):
1. salience s_ij = w_ij² / [U]_jj² (U = upper Cholesky of H⁻¹); the top-k columns by Σ_i s_ij are salient, k
   searched over `salient_counts` as BiLLM does: the least error of order-2 fits of the salience matrix on the
   k columns and on the rest;
2. the salient region is split into two groups by a magnitude percentile and each group gets an order-2 ternary
   (μ + α₀T₀ + α₁T₁, two trit planes); the non-salient region likewise into two order-1 groups (μ + αT); both
   splits are searched over `percentiles` for the least output error tr(R S Rᵀ) (S = H of the block);
3. every group: stage 1 (15 weight-space alternations per plane), then one joint stage-2 solve of the row's ten
   (μ, α) values against the block's output error with all trit planes frozen (the reference solves each group
   separately; the joint solve reaches at least as low an error);
4. GPTQ error feedback: the block is quantized once, its column errors flow into the later columns.

Honest bits per block, stored at fixed width as the reference does: 2 bits per weight for the first trit plane,
2 more on salient columns, 1 membership bit per weight, ten fp16 scales per row, a 128-bit salient-column mask
(shared by the block's rows); the rotation factors in fp16 are added by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import block_errors

STAGE1_ITERS = 15
SCALES_PER_ROW = 10  # two order-2 groups (mu, a0, a1) + two order-1 groups (mu, a)
SCALE_BITS = 16
PLANE_BITS = 2  # a trit stored in 2 bits, as every fixed-width ternary format does
DEFAULT_SALIENT_COUNTS = (1, 2, 4, 8, 16, 32, 63)  # the reference searches 1..63; powers of two keep CPU runs short
DEFAULT_PERCENTILES = tuple(p / 100 for p in range(10, 91, 10))  # the reference: 81 points 10%..90%


@dataclass
class FaithfulWeight:
    """A layer's dequantized weight and what storing it costs."""

    weight: torch.Tensor  # [N, K] dequantized
    bits: float  # honest stored bits of codes, membership, masks and scales (rotation factors not included)
    salient_fraction: float  # share of columns with a second trit plane

    def dequantize(self) -> torch.Tensor:
        return self.weight


def _masked_ternary(w: torch.Tensor, mask: torch.Tensor, iters: int = STAGE1_ITERS):
    """Per-row stage-1 fit μ + αT on the elements in `mask` (others ignored): TWN threshold init, then
    `iters` alternations (μ from the residual mean, threshold, least-squares α). Returns (t, α, μ), t 0 off-mask."""
    m = mask.to(w.dtype)
    cnt = m.sum(1, keepdim=True).clamp(min=1)
    mu = (w * m).sum(1, keepdim=True) / cnt
    t = torch.zeros_like(w)
    alpha = torch.zeros_like(mu)
    for _ in range(max(1, iters)):
        c = (w - mu) * m
        delta = 0.75 * c.abs().sum(1, keepdim=True) / cnt
        t = torch.where(c > delta, 1.0, torch.where(c < -delta, -1.0, 0.0)) * m
        alpha = (t * c).sum(1, keepdim=True) / t.abs().sum(1, keepdim=True).clamp(min=1)
        mu = mu + ((w - mu - alpha * t) * m).sum(1, keepdim=True) / cnt
    return t, alpha, mu


def _basis(w: torch.Tensor, groups: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage 1 on each (mask, order) group; the basis vectors [N, B] of the row's (μ, α...) and their fitted
    value ŵ. Order 2 fits a second plane to the first plane's residual."""
    basis, what = [], torch.zeros_like(w)
    for mask, order in groups:
        t0, a0, m0 = _masked_ternary(w, mask)
        fit = a0 * t0 + m0 * mask
        vecs, value = [mask.to(w.dtype), t0], fit
        if order == 2:
            t1, a1, m1 = _masked_ternary(w - fit, mask)
            vecs.append(t1)
            value = fit + a1 * t1 + m1 * mask
        basis += vecs
        what = what + value
    return basis, what


def _joint_stage2(w: torch.Tensor, basis: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """ŵ = Σ_a c_a b_a per row with c minimising (w - ŵ) S (w - ŵ)ᵀ, planes frozen (a small ridge keeps empty
    groups' systems regular)."""
    bs = torch.stack(basis, 1)  # [N, P, B]
    bS = bs @ s  # [N, P, B]
    g = bS @ bs.transpose(1, 2)  # [N, P, P]
    r = (bS * w.unsqueeze(1)).sum(-1, keepdim=True)  # [N, P, 1]
    ridge = 1e-6 * g.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    g = g + ridge[:, None, None] * torch.eye(g.shape[-1], dtype=g.dtype)
    c = torch.linalg.solve(g, r)
    return (c * bs).sum(1)


def _output_error(r: torch.Tensor, s: torch.Tensor) -> float:
    return float(((r @ s) * r).sum())


def _split(w: torch.Tensor, region: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`region` split by the magnitude quantile p of its elements: (small, large)."""
    vals = w[region].abs()
    thr = torch.quantile(vals.float(), p) if vals.numel() else torch.tensor(0.0)
    large = region & (w.abs() > thr)
    return region & ~large, large


def quantize_block(w: torch.Tensor, u_diag: torch.Tensor, s: torch.Tensor, salient_counts=DEFAULT_SALIENT_COUNTS,
                   percentiles=DEFAULT_PERCENTILES) -> tuple[torch.Tensor, int]:
    """The reference structure on one block w [N, B]: (ŵ, salient column count)."""
    n, b = w.shape
    salience = w * w / (u_diag * u_diag)
    order = torch.argsort(salience.sum(0), descending=True)
    best = None
    for k in sorted({min(c, b - 1) for c in salient_counts}):
        # as BiLLM's structural search: the column split into two order-2 fits of the salience matrix itself
        # with the least error (an order-2 / order-1 split in w would always take the most columns)
        sal = torch.zeros(b, dtype=torch.bool)
        sal[order[:k]] = True
        sal = sal.expand(n, b)
        _, fit = _basis(salience, [(sal, 2), (~sal, 2)])
        err = float(((salience - fit) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, k, sal)
    _, k, sal = best
    groups: dict[str, list] = {}
    for name, region, ord_ in (("salient", sal, 2), ("plain", ~sal, 1)):
        # search this region's split with the other region fitted unsplit: output error of the whole block
        other = [(~region, 3 - ord_)]
        choice = None
        for p in percentiles:
            lo, hi = _split(w, region, p)
            _, what = _basis(w, [(lo, ord_), (hi, ord_)] + other)
            err = _output_error(w - what, s)
            if choice is None or err < choice[0]:
                choice = (err, [(lo, ord_), (hi, ord_)])
        groups[name] = choice[1]
    basis, _ = _basis(w, groups["salient"] + groups["plain"])
    return _joint_stage2(w, basis, s), k


@torch.no_grad()
def fit_faithful(w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.1, blocksize: int = 128,
                 salient_counts=DEFAULT_SALIENT_COUNTS, percentiles=DEFAULT_PERCENTILES) -> FaithfulWeight:
    """The released TWLA weight structure with GPTQ feedback on the damped Hessian h = XᵀX (transformed inputs)."""
    w = w.detach().float().clone()
    n, k = w.shape
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    bits, salient_cols = 0.0, 0
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        q1, n_sal = quantize_block(w1, torch.diagonal(hinv1), h[i1:i2, i1:i2], salient_counts, percentiles)
        err1 = block_errors(w1, q1, hinv1)
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        width = i2 - i1
        bits += n * width * (PLANE_BITS + 1) + n * n_sal * PLANE_BITS + n * SCALES_PER_ROW * SCALE_BITS + width
        salient_cols += n_sal
    return FaithfulWeight(q, bits / (n * k), salient_cols / k)


def faithful_recipe(base):
    """The reference's placement on top of `base` (a Recipe): an own online transform (C, B) for every linear with
    its factor-size rule, o_proj rotated across heads, down_proj's left factor full (TP 1)."""
    import dataclasses

    return dataclasses.replace(base, rotation_sharing="linear", factor_rule="reference", o_proj_rotation="full",
                               row_parallel_blocks=1, lowrank="none", code="ternary")


def faithful_quantizer(*args, salient_counts=DEFAULT_SALIENT_COUNTS, percentiles=DEFAULT_PERCENTILES, **kwargs):
    """A `pipeline.Quantizer` whose weight stage is `fit_faithful` and whose layers are fake-quantized dense
    weights (simulation only: `export` refuses). Arguments as for Quantizer; use `faithful_recipe`."""
    from .baselines import FakeQuantLinear
    from .pipeline import Quantizer

    class FaithfulQuantizer(Quantizer):
        def _quantize_weight(self, w, h):
            if h is None:
                raise ValueError("the paper-faithful weight stage needs calibration data (weight_method e2m-atq)")
            return fit_faithful(w, h, self.r.percdamp, salient_counts=salient_counts, percentiles=percentiles)

        def _quantized_linear(self, qw, left, right, k_blocks, bias, lowrank_a, lowrank_b):
            if k_blocks != 1 or lowrank_a is not None:
                raise ValueError("paper-faithful mode runs with row_parallel_blocks=1 and no low-rank branch")
            mod = FakeQuantLinear(qw.weight, bias, left, right, 16, self.r.default_clip)
            mod.stored_bits = qw.bits * qw.weight.numel() + (0 if left is None else
                                                             SCALE_BITS * (left.numel() + right.numel()))
            mod.salient_fraction = qw.salient_fraction
            return mod

        def sim_layers(self):
            return {name: mod for name, mod in self.model.named_modules() if isinstance(mod, FakeQuantLinear)}

        def bits_per_weight(self) -> float:
            """Honest stored bits/weight: codes, membership, masks, fp16 scales and fp16 rotation factors."""
            layers = self.sim_layers().values()
            return sum(m.stored_bits for m in layers) / sum(m.w.numel() for m in layers)

        def _save_block(self, l, path):  # nothing to resume from: this mode writes no checkpoint
            pass

        def export(self, *a, **k):
            raise NotImplementedError("paper-faithful mode is simulation only; it writes no checkpoint")

    return FaithfulQuantizer(*args, **kwargs)
