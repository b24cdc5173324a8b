"""Plain-torch definition of a TWLA linear (format v2): the CPU serving path and the oracle for every GPU
kernel.

With the layer's integer weights W_int = a * v(c) + m (int8 range, see `format`), row scale s_n and, per
token, the transformed activation x' ~= s_b * (q - z_b) quantized per contiguous K-block b:

    acc_mnb = sum_{k in b} q_mk * W_int_nk                  exact integer dot
    y_mn    = s_n * sum_b s_mb * float32(acc_mnb - z_mb * rowsum_nb)
            + (lowrank_a @ (lowrank_b @ x_m))_n + bias_n     rowsum_nb = sum_{k in b} W_int_nk

Kernels evaluate the integer part exactly (int32) and then the same float32 steps in this order. Here the
integer dot runs as a float32 matmul: exact while every partial sum stays below 2**24 in magnitude, which
|W_int| <= 127 and |q| <= 2**(b-1) guarantee for b <= 4-bit activations up to K = 16 384 (and in practice far
beyond: sums of signed terms grow like sqrt(K)). The integer correction is formed in float64 (exact), or on the
CPU in float32 where a bound shows float32 holds every integer involved exactly (the same numbers, faster).

Every serving path and the offline simulation call `quant_linear`, so offline and served numbers come from
one definition.
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
    """Fold an orthogonal rotation into W (rows = outputs): W' = W Pᵀ, so that W' (P x) = W x."""
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
    # divide by a tensor, not a Python number: CUDA torch turns `t / scalar` into `t * (1 / scalar)`, which
    # moves s by an ulp now and then and flips codes at rounding ties against the kernels' IEEE division
    s = ((xmax - xmin) / torch.full_like(xmax, qmax)).clamp(min=SCALE_EPS)
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


def abs_range_sum(w_int: torch.Tensor, ranges: int) -> float:
    """The largest sum of |W_int| over one row within one of `ranges` contiguous K-ranges (for `quant_linear`)."""
    n, k = w_int.shape
    return float(w_int.abs().float().view(n, ranges, k // ranges).sum(-1).max())


def block_row_sums(w_int: torch.Tensor, k_blocks: int) -> torch.Tensor:
    """[N, k_blocks] exact sums of W_int per contiguous K-block (int32)."""
    n, k = w_int.shape
    return w_int.to(torch.int32).view(n, k_blocks, k // k_blocks).sum(-1).to(torch.int32)


def _float32_is_exact(xr: torch.Tensor, z: torch.Tensor, rowsum: torch.Tensor, act_bits: int,
                      w_abs: float) -> bool:
    """Whether float32 holds acc, z * rowsum and their difference exactly: integer weights (int32 row sums) and
    (max|q| + max|z|) * w_abs < 2**24, w_abs bounding any row's sum of |W_int| within one range. Then the float64
    correction below would give the same numbers, at about a third of the CPU time of a simulated layer. Checked
    on the CPU only (the check reads z back; a GPU keeps the float64 form and never waits)."""
    if xr.device.type != "cpu" or rowsum.dtype != torch.int32:
        return False
    zmax = float(z.abs().max()) if z.numel() else 0.0
    return (2 ** (act_bits - 1) + zmax) * w_abs < 2**24


def quant_linear(x: torch.Tensor, w_int: torch.Tensor, row_scale: torch.Tensor, rowsum: torch.Tensor,
                 left: torch.Tensor | None, right: torch.Tensor | None, act_bits: int, act_clip: float,
                 lowrank_a: torch.Tensor | None = None, lowrank_b: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, w_abs: float | None = None) -> torch.Tensor:
    """One TWLA linear on x [..., K] -> [..., N] in x's dtype (see module docstring).

    w_int: [N, K] integer weights (int8, or float32 holding integers: what CPU serving keeps resident);
    row_scale: [N] or [N, 1]; rowsum: [N, KB] from `block_row_sums` (KB = the layer's k_blocks); w_abs: the
    largest sum of |W_int| over one row within one range (`abs_range_sum`) if known, else 127 x the range width
    is assumed (it only decides whether the CPU may take the float32 epilogue; the result is the same)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    xr = kron_rotate(x2, left, right)
    wf = w_int if w_int.dtype == torch.float32 else w_int.float()
    n, k = wf.shape
    s_n = row_scale.float().reshape(1, n)
    if act_bits >= 16:
        y = (xr @ wf.t()) * s_n
    else:
        kb = rowsum.shape[1]
        q, s, z = quantize_per_token(xr, act_bits, act_clip, kb)
        width = k // kb
        exact32 = _float32_is_exact(xr, z, rowsum, act_bits, 127.0 * width if w_abs is None else w_abs)
        y = None
        for b in range(kb):  # one [M, N] partial at a time: many ranges never hold an [M, KB, N] tensor
            cols = slice(b * width, (b + 1) * width)
            acc = q[:, cols] @ wf[:, cols].t()
            if exact32:  # acc - z * rowsum in place, one float32 pass: the same integers, so the same result
                part = acc.addr_(z[:, b], rowsum[:, b].float(), alpha=-1).mul_(s[:, b:b + 1])
            else:
                corr = z[:, b:b + 1].double() * rowsum[:, b].double().unsqueeze(0)
                part = (acc.double() - corr).float() * s[:, b:b + 1]
            y = part if y is None else y.add_(part)
        y = y * s_n
    if lowrank_a is not None:
        y = y + (x2 @ lowrank_b.float().t()) @ lowrank_a.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).contiguous().reshape(*shape[:-1], n)  # fake impl promises a dense layout
