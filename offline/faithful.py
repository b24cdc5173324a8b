"""Reference-format simulations (not checkpoint formats): the weight structure of the released TWLA code
("paper-faithful mode"), so a user can see on their own model what that format buys and what it costs in honest
bits, and its cheap part on top of format v2 (a structured second trit plane, `fit_second_plane`), to measure
whether it would be worth a kernel.

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

from .baselines import FakeQuantLinear
from .pipeline import Quantizer
from .weights import block_errors, gptq_setup

STAGE1_ITERS = 15
SCALES_PER_ROW = 10  # two order-2 groups (mu, a0, a1) + two order-1 groups (mu, a)
SCALE_BITS = 16
PLANE_BITS = 2  # a trit stored in 2 bits, as every fixed-width ternary format does
DEFAULT_SALIENT_COUNTS = (1, 2, 4, 8, 16, 32, 63)  # the reference searches 1..63; powers of two keep CPU runs short
DEFAULT_PERCENTILES = tuple(p / 100 for p in range(10, 91, 10))  # the reference: 81 points 10%..90%
SECOND_PLANE_FRACTION = 0.0625  # ~ the salient share the reference's search ends at (6.4% measured)


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


def _joint_stage2(w: torch.Tensor, basis: list[torch.Tensor], s: torch.Tensor,
                  coefficients: bool = False) -> torch.Tensor:
    """ŵ = Σ_a c_a b_a per row with c minimising (w - ŵ) S (w - ŵ)ᵀ, planes frozen (a small ridge keeps empty
    groups' systems regular); c [N, P, 1] itself when `coefficients`."""
    bs = torch.stack(basis, 1)  # [N, P, B]
    bS = bs @ s  # [N, P, B]
    g = bS @ bs.transpose(1, 2)  # [N, P, P]
    r = (bS * w.unsqueeze(1)).sum(-1, keepdim=True)  # [N, P, 1]
    ridge = 1e-6 * g.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    g = g + ridge[:, None, None] * torch.eye(g.shape[-1], dtype=g.dtype)
    c = torch.linalg.solve(g, r)
    return c if coefficients else (c * bs).sum(1)


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
    w, h, hinv = gptq_setup(w, h, percdamp)
    n, k = w.shape
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


def fit_second_plane(w: torch.Tensor, h: torch.Tensor, group_size: int, fraction: float = 0.0625,
                     percdamp: float = 0.1) -> FaithfulWeight:
    """The cheap part of the reference's format on top of format v2: the `fraction` most salient columns (one mask
    shared by all rows, salience as in `fit_faithful`) get a second trit plane with one more integer scale per
    (row, group). Per group, GPTQ order: stage 1, the second plane on the salient columns' residual, one joint
    stage-2 solve of (alpha, mu, beta), then all three rounded to int8 steps of the row's fp16 scale (each clamped
    to int8; the kernel's |qa| + |qm| <= 127 bound is not enforced here, so this is slightly optimistic).

    Bits: 2 per weight (first plane) + 2 per salient-column weight + 16 per (row, group) for (qa, qm) + 8 per
    (row, group) holding a salient column for qb + 16 per row (scale) + K bits of column mask."""
    from twla_vllm.format import CODES

    from .weights import GRID_HEADROOM, _grouped, row_scale_for, stage1_fit

    code = CODES["ternary"]
    w, h, hinv = gptq_setup(w, h, percdamp)
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    n_sal = max(1, round(fraction * k))
    salient = torch.zeros(k, dtype=torch.bool)
    salient[torch.topk((w * w / torch.diagonal(hinv) ** 2).sum(0), n_sal).indices] = True
    _, a_pre, m_pre = stage1_fit(_grouped(w, gs), code, STAGE1_ITERS)
    s = row_scale_for(a_pre.squeeze(-1), m_pre.squeeze(-1), code, GRID_HEADROOM)
    q = torch.zeros_like(w)
    beta_groups = 0
    for i1 in range(0, k, gs):
        i2 = min(i1 + gs, k)
        w1 = w[:, i1:i2].clone()
        v1, a, m = (t.squeeze(1) for t in stage1_fit(w1.unsqueeze(1), code, STAGE1_ITERS))
        basis = [torch.ones_like(w1), v1]
        cols = salient[i1:i2].expand_as(w1)
        if cols.any():
            t2, _, _ = _masked_ternary(w1 - (a * v1 + m), cols)
            basis.append(t2)
            beta_groups += 1
        coef = _joint_stage2(w1, basis, h[i1:i2, i1:i2], coefficients=True)  # [N, P, 1]
        ints = torch.round(coef / s.unsqueeze(-1)).clamp(-127, 127)
        q1 = s * (ints * torch.stack(basis, 1)).sum(1)
        q[:, i1:i2] = q1
        err1 = block_errors(w1, q1, hinv[i1:i2, i1:i2])
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    groups = -(-k // gs)
    bits = 2 * n * k + 2 * n * n_sal + 16 * n * groups + 8 * n * beta_groups + 16 * n + k
    return FaithfulWeight(q, bits / (n * k), n_sal / k)


def faithful_recipe(base):
    """The reference's placement on top of `base` (a Recipe): an own online transform (C, B) for every linear with
    its factor-size rule, o_proj rotated across heads, down_proj's left factor full (TP 1)."""
    import dataclasses

    return dataclasses.replace(base, rotation_sharing="linear", factor_rule="reference", o_proj_rotation="full",
                               row_parallel_blocks=1, lowrank="none", code="ternary")


class SimulatedFormatQuantizer(Quantizer):
    """A `pipeline.Quantizer` whose weight stage is `fit(quantizer, w, h, group_size) -> FaithfulWeight` and whose
    layers are fake-quantized dense weights (simulation only: `export` refuses, and no block state is saved to
    resume from). Other arguments as for Quantizer."""

    def __init__(self, fit, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fit = fit

    def _quantize_weight(self, w, h, group_size):
        if h is None:
            raise ValueError("the reference-format simulations need calibration data (weight_method e2m-atq)")
        return self.fit(self, w, h, group_size)

    def _quantized_linear(self, qw, left, right, act_ranges, bias, lowrank_a, lowrank_b):
        if lowrank_a is not None:
            raise ValueError("the reference-format simulations run without a low-rank branch")
        mod = FakeQuantLinear(qw.weight, bias, left, right, 16, self.r.default_clip, act_ranges)
        mod.stored_bits = qw.bits * qw.weight.numel() + (0 if left is None else
                                                         SCALE_BITS * (left.numel() + right.numel()))
        mod.salient_fraction = qw.salient_fraction
        return mod

    def sim_layers(self):
        return {name: mod for name, mod in self.model.named_modules() if isinstance(mod, FakeQuantLinear)}

    def bits_per_weight(self) -> float:
        """Honest stored bits/weight: codes, masks, scales and fp16 rotation factors."""
        layers = self.sim_layers().values()
        return sum(m.stored_bits for m in layers) / sum(m.w.numel() for m in layers)

    def _save_block(self, l, path):  # nothing to resume from: these modes write no checkpoint
        pass

    def export(self, *a, **k):
        raise RuntimeError("reference-format modes are simulation only; they write no checkpoint")


def faithful_quantizer(*args, salient_counts=DEFAULT_SALIENT_COUNTS, percentiles=DEFAULT_PERCENTILES, **kwargs):
    """The paper-faithful mode (`fit_faithful`); use with `faithful_recipe`."""
    return SimulatedFormatQuantizer(lambda q, w, h, gs: fit_faithful(w, h, q.r.percdamp, salient_counts=salient_counts,
                                                                      percentiles=percentiles), *args, **kwargs)


def second_plane_quantizer(*args, fraction: float = SECOND_PLANE_FRACTION, **kwargs):
    """Format v2 plus a structured second trit plane (`fit_second_plane`) at the recipe's group size."""
    return SimulatedFormatQuantizer(lambda q, w, h, gs: fit_second_plane(w, h, gs, fraction, q.r.percdamp), *args,
                                    **kwargs)
