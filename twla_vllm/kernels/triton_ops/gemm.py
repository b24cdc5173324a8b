"""Tensor-core GEMM (M > 8): int8 weight tile unpacked in registers (or read from the int8 scratch)."""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import _finish, _promote
from .unpack import _load_words, _row_offsets, _rows_in, _words_tile


@triton.jit
def _gemm_kernel(q_ptr, s_ptr, z_ptr, w_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr, la_ptr, lr_ptr, bias_ptr, y_ptr,
                 acc_ptr, M, N, K, stride_q, stride_wc, stride_wk, stride_gn, stride_gg, stride_y,
                 stride_lr, SB1, SB2, BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, RC: tl.constexpr,
                 VW: tl.constexpr, GS: tl.constexpr, KB: tl.constexpr, R: tl.constexpr, NSH: tl.constexpr,
                 RP: tl.constexpr, CP: tl.constexpr, LRKB: tl.constexpr, HAS_BIAS: tl.constexpr, SCRATCH: tl.constexpr,
                 SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr,
                 PRECISION: tl.constexpr, GDC: tl.constexpr, EVEN_N: tl.constexpr):
    # acc [BM tokens, BN rows] = x [BM, BK] . w_intᵀ, int8 x int8 -> int32 on tensor cores.
    # SCRATCH 0: w_ptr = the packed int32 words (row-major or in RC x VW chunks, `layout.py`), unpacked per tile
    # on whole words (`_load_words` + `_words_tile`: SWAR as the scratch unpack), q in natural order; the next
    # tile's loads are issued before this tile's dot so their latency overlaps it (KERNEL_NOTES v7, v24; loading
    # them inside the loop for Triton's cp.async pipeline measured slower at 26 of 27 shapes, v25; so did int32
    # scale pairs at int4/binary g128, v26). SCRATCH 1: w_ptr = the int8 scratch [N, K] (`unpack_weights`;
    # stride_wc = K).
    # SPLIT > 1: program (tile, s) covers K-range s and leaves a partial in acc_ptr [SPLIT, M, N] for
    # `_epilogue_kernel`: int32 sums (KB == 1) or, with several activation K-blocks (then one split per block),
    # fp32 values already promoted with the block's step and zero point.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_tiles_m = tl.cdiv(M, BM)
    n_tiles_n = tl.cdiv(N, BN)
    # grouped order: GROUP_N weight-row tiles share their activations' reads in L2
    per_group = GROUP_N * n_tiles_m
    first_n = (pid // per_group) * GROUP_N
    group = tl.minimum(n_tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group
    pid_m = (pid % per_group) // group
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    # rows past N or M read row N-1 / M-1 (their results are never stored), and every K tile lies inside the row,
    # so the K loop's loads carry no masks: fewer integer instructions per tile in an ALU-bound loop (v15)
    rn_in = _rows_in(rn, N, EVEN_N)
    rm_in = tl.minimum(rm, M - 1)
    BLK = K // KB
    k_lo = pid_s * (K // SPLIT)
    k_hi = k_lo + K // SPLIT
    wrow = _row_offsets(rn_in, RC, VW, stride_wc)
    grow = rn_in * stride_gn
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    y = tl.zeros([BM, BN], dtype=tl.float32)
    if not SCRATCH:
        ahead = _load_words(w_ptr, qa_ptr, qm_ptr, wrow, grow, k_lo, stride_wk, stride_gg, RC, VW, GS, BITS, STEP,
                            OFF, BK)
    if GDC:  # the scratch and the activations come from the kernels before this one (pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    for k0 in range(k_lo, k_hi, BK):
        if SCRATCH:
            w = tl.load(w_ptr + wrow[:, None] + k0 + rk[None, :])
        else:
            cur = ahead  # (words, mul, add) a tile ahead; the last tile re-reads itself: a cache hit, and no mask
            ahead = _load_words(w_ptr, qa_ptr, qm_ptr, wrow, grow, tl.minimum(k0 + BK, k_hi - BK), stride_wk,
                                stride_gg, RC, VW, GS, BITS, STEP, OFF, BK)
            w = _words_tile(cur[0], cur[1], cur[2], BITS)
        x = tl.load(q_ptr + rm_in[:, None] * stride_q + k0 + rk[None, :])
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        if KB > 1:
            if (k0 + BK) % BLK == 0:  # end of an activation K-block: promote once per block
                y += _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm < M, rn, rn < N, k0 // BLK, KB)
                acc = tl.zeros([BM, BN], dtype=tl.int32)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT > 1:  # partial for `_epilogue_kernel`
        part = acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :]
        if KB > 1:
            tl.store(part, y, mask=mask)
        else:
            tl.store(part, acc, mask=mask)
    else:
        if KB == 1:
            y = _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm < M, rn, rn < N, 0, 1)
        y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH,
                    RP, CP, CP, LRKB, HAS_BIAS, True, PRECISION)
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
