"""Plain-torch definition of a TWLA linear: the CPU serving path and the oracle for every GPU kernel.

y = W_hat @ x' where x' is the rotated, per-token asymmetric fake-quantized activation and
W_hat = alpha * t + mu per (row, K-group). Computed the way an integer kernel does it:

    x' ~= s_m * (q_mk - z_m)                 q: signed int8 container, z: zero point (integers)
    acc_mng = sum_{k in g} q_mk * t_nk       exact: integer products, partial sums < 2**24 in fp32
    y_mn = sum_u s_mu * ( alpha_nu * acc_mnu + mu_nu * sx_mu - z_mu * wsum_nu )

over "units" u: the finer of the weight K-groups and the activation K-blocks (per-token ranges are
taken per contiguous K-block when a row-parallel layer must stay shard-local), with
sx_mu = sum_{k in u} q_mk and wsum_nu = sum_{k in u} W_hat_nk.

Every serving path and the offline simulation call `ternary_linear`, so offline and served numbers
come from one definition.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8  # floor on the activation step so an all-constant token does not divide by zero


def kron_rotate(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> vec(left @ x.reshape(n1, n2) @ right) per token (P = left ⊗ rightᵀ)."""
    if left is None:
        return x
    n1, n2 = left.shape[0], right.shape[0]
    y = torch.matmul(left, x.reshape(-1, n1, n2))
    return torch.matmul(y, right).reshape(x.shape)


def rotate_weight(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Fold the rotation into W (rows = outputs): W' = W Pᵀ, so that W' (P x) = W x."""
    n1, n2 = left.shape[0], right.shape[0]
    return torch.matmul(torch.matmul(left, w.reshape(-1, n1, n2)), right).reshape(w.shape)


def quantize_per_token(x: torch.Tensor, bits: int, clip: float,
                       blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token quantization of fp32 x [M, K] to `bits`, with an independent range per
    (token, contiguous K-block) when blocks > 1 (shard-local ranges for row-parallel layers).

    Returns (q, s, z): q [M, K] integer-valued fp32 in the signed int8 container
    [-2**(bits-1), 2**(bits-1) - 1], s [M, blocks] step, z [M, blocks] integer zero point in the same
    signed frame, so that x ~= s * (q - z) blockwise. Range = clip * [min, max]; rounding half-to-even.
    """
    qmax = 2**bits - 1
    half = 2 ** (bits - 1)
    m, k = x.shape
    xb = x.reshape(m, blocks, k // blocks)
    xmax = xb.amax(dim=-1, keepdim=True) * clip
    xmin = xb.amin(dim=-1, keepdim=True) * clip
    s = ((xmax - xmin) / qmax).clamp(min=SCALE_EPS)
    z = torch.round(-xmin / s)
    q = torch.clamp(torch.round(xb / s) + z, 0, qmax)
    return (q - half).reshape(m, k), s.squeeze(-1), (z - half).squeeze(-1)


def fake_quant_per_token(x: torch.Tensor, bits: int, clip: float, blocks: int = 1) -> torch.Tensor:
    """Quantize-dequantize (simulation) of x [..., K]; identity for bits >= 16."""
    if bits >= 16:
        return x
    x2 = x.reshape(-1, x.shape[-1]).float()
    q, s, z = quantize_per_token(x2, bits, clip, blocks)
    m, k = x2.shape
    xq = (q.view(m, blocks, -1) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return xq.reshape(x.shape).to(x.dtype)


def dequantize_weight(t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """W_hat [N, K] = alpha * t + mu, alpha/mu [N, G] broadcast over K-groups of size K/G."""
    n, k = t.shape
    g = alpha.shape[1]
    w = t.float().view(n, g, k // g) * alpha.float().unsqueeze(-1) + mu.float().unsqueeze(-1)
    return w.view(n, k)


def ternary_linear(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   left: torch.Tensor | None, right: torch.Tensor | None, act_bits: int,
                   act_clip: float, k_blocks: int = 1, bias: torch.Tensor | None = None,
                   wsum: torch.Tensor | None = None) -> torch.Tensor:
    """One TWLA linear on x [..., K] -> [..., N] in x's dtype (see module docstring).

    t: [N, K] ternary values (int8 or float); alpha, mu: [N, G]; k_blocks: activation ranges per
    contiguous K-block; wsum: optional precomputed `unit_sums` (saves a pass over t per call).
    """
    shape = x.shape
    x2 = kron_rotate(x.reshape(-1, shape[-1]).float(), left, right)
    tf = t if t.dtype == torch.float32 else t.float()
    n, k = tf.shape
    if act_bits >= 16:
        y = x2 @ dequantize_weight(tf, alpha, mu).t()
    else:
        # Work on "units": the finer of the weight groups and the activation blocks, so each unit has
        # one alpha/mu and one activation (s, z).
        units = max(alpha.shape[1], k_blocks)
        a_u, m_u = expand_groups(alpha.float(), units), expand_groups(mu.float(), units)
        if wsum is None:
            wsum = unit_sums(tf, a_u, m_u)
        q, s, z = quantize_per_token(x2, act_bits, act_clip, k_blocks)
        m = q.shape[0]
        s_u = s.repeat_interleave(units // k_blocks, dim=1)  # [M, U]
        z_u = z.repeat_interleave(units // k_blocks, dim=1)
        if units == 1:
            acc = (q @ tf.t()) * a_u.t()
            y = s * (acc + q.sum(-1, keepdim=True) * m_u.t() - z * wsum.t())
        else:  # one exact integer GEMM per unit, promoted to fp32 with its alpha and activation step
            ku = k // units
            acc_u = torch.bmm(q.view(m, units, ku).transpose(0, 1), tf.view(n, units, ku).permute(1, 2, 0))
            sx_u = q.view(m, units, ku).sum(-1)  # [M, U]
            y = torch.einsum("umn,nu,mu->mn", acc_u, a_u, s_u)
            y = y + (sx_u * s_u) @ m_u.t() - (z_u * s_u) @ wsum.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous().reshape(*shape[:-1], n)  # fake impl promises a dense layout


def expand_groups(p: torch.Tensor, units: int) -> torch.Tensor:
    """[N, G] per-group parameter -> [N, units] (units is a multiple of G)."""
    return p.repeat_interleave(units // p.shape[1], dim=1)


def prepare_unit_sums(t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """The `wsum` argument of `ternary_linear`, computed once when weights load."""
    units = max(alpha.shape[1], k_blocks)
    return unit_sums(t, expand_groups(alpha.float(), units), expand_groups(mu.float(), units))


def unit_code_sums(t: torch.Tensor, units: int) -> torch.Tensor:
    """[N, units] exact integer sums of t per unit (int16 when they fit): the resident form of wsum
    for integer kernels, which rebuild wsum = alpha_u * tsum + mu_u * unit_size in-kernel."""
    n, k = t.shape
    tsum = t.to(torch.int32).view(n, units, k // units).sum(-1)
    return tsum.to(torch.int16) if k // units <= torch.iinfo(torch.int16).max else tsum


def unit_sums(t: torch.Tensor, alpha_u: torch.Tensor, mu_u: torch.Tensor) -> torch.Tensor:
    """[N, U] sums of W_hat over each unit: alpha_u * sum(t) + mu_u * unit_size."""
    n, k = t.shape
    units = alpha_u.shape[1]
    tsum = t.float().view(n, units, k // units).sum(-1)
    return alpha_u * tsum + mu_u * (k // units)
