"""quant_matmul: the packed-code matmul with its epilogue, dispatched to the GEMV, the GEMM or the scratch GEMM."""

from __future__ import annotations

import torch
import triton

from .epilogue import _epilogue
from .gemm import _gemm_kernel
from .gemv import _gemv_kernel
from .layout import as_chunks, packed_rows, scale_strides, word_strides
from .pdl import gdc, launch_options
from .tiles import (GEMM_CONFIGS, GEMV_CONFIGS, GEMV_LOWRANK_SUM, GEMV_MAX_M, GEMV_SPLIT_CTAS, block_k, gemm_split,
                    gemv_late_sum, lowrank_chunk, lowrank_presum, packed_k_cap, use_pdl, uses_scratch)
from .unpack import unpack_weights


def quant_matmul(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, packed: torch.Tensor, row_scale: torch.Tensor,
                 qa: torch.Tensor, qm: torch.Tensor, rowsum: torch.Tensor, bits: int, step: int, offset: int,
                 group_size: int, out_dtype: torch.dtype, lowrank_a: torch.Tensor | None = None,
                 lr: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 shard_bounds: tuple[int, int] | None = None, scratch: bool | None = None,
                 tile: tuple[int, int, int, int, int] | None = None, out: torch.Tensor | None = None,
                 split: int | None = None, gemv_split: bool = True, pdl: bool | None = None,
                 late_sum: bool | None = None, presum: bool | None = None,
                 unpacked: torch.Tensor | None = None,
                 gemv_tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y [M, N] = s_n * Σ_b s_b (q·W_intᵀ - z_b rowsum_b) (+ lowrank_a @ lrᵀ per shard, + bias).

    q/s/z from `act_quant`; packed [N, W = K*bits/32] int32 words, any strides, or in chunks [N/RC, W/VW, RC, VW]
    (`layout.py`); row_scale [N] fp16/fp32; qa/qm [N, G] int8, any strides (the same for both); rowsum
    [N, KB] int32; lr fp32 = x @ lowrank_bᵀ of the S shards, [M, S*R] or as partial sums [P, M, S*R] (what
    `act_quant` returns), whose rows end at shard_bounds (two ascending row indices; (N, N) for one shard).
    `scratch`, `tile` (BM, BN, BK cap, warps, stages; a given cap may span several weight groups), `split`:
    override the tensor-core path's table and split rule (benchmarks, tests);
    gemv_split=False keeps the GEMV's K unsplit (tests); pdl, late_sum, presum: override the rules `tiles.use_pdl`
    (programmatic dependent launch), `tiles.gemv_late_sum` (the GEMV's sums over words after its K loop) and
    `tiles.lowrank_presum` (the branch's partials summed before the matmul); `unpacked`: these weights' int8
    scratch from `unpack_weights`, kept resident, for the scratch path to use instead of unpacking (benchmarks:
    what a resident int8 copy would buy); `gemv_tile` (BN rows, BP words, warps): the GEMV's tile instead of
    `tiles.GEMV_CONFIGS` (benchmarks: the --sweep at decode sizes)."""
    m, k = q.shape
    packed = as_chunks(packed)
    n = packed_rows(packed)
    strides = (*word_strides(packed), *scale_strides(qa, qm))  # (row or chunk, word), (row, group)
    kb = s.shape[1]
    gs = k if group_size == -1 else group_size
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return y
    r = 0 if lowrank_a is None else lowrank_a.shape[1]
    if r:
        lr = (lr if lr.dim() == 3 else lr.unsqueeze(0)).contiguous()
        if lr.shape[0] > 1 and (lowrank_presum(m, lr.shape[0]) if presum is None else presum):
            lr = lr.sum(0, keepdim=True)
    nsh = lr.shape[2] // r if r else 1
    rp = max(16, triton.next_power_of_2(r))
    sb1, sb2 = shard_bounds or (n, n)
    args = (row_scale, qa, qm, rowsum, lowrank_a if r else row_scale, lr if r else s,
            bias if bias is not None else row_scale, y)
    meta = dict(BITS=bits, STEP=step, OFF=offset, KB=kb, R=r, NSH=nsh, RP=rp,
                CP=triton.next_power_of_2(nsh * rp), LRKB=lr.shape[0] if r else 1, HAS_BIAS=bias is not None)
    stride_lr = lr.stride(1) if r else 0
    asm = q.device.type == "cuda"
    launch = dict(GDC=gdc(q.device), **launch_options(q.device, use_pdl(m, kb) if pdl is None else pdl))
    if m <= GEMV_MAX_M and tile is None:
        bn, bp, warps = gemv_tile or next(c for c in GEMV_CONFIGS if m <= c[0])[1:]
        lanes = 8 // bits
        words = k // (4 * lanes)
        gw = gs // (4 * lanes)
        while (words // kb) % bp or (bp % gw and gw % bp):  # a power of two that never straddles a group
            bp //= 2
        n_ctas = triton.cdiv(n, bn)
        split = kb  # several activation blocks: one split per block
        bm = triton.next_power_of_2(m)
        # the GEMV's own epilogue adds a low-rank branch by multiply-adds over [BM, BN, CPC] in chunks of branch
        # columns (`lowrank_chunk`); a branch wider than one GEMV_LOWRANK_SUM tile makes it split K and leave the
        # branch to `_epilogue` (finishing it in the GEMV in more chunks measured no faster: KERNEL_NOTES v18)
        big_branch = r and bm * bn * meta["CP"] > GEMV_LOWRANK_SUM
        while (gemv_split and kb == 1 and (n_ctas * split * 2 <= GEMV_SPLIT_CTAS or big_branch and split == 1)
               and words % (2 * split * bp) == 0):
            split *= 2
        acc = _partials(split, kb, y)
        _gemv_kernel[(n_ctas, split)](q.view(torch.int32), s, z, packed, *args, acc, m, n, k, q.stride(0) // 4,
                                      *strides, y.stride(0), stride_lr, sb1, sb2, RC=packed.shape[2],
                                      VW=packed.shape[3], GW=gw, BM=bm, BN=bn, BP=bp, EVEN_N=n % bn == 0,
                                      SPLIT=split, ASM=asm,
                                      CPC=lowrank_chunk(bm, bn, meta["CP"]),
                                      LATE_SUM=gemv_late_sum(m, gs) if late_sum is None else late_sum,
                                      num_warps=warps, **launch, **meta)
        if split > 1:
            _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split, launch)
        return y
    bm, bn, bkc, warps, stages = tile or next(c for c in GEMM_CONFIGS if m <= c[0])[1:]
    if tile is None and kb > 1 and not uses_scratch(m):
        bm = min(bm, 64)  # 128-token tiles with the per-block fp32 promotion: 439 vs 188 µs (14336->4096, M=128)
    use_scratch = uses_scratch(m) if scratch is None else scratch
    if use_scratch:
        w = unpacked if unpacked is not None else unpack_weights(packed, qa, qm, bits, step, offset, group_size)
        strides, rc, vw = (w.stride(0), 1, *strides[2:]), 1, 1  # rows of K int8 weights
    else:
        w, rc, vw = packed, packed.shape[2], packed.shape[3]
    # the packed path's K tile spans at most one weight group (tiles.GEMM_CONFIGS) unless a tile is given
    bk = block_k(k // kb, bkc if use_scratch or tile is not None else packed_k_cap(bkc, gs))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split is None:  # enough programs to hide the unpack loop's latency (benchmarks/KERNEL_NOTES.md v7)
        split = 1 if use_scratch else gemm_split(tiles, k, kb, bk)
    if split > 1 and ((k // split) % bk or kb > 1 and split != kb):
        raise ValueError(f"split {split}: K = {k} in {kb} block(s) needs whole {bk}-wide tiles per split and, with "
                         f"several blocks, one split per block")
    acc = _partials(split, kb, y)
    _gemm_kernel[(tiles, split)](q, s, z, w, *args, acc, m, n, k, q.stride(0), *strides, y.stride(0), stride_lr,
                                 sb1, sb2, RC=rc, VW=vw, GS=gs, SCRATCH=use_scratch, SPLIT=split, BM=bm, BN=bn, BK=bk,
                                 GROUP_N=8, EVEN_N=n % bn == 0,
                                 PRECISION="ieee" if q.device.type == "cpu" else "tf32x3",
                                 num_warps=warps, num_stages=stages, **launch, **meta)
    if split > 1:
        _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split, launch)
    return y


def _partials(split: int, kb: int, y: torch.Tensor) -> torch.Tensor:
    """Where a split kernel leaves its partials for `_epilogue`: [split, M, N] int32 sums (one K-block) or fp32
    values promoted per block; an unsplit kernel writes y directly."""
    if split == 1:
        return y
    return torch.empty(split, *y.shape, dtype=torch.int32 if kb == 1 else torch.float32, device=y.device)
