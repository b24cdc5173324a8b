"""Triton kernels for TWLA linears (CUDA; also run under TRITON_INTERPRET=1 for CPU tests).

act_quant:     per token, Kronecker rotation L·X·R (fp32-accurate 3xTF32 tensor-core dots), per-(token, K-block) asymmetric
               quantization to `bits` into int8 containers; emits step s and zero point z per block.
ternary_gemm:  int8 activations × 2-bit packed codes (unpacked in registers from the byte-lane int32
               words), exact int32 accumulation per unit (K-group ∩ K-block), fp32 epilogue
               y = Σ_u s·(α·acc + μ·sx − z·wsum) with sx the per-unit activation sums.
ternary_gemv:  same math on CUDA cores for decode (M ≤ 8): no tensor-core tile padding.

The torch reference (`twla_vllm.reference`) defines the results; rounding is half-to-even in both.
Only pure `tl` operations are used so the interpreter can run every kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _act_quant_kernel(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, K, stride_x, stride_q,
                      ROWS: tl.constexpr, COLS: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr,
                      HAS_ROT: tl.constexpr, KB: tl.constexpr, BITS: tl.constexpr, CLIP: tl.constexpr,
                      PRECISION: tl.constexpr):
    # the token row is viewed as [ROWS, COLS] (= [n1, n2] when rotated, [KB, K/KB] otherwise),
    # padded to powers of two [RP, CP]; K-block b owns rows [b*ROWS/KB, (b+1)*ROWS/KB)
    m = tl.program_id(0)
    ri = tl.arange(0, RP)
    ci = tl.arange(0, CP)
    valid = (ri[:, None] < ROWS) & (ci[None, :] < COLS)
    offs = ri[:, None] * COLS + ci[None, :]
    x = tl.load(x_ptr + m * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_ROT:
        lm = tl.load(l_ptr + ri[:, None] * ROWS + ri[None, :],
                     mask=(ri[:, None] < ROWS) & (ri[None, :] < ROWS), other=0.0)
        rm = tl.load(r_ptr + ci[:, None] * COLS + ci[None, :],
                     mask=(ci[:, None] < COLS) & (ci[None, :] < COLS), other=0.0)
        x = tl.dot(lm, x, input_precision=PRECISION)
        x = tl.dot(x, rm, input_precision=PRECISION)
    qmax = 2.0 ** BITS - 1.0
    half = 2.0 ** (BITS - 1)
    row_max = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    row_min = tl.min(tl.where(valid, x, float("inf")), axis=1)
    s_row = tl.zeros([RP], dtype=tl.float32)
    z_row = tl.zeros([RP], dtype=tl.float32)
    RB: tl.constexpr = ROWS // KB
    for b in tl.static_range(KB):
        in_b = (ri >= b * RB) & (ri < (b + 1) * RB)
        hi = tl.max(tl.where(in_b, row_max, float("-inf")), axis=0) * CLIP
        lo = tl.min(tl.where(in_b, row_min, float("inf")), axis=0) * CLIP
        s = tl.maximum((hi - lo) / qmax, 1e-8)
        z = _round_half_even(-lo / s)
        tl.store(s_ptr + m * KB + b, s)
        tl.store(z_ptr + m * KB + b, z - half)
        s_row = tl.where(in_b, s, s_row)
        z_row = tl.where(in_b, z, z_row)
    q = _round_half_even(x / s_row[:, None]) + z_row[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), qmax) - half
    tl.store(q_ptr + m * stride_q + offs, q.to(tl.int8), mask=valid)


def act_quant(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, bits: int, clip: float,
              k_blocks: int, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], s fp32 [M, KB], z fp32 [M, KB]) as `reference.quantize_per_token`
    of `reference.kron_rotate(x, left, right)`. `out`: preallocated (q, s, z) (tests poison them)."""
    m, k = x.shape
    x = x.contiguous()
    q, s, z = out or (torch.empty(m, k, dtype=torch.int8, device=x.device),
                      torch.empty(m, k_blocks, dtype=torch.float32, device=x.device),
                      torch.empty(m, k_blocks, dtype=torch.float32, device=x.device))
    if left is not None:
        rows, cols = left.shape[0], right.shape[0]
    else:
        rows, cols = k_blocks, k // k_blocks
    rp = max(16, triton.next_power_of_2(rows))
    cp = max(16, triton.next_power_of_2(cols))
    if m:
        _act_quant_kernel[(m,)](x, left if left is not None else x, right if right is not None else x, q, s, z,
                                k, x.stride(0), q.stride(0), ROWS=rows, COLS=cols, RP=rp, CP=cp,
                                HAS_ROT=left is not None, KB=k_blocks, BITS=bits, CLIP=float(clip),
                                PRECISION="ieee" if x.device.type == "cpu" else "tf32x3",
                                num_warps=4 if rp * cp <= 4096 else 8)
    return q, s, z


