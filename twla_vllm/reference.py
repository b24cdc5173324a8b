"""Plain-torch definition of a TWLA linear: the CPU serving path and the oracle for every GPU kernel.

y = W_hat @ x' where x' is the rotated, per-token asymmetric fake-quantized activation and
W_hat = alpha * t + mu per (row, K-group). Computed the way an integer kernel does it:

    x' ~= s_m * (q_mk - z_m)                 q: signed int8 container, z: zero point (integers)
    acc_mng = sum_{k in g} q_mk * t_nk       exact: integer products, partial sums < 2**24 in fp32
    y_mn = s_m * ( sum_g alpha_ng * acc_mng + sum_g mu_ng * sx_mg - z_m * wsum_n )
           with sx_mg = sum_{k in g} q_mk and wsum_n = sum_k W_hat_nk

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


def quantize_per_token(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """Asymmetric per-token quantization of fp32 x [M, K] to `bits`.

    Returns (q, s, z): q [M, K] integer-valued fp32 in the signed int8 container
    [-2**(bits-1), 2**(bits-1) - 1], s [M, 1] step, z [M, 1] integer zero point in the same signed
    frame, so that x ~= s * (q - z). Range = clip * [min, max]; rounding is half-to-even.
    """
    qmax = 2**bits - 1
    half = 2 ** (bits - 1)
    xmax = x.amax(dim=-1, keepdim=True) * clip
    xmin = x.amin(dim=-1, keepdim=True) * clip
    s = ((xmax - xmin) / qmax).clamp(min=SCALE_EPS)
    z = torch.round(-xmin / s)
    q = torch.clamp(torch.round(x / s) + z, 0, qmax)
    return q - half, s, z - half


def fake_quant_per_token(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Quantize-dequantize (simulation); identity for bits >= 16."""
    if bits >= 16:
        return x
    q, s, z = quantize_per_token(x.float(), bits, clip)
    return ((q - z) * s).to(x.dtype)


def dequantize_weight(t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """W_hat [N, K] = alpha * t + mu, alpha/mu [N, G] broadcast over K-groups of size K/G."""
    n, k = t.shape
    g = alpha.shape[1]
    w = t.float().view(n, g, k // g) * alpha.float().unsqueeze(-1) + mu.float().unsqueeze(-1)
    return w.view(n, k)


def ternary_linear(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   left: torch.Tensor | None, right: torch.Tensor | None, act_bits: int,
                   act_clip: float, bias: torch.Tensor | None = None,
                   wsum: torch.Tensor | None = None) -> torch.Tensor:
    """One TWLA linear on x [..., K] -> [..., N] in x's dtype (see module docstring).

    t: [N, K] ternary values (int8 or float); alpha, mu: [N, G]; wsum: optional precomputed
    row sums of W_hat (saves a pass over t per call).
    """
    shape = x.shape
    x2 = kron_rotate(x.reshape(-1, shape[-1]).float(), left, right)
    alpha32, mu32 = alpha.float(), mu.float()
    n, k = t.shape
    g = alpha32.shape[1]
    tf = t if t.dtype == torch.float32 else t.float()
    if act_bits >= 16:
        y = x2 @ dequantize_weight(tf, alpha32, mu32).t()
    else:
        q, s, z = quantize_per_token(x2, act_bits, act_clip)
        if wsum is None:
            wsum = dequantize_weight(tf, alpha32, mu32).sum(-1)
        m = q.shape[0]
        if g == 1:
            acc = (q @ tf.t()) * alpha32.t()
        else:  # one exact integer GEMM per K-group, promoted to fp32 with its alpha
            acc_g = torch.bmm(q.view(m, g, k // g).transpose(0, 1), tf.view(n, g, k // g).permute(1, 2, 0))
            acc = torch.einsum("gmn,ng->mn", acc_g, alpha32)
        sx = q.view(m, g, k // g).sum(-1)
        y = s * (acc + sx @ mu32.t() - z * wsum.unsqueeze(0))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous().reshape(*shape[:-1], n)  # fake impl promises a dense layout
