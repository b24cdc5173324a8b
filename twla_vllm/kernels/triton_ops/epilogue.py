"""Epilogue: row scale, low-rank branch and bias; and the kernel that finishes split-K partials."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import GEMV_LOWRANK_SUM, GEMV_MAX_M, lowrank_chunk


@triton.jit
def _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm_ok, rn, rn_ok, b, KB: tl.constexpr):
    """Activation K-block b of int32 acc [BM, BN] in float32: s_b * (acc - z_b * rowsum_b), exact up to that one
    conversion (s, z [M, KB] per token; rowsum [N, KB] per row)."""
    sb = tl.load(s_ptr + rm * KB + b, mask=rm_ok, other=0.0)
    zb = tl.load(z_ptr + rm * KB + b, mask=rm_ok, other=0.0).to(tl.int32)
    rs = tl.load(rs_ptr + rn * KB + b, mask=rn_ok, other=0)
    return sb[:, None] * (acc - zb[:, None] * rs[None, :]).to(tl.float32)


@triton.jit
def _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R: tl.constexpr,
            NSH: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr, CPC: tl.constexpr, LRKB: tl.constexpr,
            HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """y [BM, BN] (tokens x rows): * row scale, + low-rank branch, + bias. The rows of a fused module belong
    to NSH shards (row bounds SB1 <= SB2), each with its own R columns of lr = x @ lowrank_bᵀ, given as LRKB
    partial sums [LRKB, M, NSH*R] (act_quant's per-K-block partials; summed here in order). DOT: one tensor-core
    dot over the CP branch columns; else fp32 multiply-adds over [BM, BN, CPC] in CP / CPC chunks (bounded
    registers at any rank)."""
    y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if R > 0:
        shard = (rn >= SB1).to(tl.int32) + (rn >= SB2).to(tl.int32)
        W: tl.constexpr = CP if DOT else CPC
        for ch in tl.static_range(CP // W):
            c = ch * W + tl.arange(0, W)
            sh, j = c // RP, c % RP
            ok_c = (j < R) & (sh < NSH)
            a = tl.load(la_ptr + rn[:, None] * R + j[None, :],
                        mask=(rn[:, None] < N) & ok_c[None, :] & (shard[:, None] == sh[None, :]), other=0.0)
            lr_offs = rm[:, None] * stride_lr + (sh * R + j)[None, :]
            lr_ok = (rm[:, None] < M) & ok_c[None, :]
            lr = tl.load(lr_ptr + lr_offs, mask=lr_ok, other=0.0)
            for p in tl.static_range(1, LRKB):
                lr += tl.load(lr_ptr + p * M * stride_lr + lr_offs, mask=lr_ok, other=0.0)
            if DOT:
                y += tl.dot(lr, tl.trans(a.to(tl.float32)), input_precision=PRECISION)
            else:
                y += tl.sum(lr[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _epilogue_kernel(acc_ptr, s_ptr, z_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr, la_ptr, lr_ptr, bias_ptr, y_ptr,
                     M, N, stride_y, stride_lr, SB1, SB2, KB: tl.constexpr, SPLIT: tl.constexpr, R: tl.constexpr,
                     NSH: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr, CPC: tl.constexpr, LRKB: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
                     PRECISION: tl.constexpr, GDC: tl.constexpr):
    # after a split GEMV/GEMM: acc_ptr [SPLIT, M, N] holds int32 partial sums (KB == 1; summed exactly) or fp32
    # partials already promoted per activation block (KB > 1; summed in a fixed order)
    if GDC:  # the partials come from the matmul launched just before (pdl.py)
        tl.extra.cuda.gdc_wait()
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    part = acc_ptr + rm[:, None] * N + rn[None, :]
    if KB == 1:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for b in tl.static_range(SPLIT):
            acc += tl.load(part + b * M * N, mask=mask, other=0)
        y = _promote(acc, s_ptr, z_ptr, rs_ptr, rm, rm < M, rn, rn < N, 0, 1)
    else:
        y = tl.zeros([BM, BN], dtype=tl.float32)
        for b in tl.static_range(SPLIT):
            y += tl.load(part + b * M * N, mask=mask, other=0.0)
    y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH, RP, CP, CPC, LRKB,
                HAS_BIAS, DOT, PRECISION)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split, launch: dict) -> None:
    meta = {key: v for key, v in meta.items() if key not in ("BITS", "STEP", "OFF")}
    # the low-rank branch: at decode sizes (M <= GEMV_MAX_M) fp32 multiply-adds over [BM, BN, CP] with BM = M
    # rounded up and BN narrowed to keep GEMV_LOWRANK_SUM products (a dot pads M to 16 rows); past that one
    # tensor-core dot per tile (padding rows masked): the broadcast-and-sum form on large tiles spilled registers,
    # 300-700 µs at M=64 on the H200 (KERNEL_NOTES.md v9); the dot at decode sizes was 1.2-1.9x slower (v13).
    dot = m > GEMV_MAX_M
    bm = triton.next_power_of_2(m)
    if dot:
        bm, bn = max(16, min(32, bm)), 64
    else:
        bm = min(bm, 32)
        bn = max(16, min(64, GEMV_LOWRANK_SUM // (bm * meta["CP"])))
    cpc = lowrank_chunk(bm, bn, meta["CP"])
    _epilogue_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        acc, s, z, *args, m, n, y.stride(0), stride_lr, sb1, sb2, SPLIT=split, BM=bm, BN=bn, CPC=cpc, DOT=dot,
        PRECISION="tf32x3" if acc.is_cuda else "ieee", num_warps=4, **launch, **meta)