@triton.jit
def _unpack_codes(w_ptr, rn, word0, stride_w, N, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, BK] int32 ternary t = code - 1 for rows rn, codes word0*16 .. word0*16+BK-1."""
    WPB: tl.constexpr = BK // 16
    wi = tl.arange(0, WPB)
    words = tl.load(w_ptr + rn[:, None] * stride_w + word0 + wi[None, :], mask=rn[:, None] < N, other=0x55555555)
    j = tl.arange(0, 16)
    shifts = 8 * (j % 4) + 2 * (j // 4)
    codes = (words[:, :, None] >> shifts[None, None, :]) & 3
    return tl.reshape(codes, (BN, BK)) - 1


@triton.jit
def _unpack_kernel(w_ptr, t_ptr, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    t = _unpack_codes(w_ptr, rn, pid_k * (BK // 16), stride_w, N, BN, BK)
    rk = pid_k * BK + tl.arange(0, BK)
    tl.store(t_ptr + rn[:, None] * K + rk[None, :], t.to(tl.int8), mask=(rn[:, None] < N) & (rk[None, :] < K))


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """Packed codes [N, K/16] -> int8 t [N, K] (scratch for the tensor-core prefill GEMM)."""
    n, k = packed.shape[0], packed.shape[1] * 16
    t = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    bk = _block_k(k, 256)
    _unpack_kernel[(triton.cdiv(n, 32), k // bk)](packed, t, n, k, packed.stride(0), BN=32, BK=bk, num_warps=4)
    return t


@triton.jit
def _ternary_gemm_kernel(q_ptr, s_ptr, z_ptr, w_ptr, a_ptr, mu_ptr, ws_ptr, y_ptr, M, N, K,
                         stride_q, stride_w, stride_y, G: tl.constexpr, KB: tl.constexpr, U: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                         INT8_W: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # One flat, pipelinable K loop. With several units (K-groups / K-blocks) every BK chunk (BK divides
    # the unit) is promoted to fp32 right after its exact int32 dot (DeepGEMM-style); with one unit the
    # int32 accumulator runs over all of K and the epilogue happens once.
    KU = K // U
    y = tl.zeros([BM, BN], dtype=tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    sx = tl.zeros([BM], dtype=tl.int32)
    for k0 in range(0, K, BK):
        a = tl.load(q_ptr + rm[:, None] * stride_q + k0 + rk[None, :], mask=rm[:, None] < M, other=0)
        if INT8_W:  # pre-unpacked int8 weights, K-major like the activations
            t = tl.load(w_ptr + rn[:, None] * stride_w + k0 + rk[None, :], mask=rn[:, None] < N, other=0)
        else:
            t = _unpack_codes(w_ptr, rn, k0 // 16, stride_w, N, BN, BK)
        if U == 1:
            if USE_DOT:
                acc += tl.dot(a, tl.trans(t.to(tl.int8)), out_dtype=tl.int32)
            else:
                acc += tl.sum(a.to(tl.int32)[:, None, :] * t[None, :, :], axis=2)
            sx += tl.sum(a.to(tl.int32), axis=1)
        else:
            if USE_DOT:
                part = tl.dot(a, tl.trans(t.to(tl.int8)), out_dtype=tl.int32)
            else:
                part = tl.sum(a.to(tl.int32)[:, None, :] * t[None, :, :], axis=2)
            psx = tl.sum(a.to(tl.int32), axis=1)
            u = k0 // KU
            b = u // (U // KB)
            g = u // (U // G)
            s = tl.load(s_ptr + rm * KB + b, mask=rm < M, other=0.0)
            z = tl.load(z_ptr + rm * KB + b, mask=rm < M, other=0.0)
            alpha = tl.load(a_ptr + rn * G + g, mask=rn < N, other=0.0)
            mu = tl.load(mu_ptr + rn * G + g, mask=rn < N, other=0.0)
            ws = tl.load(ws_ptr + rn * U + u, mask=rn < N, other=0.0) * (BK / KU)  # this chunk's share
            y += s[:, None] * (alpha[None, :] * part.to(tl.float32) + mu[None, :] * psx.to(tl.float32)[:, None]
                               - z[:, None] * ws[None, :])
    if U == 1:
        s = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
        z = tl.load(z_ptr + rm, mask=rm < M, other=0.0)
        alpha = tl.load(a_ptr + rn, mask=rn < N, other=0.0)
        mu = tl.load(mu_ptr + rn, mask=rn < N, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = s[:, None] * (alpha[None, :] * acc.to(tl.float32) + mu[None, :] * sx.to(tl.float32)[:, None]
                          - z[:, None] * ws[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _block_k(unit: int, cap: int) -> int:
    for bk in (256, 128, 64, 32, 16):
        if bk <= cap and unit % bk == 0:
            return bk
    raise ValueError(f"unit size {unit} is not a multiple of 16")


# (BM, BN, BK cap, warps, stages) by M bucket: fixed tables, no autotuning inside CUDA graphs
_GEMV_CONFIG = (8, 256, 2, 3)  # BN, BK cap, warps, stages (M <= 8, CUDA cores); from kernel_sweep.py
_GEMM_CONFIGS = ((16, 32, 256, 4, 3), (64, 64, 256, 4, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3))
PREFILL_UNPACK_M = 128  # from here on, unpack to an int8 scratch and run plain int8 tensor-core tiles


def ternary_gemm(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                 mu: torch.Tensor, wsum: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """y [M, N] = epilogue(q [M, K] int8 · t(packed)ᵀ) per unit, as `reference.ternary_linear`."""
    m, k = q.shape
    n = packed.shape[0]
    g, kb, u = alpha.shape[1], s.shape[1], wsum.shape[1]
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return y
    int8_w = m >= PREFILL_UNPACK_M
    if m <= 8:
        bn, bkc, warps, stages = _GEMV_CONFIG
        bm, use_dot = (1 if m == 1 else 8), False
    else:
        bm, bn, bkc, warps, stages = _GEMM_CONFIGS[0 if m <= 32 else 1 if m <= 64 else 2 if m <= 1024 else 3]
        use_dot = True
    w = unpack_int8(packed) if int8_w else packed
    bk = _block_k(k // u, bkc)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _ternary_gemm_kernel[grid](q, s, z, w, alpha, mu, wsum, y, m, n, k, q.stride(0), w.stride(0),
                               y.stride(0), G=g, KB=kb, U=u, BM=bm, BN=bn, BK=bk, USE_DOT=use_dot,
                               INT8_W=int8_w, num_warps=warps, num_stages=stages)
    return y
