"""Triton kernels for TWLA linears (CUDA; also run under TRITON_INTERPRET=1 for CPU tests).

act_quant:     per token, Kronecker rotation L·X·R (fp32-accurate 3xTF32 tensor-core dots), per-(token, K-block)
               asymmetric quantization to `bits` into int8 containers; emits step s, zero point z per block
               and the activation sums sx per unit (the finer of weight K-groups and K-blocks).
ternary_gemv:  decode (M <= 8) on CUDA cores: byte-lane SWAR unpack, (w >> 2i) & 0x03030303 gives four
               biased codes c = t + 1 per op, multiplied by four int8 activations per `dp4a`; optional
               split-K with fp32 atomics. Exact int32 sums per unit; Σ t·x = Σ c·x − Σ x.
ternary_gemm:  M > 8 on int8 tensor cores (codes unpacked in registers, or into an int8 scratch for
               prefill); the loop only promotes exact per-unit int32 dots with s·α (one FMA per element);
               the rank-U terms μ·sx − z·wsum are added after the loop as two small fp32 dots.

Every kernel evaluates y = Σ_u s·(α·acc + μ·sx − z·wsum) of `twla_vllm.reference`, with
wsum = α·tsum + μ·|u| rebuilt in-kernel from int16 code sums (exact) so only fp16 α/μ stay resident.
Rounding is half-to-even everywhere. Only pure `tl` runs in the interpreter: `dp4a` has a shift/mask twin.
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
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + Σ_j a.byte[j]·b.byte[j] over four signed bytes of int32 words (PTX dp4a.s32.s32)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for j in tl.static_range(4):
            r += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return r


@triton.jit
def _act_quant_kernel(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, sx_ptr, stride_x, stride_q,
                      ROWS: tl.constexpr, COLS: tl.constexpr, RBP: tl.constexpr, CP: tl.constexpr,
                      HAS_ROT: tl.constexpr, KB: tl.constexpr, BITS: tl.constexpr, CLIP: tl.constexpr,
                      U: tl.constexpr, UBP: tl.constexpr, KUP: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (token, K-block). The token row is viewed as [ROWS, COLS] (= [n1, n2] when rotated);
    # K-block b owns rows [b*RB, (b+1)*RB), and the left factor is block-diagonal along those blocks
    # (checked at load), so blocks rotate and quantize independently: more CTAs, smaller tiles.
    m = tl.program_id(0)
    b = tl.program_id(1)
    RB: tl.constexpr = ROWS // KB
    ri = tl.arange(0, RBP)
    ci = tl.arange(0, CP)
    valid = (ri[:, None] < RB) & (ci[None, :] < COLS)
    offs = (b * RB + ri[:, None]) * COLS + ci[None, :]
    x = tl.load(x_ptr + m * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_ROT:
        lm = tl.load(l_ptr + (b * RB + ri[:, None]) * ROWS + b * RB + ri[None, :],
                     mask=(ri[:, None] < RB) & (ri[None, :] < RB), other=0.0)
        rm = tl.load(r_ptr + ci[:, None] * COLS + ci[None, :],
                     mask=(ci[:, None] < COLS) & (ci[None, :] < COLS), other=0.0)
        x = tl.dot(lm, x, input_precision=PRECISION)
        x = tl.dot(x, rm, input_precision=PRECISION)
    qmax = 2.0 ** BITS - 1.0
    half = 2.0 ** (BITS - 1)
    hi = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0) * CLIP
    lo = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=1), axis=0) * CLIP
    # IEEE-rounded divisions (div_rn): the default fast fp32 division differs from torch's in the
    # last bit, which flips a rounding decision now and then
    s = tl.maximum(tl.math.div_rn(hi - lo, qmax), 1e-8)
    z = _round_half_even(tl.math.div_rn(-lo, s))
    tl.store(s_ptr + m * KB + b, s)
    tl.store(z_ptr + m * KB + b, z - half)
    q = _round_half_even(tl.math.div_rn(x, s)) + z
    q = tl.minimum(tl.maximum(q, 0.0), qmax) - half
    tl.store(q_ptr + m * stride_q + offs, q.to(tl.int8), mask=valid)
    # this block's per-unit sums of the stored codes, read back as [U/KB, K/U] (any unit size)
    tl.debug_barrier()
    UB: tl.constexpr = U // KB
    KU: tl.constexpr = (ROWS * COLS) // U
    ui = tl.arange(0, UBP)
    ji = tl.arange(0, KUP)
    qu = tl.load(q_ptr + m * stride_q + b * RB * COLS + ui[:, None] * KU + ji[None, :],
                 mask=(ui[:, None] < UB) & (ji[None, :] < KU), other=0)
    tl.store(sx_ptr + m * U + b * UB + ui, tl.sum(qu.to(tl.int32), axis=1), mask=ui < UB)


def act_quant(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, bits: int, clip: float,
              k_blocks: int, units: int,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], s fp32 [M, KB], z fp32 [M, KB], sx int32 [M, units]) as
    `reference.quantize_per_token` of `reference.kron_rotate(x, left, right)`; sx = per-unit sums of q.
    A left factor must be block-diagonal over the k_blocks (TwlaLinearMethod checks it at load).
    `out`: preallocated outputs (tests poison them)."""
    m, k = x.shape
    x = x.contiguous()
    q, s, z, sx = out or (torch.empty(m, k, dtype=torch.int8, device=x.device),
                          torch.empty(m, k_blocks, dtype=torch.float32, device=x.device),
                          torch.empty(m, k_blocks, dtype=torch.float32, device=x.device),
                          torch.empty(m, units, dtype=torch.int32, device=x.device))
    if left is not None:
        rows, cols = left.shape[0], right.shape[0]
        rbp = max(16, triton.next_power_of_2(rows // k_blocks))  # tl.dot needs >= 16
    else:  # no rotation: any [rows, cols] view whose rows split into the k_blocks
        cols = _block_k(k // k_blocks, 256)
        rows = k // cols
        rbp = triton.next_power_of_2(rows // k_blocks)
    cp = max(16, triton.next_power_of_2(cols))
    if m:
        _act_quant_kernel[(m, k_blocks)](
            x, left if left is not None else x, right if right is not None else x, q, s, z, sx, x.stride(0),
            q.stride(0), ROWS=rows, COLS=cols, RBP=rbp, CP=cp, HAS_ROT=left is not None, KB=k_blocks, BITS=bits,
            CLIP=float(clip), U=units, UBP=triton.next_power_of_2(units // k_blocks),
            KUP=triton.next_power_of_2(k // units), PRECISION="ieee" if x.device.type == "cpu" else "tf32x3",
            num_warps=4 if rbp * cp <= 4096 else 8)
    return q, s, z, sx


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
def _unit_params(a_ptr, mu_ptr, ts_ptr, rn, ru, N, G: tl.constexpr, U: tl.constexpr, KU):
    """α, μ, wsum = α·tsum + μ·KU for rows rn (any shape) × units ru (broadcastable), fp32."""
    ok = (rn < N) & (ru < U)
    g = ru // (U // G)
    alpha = tl.load(a_ptr + rn * G + g, mask=ok, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + rn * G + g, mask=ok, other=0.0).to(tl.float32)
    ts = tl.load(ts_ptr + rn * U + ru, mask=ok, other=0).to(tl.float32)
    return alpha, mu, alpha * ts + mu * KU


@triton.jit
def _ternary_gemm_kernel(q_ptr, s_ptr, z_ptr, sx_ptr, w_ptr, a_ptr, mu_ptr, ts_ptr, y_ptr, M, N, K,
                         stride_q, stride_w, stride_y, G: tl.constexpr, KB: tl.constexpr, U: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INT8_W: tl.constexpr,
                         UC: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # split-K (small grids): each split owns whole units and adds its share
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # One flat, pipelinable K loop. With several units (K-groups / K-blocks) every BK chunk (BK divides
    # the unit) is promoted with s·α right after its exact int32 dot (DeepGEMM-style); with one unit
    # the int32 accumulator runs over all of K.
    KU = K // U
    y = tl.zeros([BM, BN], dtype=tl.float32)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    KS = K // SPLIT
    for k0 in range(pid_k * KS, (pid_k + 1) * KS, BK):
        a = tl.load(q_ptr + rm[:, None] * stride_q + k0 + rk[None, :], mask=rm[:, None] < M, other=0)
        if INT8_W:  # pre-unpacked int8 weights, K-major like the activations
            t = tl.load(w_ptr + rn[:, None] * stride_w + k0 + rk[None, :], mask=rn[:, None] < N, other=0)
        else:
            t = _unpack_codes(w_ptr, rn, k0 // 16, stride_w, N, BN, BK).to(tl.int8)
        if U == 1:
            acc = tl.dot(a, tl.trans(t), acc, out_dtype=tl.int32)
        else:
            part = tl.dot(a, tl.trans(t), out_dtype=tl.int32)
            u = k0 // KU
            s = tl.load(s_ptr + rm * KB + u // (U // KB), mask=rm < M, other=0.0)
            alpha = tl.load(a_ptr + rn * G + u // (U // G), mask=rn < N, other=0.0).to(tl.float32)
            y += part.to(tl.float32) * (s[:, None] * alpha[None, :])
    if U == 1:
        s = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
        alpha = tl.load(a_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * (s[:, None] * alpha[None, :])
    # rank-U terms, off the main loop: Σ_u (s·sx)[m,u]·μ[u,n] − (s·z)[m,u]·wsum[u,n] over this split's units
    if U >= SPLIT:
        u_lo = pid_k * (U // SPLIT)
        u_hi = u_lo + U // SPLIT
    else:  # one unit split along K: the first split adds its terms
        u_lo = 0
        u_hi = tl.where(pid_k == 0, U, 0)
    for u0 in range(u_lo, u_hi, UC):
        ru = u0 + tl.arange(0, UC)
        ok = (rm[:, None] < M) & (ru[None, :] < u_hi)
        su = tl.load(s_ptr + rm[:, None] * KB + ru[None, :] // (U // KB), mask=ok, other=0.0)
        zu = tl.load(z_ptr + rm[:, None] * KB + ru[None, :] // (U // KB), mask=ok, other=0.0)
        sxu = tl.load(sx_ptr + rm[:, None] * U + ru[None, :], mask=ok, other=0).to(tl.float32)
        _, mu, ws = _unit_params(a_ptr, mu_ptr, ts_ptr, rn[None, :], ru[:, None], N, G, U, KU)
        ws = tl.where(ru[:, None] < u_hi, ws, 0.0)
        y += tl.dot(su * sxu, mu, input_precision=PRECISION)
        y -= tl.dot(su * zu, ws, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptr + rm[:, None] * stride_y + rn[None, :], y, mask=mask)


@triton.jit
def _ternary_gemv_kernel(x_ptr, s_ptr, z_ptr, w_ptr, a_ptr, mu_ptr, ts_ptr, y_ptr, M, N, K,
                         stride_x, stride_w, stride_y, G: tl.constexpr, KB: tl.constexpr, U: tl.constexpr,
                         WU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                         SPLIT: tl.constexpr, ASM: tl.constexpr):
    # x_ptr: the int8 activations viewed as int32 words [M, K/4]; w_ptr: packed codes [N, K/16].
    # Word p of a weight row holds codes 16p..16p+15; (word >> 2i) & 0x03030303 = codes 16p+4i..16p+4i+3,
    # which meet activation word 4p+i in one dp4a.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rp = tl.arange(0, BP)
    span = K // 16 // SPLIT  # WU: words per unit
    w_lo = pid_s * span
    KU = K // U
    y = tl.zeros([BM, BN], dtype=tl.float32)
    acc_tot = tl.zeros([BM, BN], dtype=tl.int32)
    sx_tot = tl.zeros([BM], dtype=tl.int32)
    ones = tl.full([BM, BP], 0x01010101, dtype=tl.int32)
    for w0 in range(w_lo, w_lo + span, BP):
        wt = tl.load(w_ptr + rn[:, None] * stride_w + w0 + rp[None, :], mask=rn[:, None] < N, other=0)
        acc = tl.zeros([BM, BN, BP], dtype=tl.int32)
        sxw = tl.zeros([BM, BP], dtype=tl.int32)
        for i in tl.static_range(4):
            xi = tl.load(x_ptr + rm[:, None] * stride_x + 4 * (w0 + rp[None, :]) + i, mask=rm[:, None] < M,
                         other=0)
            wl = (wt >> (2 * i)) & 0x03030303
            acc = _dp4a(tl.broadcast_to(wl[None, :, :], (BM, BN, BP)),
                        tl.broadcast_to(xi[:, None, :], (BM, BN, BP)), acc, ASM)
            sxw = _dp4a(xi, ones, sxw, ASM)
        if U == 1:
            acc_tot += tl.sum(acc, axis=2)
            sx_tot += tl.sum(sxw, axis=1)
        else:
            # the chunk holds UPI whole units (BP >= WU) or 1/(WU/BP) of one unit (BP < WU)
            UPI: tl.constexpr = BP // WU if BP >= WU else 1
            acc_u = tl.sum(tl.reshape(acc, (BM, BN, UPI, BP // UPI)), axis=3)
            sx_u = tl.sum(tl.reshape(sxw, (BM, UPI, BP // UPI)), axis=2)
            ru = w0 // WU + tl.arange(0, UPI)
            alpha, mu, ws = _unit_params(a_ptr, mu_ptr, ts_ptr, rn[:, None], ru[None, :], N, G, U, KU)
            if BP < WU:
                ws = ws * (BP / WU)  # this chunk's share of the unit's Σ W_hat
            su = tl.load(s_ptr + rm[:, None] * KB + ru[None, :] // (U // KB), mask=rm[:, None] < M, other=0.0)
            zu = tl.load(z_ptr + rm[:, None] * KB + ru[None, :] // (U // KB), mask=rm[:, None] < M, other=0.0)
            sxf = sx_u.to(tl.float32)
            inner = (alpha[None, :, :] * (acc_u - sx_u[:, None, :]).to(tl.float32) + mu[None, :, :] * sxf[:, None, :]
                     - zu[:, None, :] * ws[None, :, :])
            y += tl.sum(su[:, None, :] * inner, axis=2)
    if U == 1:
        alpha = tl.load(a_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        ts = tl.load(ts_ptr + rn, mask=rn < N, other=0).to(tl.float32)
        ws = (alpha * ts + mu * KU) / SPLIT  # each split adds its share of the row's Σ W_hat
        s = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
        z = tl.load(z_ptr + rm, mask=rm < M, other=0.0)
        y = s[:, None] * (alpha[None, :] * (acc_tot - sx_tot[:, None]).to(tl.float32)
                          + mu[None, :] * sx_tot.to(tl.float32)[:, None] - z[:, None] * ws[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptr + rm[:, None] * stride_y + rn[None, :], y, mask=mask)


def _block_k(unit: int, cap: int) -> int:
    for bk in (256, 128, 64, 32, 16):
        if bk <= cap and unit % bk == 0:
            return bk
    raise ValueError(f"unit size {unit} is not a multiple of 16")


# Fixed tables (no autotuning inside CUDA graphs), from benchmarks/kernel_sweep.py on the H100.
GEMV_MAX_M = 8  # up to here: CUDA-core dp4a GEMV
# GEMV by M bucket (max M, config); split-K doubles while the grid has fewer than split_ctas CTAs
GEMV_CONFIGS = [(1, {"BN": 8, "BP": 128, "warps": 2, "stages": 2, "split_ctas": 1056}),
                (GEMV_MAX_M, {"BN": 32, "BP": 64, "warps": 4, "stages": 2, "split_ctas": 1056})]
# (BM, BN, BK cap, warps, stages) by M bucket
GEMM_CONFIGS = ((16, 32, 256, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 4), (128, 128, 128, 8, 4))
PREFILL_UNPACK_M = 128  # from here on, unpack to an int8 scratch and run plain int8 tensor-core tiles
GEMM_SPLIT_CTAS = 132  # below the unpack threshold: split K (fp32 atomics) while 2x the grid fits one wave


def _gemv_words(wk: int, wu: int, cap: int) -> int:
    """Words per GEMV step: a power of two dividing K/16 that holds whole units or divides one."""
    bp = cap
    while bp > 1 and (wk % bp or (bp % wu and wu % bp)):
        bp //= 2
    return bp


def _gemv_split(n_ctas: int, words: int, bp: int, split_ctas: int) -> int:
    split = 1
    while n_ctas * split < split_ctas and words % (2 * split * bp) == 0:
        split *= 2
    return split


def ternary_gemm(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor,
                 alpha: torch.Tensor, mu: torch.Tensor, tsum: torch.Tensor, out_dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = Σ_u s·(α·(q·tᵀ) + μ·sx − z·wsum) per unit, as `reference.ternary_linear`.

    q/s/z/sx from `act_quant`; packed [N, K/16] int32 codes; alpha/mu [N, G] (fp16 or fp32);
    tsum [N, U] int16/int32 per-unit sums of t (`reference.unit_code_sums`)."""
    m, k = q.shape
    n = packed.shape[0]
    g, kb, u = alpha.shape[1], s.shape[1], tsum.shape[1]
    if m == 0:
        return out if out is not None else torch.empty(0, n, dtype=out_dtype, device=q.device)
    if m <= GEMV_MAX_M:
        c = next(cfg for max_m, cfg in GEMV_CONFIGS if m <= max_m)
        bp, bn = _gemv_words(k // 16, k // 16 // u, c["BP"]), c["BN"]
        n_ctas = triton.cdiv(n, bn)
        split = _gemv_split(n_ctas, k // 16, bp, c["split_ctas"])
        if split > 1:
            y = torch.zeros(m, n, dtype=torch.float32, device=q.device)
        else:
            y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=q.device)
        _ternary_gemv_kernel[(n_ctas, split)](
            q.view(torch.int32), s, z, packed, alpha, mu, tsum, y, m, n, k, q.stride(0) // 4, packed.stride(0),
            y.stride(0), G=g, KB=kb, U=u, WU=k // 16 // u, BM=triton.next_power_of_2(m), BN=bn, BP=bp, SPLIT=split,
            ASM=q.device.type == "cuda", num_warps=c["warps"], num_stages=c["stages"])
        return _from_split(y, out, out_dtype) if split > 1 else y
    int8_w = m >= PREFILL_UNPACK_M
    bm, bn, bkc, warps, stages = GEMM_CONFIGS[0 if m <= 32 else 1 if m <= 64 else 2 if m <= 1024 else 3]
    w = unpack_int8(packed) if int8_w else packed
    bk = _block_k(k // u, bkc)
    grid_mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while (not int8_w and grid_mn * split * 2 <= GEMM_SPLIT_CTAS and k % (2 * split * bk) == 0
           and (u == 1 or u % (2 * split) == 0)):
        split *= 2
    if split > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=q.device)
    else:
        y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=q.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _ternary_gemm_kernel[grid](q, s, z, sx, w, alpha, mu, tsum, y, m, n, k, q.stride(0), w.stride(0),
                               y.stride(0), G=g, KB=kb, U=u, BM=bm, BN=bn, BK=bk, INT8_W=int8_w, UC=16,
                               SPLIT=split, PRECISION="ieee" if q.device.type == "cpu" else "tf32x3",
                               num_warps=warps, num_stages=stages)
    return _from_split(y, out, out_dtype) if split > 1 else y


def _from_split(y: torch.Tensor, out: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 split-K accumulator -> the caller's dtype / buffer."""
    if out is None:
        return y.to(out_dtype)
    out.copy_(y)
    return out
