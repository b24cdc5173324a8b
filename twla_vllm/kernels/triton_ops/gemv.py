"""Decode GEMV (M <= 8) on CUDA cores: dp4a on byte lanes, integer group promotion."""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import _finish, _promote
from .unpack import _row_offsets, _rows_in, _word_offsets


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
def _gemv_sum(xrow_ptr, w_ptr, wrow, grow, qa_ptr, qm_ptr, wt, w_lo, w_hi, stride_wk, stride_gg, BITS: tl.constexpr,
              STEP: tl.constexpr, OFF: tl.constexpr, RC: tl.constexpr, VW: tl.constexpr, GW: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, ASM: tl.constexpr, LATE_SUM: tl.constexpr):
    """int32 [BM, BN] = Σ over packed words [w_lo, w_hi) of rows (word offsets wrow, group-scale offsets grow) of
    (a*v(c) + m)·x, exact. xrow_ptr [BM, 1]: each token's int8 activations viewed as int32 words; wt: the first
    chunk's words, loaded by the caller (which may issue that load before it waits for its activations)."""
    LANES: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (2**BITS - 1) * 0x01010101
    rp = tl.arange(0, BP)
    UPI: tl.constexpr = BP // GW if BP >= GW else 1  # weight groups touched per chunk
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    acc3 = tl.zeros([BM, BN, BP if LATE_SUM else 1], dtype=tl.int32)
    ones = tl.full([BM, BP], 0x01010101, dtype=tl.int32)
    for w0 in range(w_lo, w_hi, BP):
        cur = wt
        # the next chunk's words go out before this chunk's dp4a, so their latency overlaps it (the last chunk
        # re-reads itself)
        nxt = _word_offsets(tl.minimum(w0 + BP, w_hi - BP) + rp, RC, VW, stride_wk)
        wt = tl.load(w_ptr + wrow[:, None] + nxt[None, :])
        cx = tl.zeros([BM, BN, BP], dtype=tl.int32)
        sx = tl.zeros([BM, BP], dtype=tl.int32)
        for i in tl.static_range(LANES):
            xi = tl.load(xrow_ptr + LANES * (w0 + rp[None, :]) + i)
            wl = (cur >> (BITS * i)) & MASK
            cx = _dp4a(tl.broadcast_to(wl[None, :, :], (BM, BN, BP)), tl.broadcast_to(xi[:, None, :], (BM, BN, BP)),
                       cx, ASM)
            sx = _dp4a(xi, ones, sx, ASM)
        if LATE_SUM:
            # each word with its own group's integers: Σ over the words waits until after the loop, so the loop
            # has no cross-lane reductions (one per chunk and group otherwise)
            pw = grow[:, None] + ((w0 + rp[None, :]) // GW) * stride_gg
            qa = tl.load(qa_ptr + pw).to(tl.int32)
            qm = tl.load(qm_ptr + pw).to(tl.int32)
            acc3 += qa[None, :, :] * (STEP * cx) + (qm - OFF * qa)[None, :, :] * sx[:, None, :]
        else:
            cx_g = tl.sum(tl.reshape(cx, (BM, BN, UPI, BP // UPI)), axis=3)  # Σ c·x per (token, row, group)
            sx_g = tl.sum(tl.reshape(sx, (BM, UPI, BP // UPI)), axis=2)  # Σ x per (token, group)
            g = w0 // GW + tl.arange(0, UPI)
            pq = grow[:, None] + g[None, :] * stride_gg
            qa = tl.load(qa_ptr + pq).to(tl.int32)
            qm = tl.load(qm_ptr + pq).to(tl.int32)
            # Σ_k (a*v + m)*x = a*(step*Σ c·x - offset*Σ x) + m*Σ x, exact in int32
            acc += tl.sum(qa[None, :, :] * (STEP * cx_g - OFF * sx_g[:, None, :]) + qm[None, :, :] * sx_g[:, None, :],
                          axis=2)
    if LATE_SUM:
        acc = tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _gemv_kernel(x_ptr, s_ptr, z_ptr, w_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr, la_ptr, lr_ptr, bias_ptr, y_ptr,
                 acc_ptr, M, N, K, stride_x, stride_wc, stride_wk, stride_gn, stride_gg, stride_y,
                 stride_lr, SB1, SB2, BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, RC: tl.constexpr,
                 VW: tl.constexpr, GW: tl.constexpr, KB: tl.constexpr, R: tl.constexpr, NSH: tl.constexpr,
                 RP: tl.constexpr, CP: tl.constexpr, CPC: tl.constexpr, LRKB: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr,
                 GDC: tl.constexpr, LATE_SUM: tl.constexpr, EVEN_N: tl.constexpr):
    # x_ptr: int8 activations (natural order) viewed as int32 words [M, K/4]; w_ptr: packed words [N, K/CPW],
    # row-major (any strides) or in RC x VW chunks (`layout.py`); qa/qm by their (row, group) strides.
    # Word p of a row holds codes CPW*p..; (word >> B*i) & mask = codes CPW*p+4i..+3, which meet activation
    # word LANES*p + i in one dp4a. GW = words per weight group. Program (n, s) covers K-split s; with several
    # activation K-blocks (KB > 1) the splits are the blocks, each promoted with its own step and zero point into
    # an fp32 partial (acc_ptr [KB, M, N]) that `_epilogue_kernel` sums in a fixed order; with one block, int32
    # partials [SPLIT, M, N].
    LANES: tl.constexpr = 8 // BITS
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rp = tl.arange(0, BP)
    # rows past N and tokens past M read row N-1 / token M-1 (never stored), chunks lie inside the split: the
    # loop's loads carry no masks (as in the GEMM, KERNEL_NOTES v15)
    rn_in = _rows_in(rn, N, EVEN_N)
    rm_in = tl.minimum(rm, M - 1)
    span = K // (4 * LANES) // SPLIT  # words per split
    w_lo = pid_s * span
    wrow = _row_offsets(rn_in, RC, VW, stride_wc)
    wt = tl.load(w_ptr + wrow[:, None] + _word_offsets(w_lo + rp, RC, VW, stride_wk)[None, :])
    if GDC:  # weights are constants: the first chunk streams in while act_quant may still run (pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = _gemv_sum(x_ptr + rm_in[:, None] * stride_x, w_ptr, wrow, rn_in * stride_gn, qa_ptr, qm_ptr, wt, w_lo,
                    w_lo + span, stride_wk, stride_gg, BITS, STEP, OFF, RC, VW, GW, BM, BN, BP, ASM, LATE_SUM)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if KB > 1:  # this split is activation block pid_s
        y = _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm < M, rn, rn < N, pid_s, KB)
        tl.store(acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], y, mask=mask)
    elif SPLIT > 1:  # int32 partial sums (exact); `_epilogue_kernel` adds them up and finishes
        tl.store(acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)
    else:
        y = _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm < M, rn, rn < N, 0, 1)
        y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH, RP, CP,
                    CPC, LRKB, HAS_BIAS, False, "ieee")
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
