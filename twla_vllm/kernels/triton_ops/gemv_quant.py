"""One token (M = 1) in one launch: act_quant's transform + quantizer in the GEMV's prologue, on a persistent grid.

At batch 1 a linear was two dependent latency chains, act_quant then the GEMV (plus the split epilogue with
several K-blocks): the bs=1 decode profile spent ~1.1 ms of a ~3.9 ms step in 128 act_quant launches (RESULTS.md
session 21). Here every program transforms and quantizes its K-block of the token itself (the same
`_quantize_tokens` code, so the same q, s, z) into its own slot of a small scratch, then runs the GEMV over its
share of the row tiles. The work is repeated once per program, so the grid is persistent (a few programs per SM,
`tiles.fused_programs_per_sm`), not one per row tile. KERNEL_NOTES v31."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .act_quant import _quantize_tokens, token_view
from .epilogue import _epilogue, _finish, _promote
from .gemv import _gemv_sum
from .layout import as_chunks, packed_rows, scale_strides, word_strides
from .pdl import gdc, launch_options
from .tiles import ACT_LEFT_FIRST, FUSED_GEMV, fused_programs_per_sm, use_pdl
from .unpack import _row_offsets, _rows_in, _word_offsets


@triton.jit
def _tile_chunk(w_ptr, t, w0, N, stride_wc, stride_wk, RC: tl.constexpr, VW: tl.constexpr, BN: tl.constexpr,
                BP: tl.constexpr, EVEN_N: tl.constexpr):
    """Packed words [BN, BP] of row tile t from word w0 on (rows past N read the last row, as in the GEMV)."""
    rows = _rows_in(t * BN + tl.arange(0, BN), N, EVEN_N)
    return tl.load(w_ptr + _row_offsets(rows, RC, VW, stride_wc)[:, None]
                   + _word_offsets(w0 + tl.arange(0, BP), RC, VW, stride_wk)[None, :])


@triton.jit
def _gemv_quant_kernel(x_ptr, l_ptr, r_ptr, qs_ptr, qw_ptr, ss_ptr, zs_ptr, w_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr,
                       bias_ptr, y_ptr, acc_ptr, N, TILES, stride_x, stride_wc, stride_wk, stride_gn, stride_gg,
                       K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, RBP: tl.constexpr,
                       XCP: tl.constexpr, HAS_ROT: tl.constexpr, KB: tl.constexpr, AB: tl.constexpr,
                       QR: tl.constexpr, ABITS: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
                       BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, RC: tl.constexpr,
                       VW: tl.constexpr, GW: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                       BP: tl.constexpr, ASM: tl.constexpr, GDC: tl.constexpr, EVEN_N: tl.constexpr,
                       LEFT_FIRST: tl.constexpr):
    # Program p quantizes K-block b = p % KB of the token into scratch row p (qs_ptr int8 [P, K], the same bytes as
    # int32 words at qw_ptr; its QB = AB/KB steps and zero points at ss/zs [P, AB]), then takes row tiles
    # p // KB, + P/KB, ... over that block's activation ranges. With one K-block it finishes the outputs itself;
    # with several it writes each range's promoted fp32 partial (acc_ptr [AB, 1, N]) for `_epilogue_kernel`,
    # as the split GEMV does, so both paths sum in the same order and agree bit for bit.
    pid = tl.program_id(0)
    b = pid % KB
    QB: tl.constexpr = AB // KB
    RW: tl.constexpr = K // (32 // BITS) // AB  # packed words per activation range
    rm = tl.arange(0, 1)
    t0 = pid // KB
    step = tl.num_programs(0) // KB
    s_row = ss_ptr + pid * AB  # this program's steps and zero points
    z_row = zs_ptr + pid * AB
    # the first tile's first chunk of weights streams in before the wait (weights are constants; pdl.py)
    wt = _tile_chunk(w_ptr, t0, b * QB * RW, N, stride_wc, stride_wk, RC, VW, BN, BP, EVEN_N)
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    _quantize_tokens(x_ptr, l_ptr, r_ptr, qs_ptr + pid * K, s_row, z_row, 1, stride_x, K, 0, b, ROWS, COLS, RBP,
                     XCP, 1, HAS_ROT, KB, AB, QR, ABITS, CLIP, PRECISION, ASM, LEFT_FIRST)
    tl.debug_barrier()  # the program's own stores of q, s, z are visible to all of its threads
    xrow = qw_ptr + pid * (K // 4) + rm[:, None] * 0
    for t in range(t0, TILES, step):
        rn = t * BN + tl.arange(0, BN)
        rn_in = _rows_in(rn, N, EVEN_N)
        wrow = _row_offsets(rn_in, RC, VW, stride_wc)
        y = tl.zeros([1, BN], dtype=tl.float32)
        for j in tl.static_range(QB):
            a = b * QB + j
            if j > 0:
                wt = _tile_chunk(w_ptr, t, a * RW, N, stride_wc, stride_wk, RC, VW, BN, BP, EVEN_N)
            acc = _gemv_sum(xrow, w_ptr, wrow, rn_in * stride_gn, qa_ptr, qm_ptr, wt, a * RW, (a + 1) * RW,
                            stride_wk, stride_gg, BITS, STEP, OFF, RC, VW, GW, 1, BN, BP, ASM, False)
            part = _promote(acc, s_row, z_row, rs_ptr, rm, rm < 1, rn, rn < N, a, AB)
            if KB == 1:
                y += part
            else:
                tl.store(acc_ptr + a * N + rn[None, :], part, mask=rn[None, :] < N)
        # the next tile's first chunk goes out before this tile's epilogue (the last tile re-reads its own rows)
        wt = _tile_chunk(w_ptr, tl.minimum(t + step, TILES - 1), b * QB * RW, N, stride_wc, stride_wk, RC, VW, BN,
                         BP, EVEN_N)
        if KB == 1:
            y = _finish(y, rm, rn, 1, N, ws_ptr, ws_ptr, ws_ptr, bias_ptr, 0, N, N, 0, 1, 16, 16, 16, 1, HAS_BIAS,
                        False, "ieee")
            tl.store(y_ptr + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=rn[None, :] < N)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_quant(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, act_bits: int, clip: float,
               k_blocks: int, act_blocks: int, packed: torch.Tensor, row_scale: torch.Tensor, qa: torch.Tensor,
               qm: torch.Tensor, rowsum: torch.Tensor, bits: int, step: int, offset: int, group_size: int,
               bias: torch.Tensor | None = None, precision: str | None = None, programs: int | None = None,
               tile: tuple[int, int, int] | None = None, pdl: bool | None = None) -> torch.Tensor:
    """y [1, N] = quant_matmul(*act_quant(x, ...)) for one token, without a low-rank branch, in one launch (two
    with several K-blocks: the split epilogue). Arguments as `act_quant` and `quant_matmul`; `programs` (per
    K-block; default `tiles.fused_programs_per_sm` x the SMs / K-blocks) and `tile` (BN rows, BP words, warps;
    default `tiles.FUSED_GEMV`) override the launch (benchmarks, tests)."""
    m, k = x.shape
    if m != 1:
        raise ValueError(f"gemv_quant takes one token, got x of shape {tuple(x.shape)}")
    x = x.contiguous()
    packed = as_chunks(packed)
    n = packed_rows(packed)
    ab = act_blocks or k_blocks
    cuda = x.device.type == "cuda"
    rows, cols = token_view(k, k_blocks, ab, None if left is None else (left.shape[0], right.shape[0]))
    rbp = triton.next_power_of_2(rows // k_blocks)
    if left is not None:
        rbp = max(16, rbp)  # tl.dot needs >= 16
    cp = max(16, triton.next_power_of_2(cols))
    bn, bp, warps = tile or FUSED_GEMV
    words = k // (32 // bits) // ab  # per activation range
    gw = (k if group_size == -1 else group_size) // (32 // bits)
    while words % bp or (bp % gw and gw % bp):  # a power of two that never straddles a group
        bp //= 2
    tiles = triton.cdiv(n, bn)
    per_sm = fused_programs_per_sm(rbp, cp, left is not None)
    per_block = programs or max(1, -(-per_sm * (_sm_count(x.device.index or 0) if cuda else 1) // k_blocks))
    grid = k_blocks * min(tiles, per_block)
    qs = torch.empty(grid, k, dtype=torch.int8, device=x.device)
    ss = torch.empty(grid, ab, dtype=torch.float32, device=x.device)
    zs = torch.empty(grid, ab, dtype=torch.float32, device=x.device)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    acc = y if k_blocks == 1 else torch.empty(ab, 1, n, dtype=torch.float32, device=x.device)
    bias_t = bias if bias is not None else row_scale
    launch = dict(GDC=gdc(x.device), **launch_options(x.device, use_pdl(1, ab) if pdl is None else pdl))
    _gemv_quant_kernel[(grid,)](
        x, left if left is not None else x, right if right is not None else x, qs, qs.view(torch.int32),
        ss, zs, packed, row_scale, qa, qm, rowsum, bias_t, y, acc, n, tiles, x.stride(0), *word_strides(packed),
        *scale_strides(qa, qm), K=k, ROWS=rows, COLS=cols, RBP=rbp, XCP=cp,
        HAS_ROT=left is not None, KB=k_blocks, AB=ab, QR=rbp if ab == k_blocks else rows // ab, ABITS=act_bits,
        CLIP=float(clip), PRECISION=precision or ("tf32" if cuda else "ieee"), BITS=bits, STEP=step, OFF=offset,
        RC=packed.shape[2], VW=packed.shape[3], GW=gw, HAS_BIAS=bias is not None, BN=bn, BP=bp, ASM=cuda,
        EVEN_N=n % bn == 0, LEFT_FIRST=ACT_LEFT_FIRST and left is not None, num_warps=warps, **launch)
    if k_blocks > 1:
        meta = dict(KB=ab, R=0, NSH=1, RP=16, CP=16, LRKB=1, HAS_BIAS=bias is not None)
        _epilogue(acc, ss, zs, (row_scale, qa, qm, rowsum, row_scale, ss, bias_t, y), 1, n, y, 0, n, n, meta, ab,
                  launch)
    return y
