"""Packed B-bit codes -> int8 weights a*v(c) + m on whole words (SWAR): per tile in registers (the GEMM) or once
into an int8 scratch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import as_chunks, packed_rows, packed_words, scale_strides, word_strides


@triton.jit
def _swar_lane(words, i: tl.constexpr, mul, add, BITS: tl.constexpr):
    """Lane i of uint32 packed words as int32: four int8 weights (codes 4i..4i+3 of each word): ((w >> B*i) & mask)
    * a*step + bias per byte, then XOR 0x80 per byte (see `_unpack_kernel`)."""
    t = ((words >> (BITS * i)) & ((2**BITS - 1) * 0x01010101)) * mul + add
    return (t ^ tl.full(t.shape, 0x80808080, tl.uint32)).to(tl.int32, bitcast=True)


@triton.jit
def _swar_words(words, mul, add, BITS: tl.constexpr):
    """uint32 packed words [BN, BW] -> int32 [BN, BW * 8/BITS], four int8 weights each, in natural order: lane i of
    word p holds codes CPW*p + 4i .. + 3. mul = a*step and add = (m - a*offset + 128) * 0x01010101 per word (or per
    row: [BN, 1]). The joins put lane 2k + j at [.., k, j] (and 4k' + 2k + j three deep), so the reshape lists
    lanes 0.. in order."""
    BN: tl.constexpr = words.shape[0]
    BW: tl.constexpr = words.shape[1]
    if BITS == 4:
        w = tl.join(_swar_lane(words, 0, mul, add, BITS), _swar_lane(words, 1, mul, add, BITS))
    elif BITS == 2:
        w = tl.join(tl.join(_swar_lane(words, 0, mul, add, BITS), _swar_lane(words, 2, mul, add, BITS)),
                    tl.join(_swar_lane(words, 1, mul, add, BITS), _swar_lane(words, 3, mul, add, BITS)))
    else:
        w = tl.join(tl.join(tl.join(_swar_lane(words, 0, mul, add, BITS), _swar_lane(words, 4, mul, add, BITS)),
                            tl.join(_swar_lane(words, 2, mul, add, BITS), _swar_lane(words, 6, mul, add, BITS))),
                    tl.join(tl.join(_swar_lane(words, 1, mul, add, BITS), _swar_lane(words, 5, mul, add, BITS)),
                            tl.join(_swar_lane(words, 3, mul, add, BITS), _swar_lane(words, 7, mul, add, BITS))))
    return tl.reshape(w, (BN, BW * (8 // BITS)))


@triton.jit
def _rows_in(rn, N, EVEN_N: tl.constexpr):
    """Rows rn clamped to N - 1 (rows past N read the last row and are never stored, so loads carry no masks).
    EVEN_N (the tile width divides N): no clamp, so the compiler still sees runs of consecutive rows and can
    coalesce loads across a row chunk (`layout.py`)."""
    if EVEN_N:
        return rn
    return tl.minimum(rn, N - 1)


@triton.jit
def _row_offsets(rn, RC: tl.constexpr, VW: tl.constexpr, stride_wc):
    """Where rows rn's packed words start (in words): RC > 1, row n is row n % RC of contiguous chunk n // RC of
    RC x VW words (`layout.py`; in-chunk strides are constants, so the compiler can vectorize); else stride_wc a
    row."""
    if RC > 1:
        return (rn // RC) * stride_wc + (rn % RC) * VW
    return rn * stride_wc


@triton.jit
def _word_offsets(pw, RC: tl.constexpr, VW: tl.constexpr, stride_wk):
    """Offsets of word indices pw within a row: in contiguous RC x VW chunks word pw is element pw % VW of vector
    pw // VW (RC*VW words apart); row-major: stride_wk apart."""
    if RC > 1:
        if VW == 1:
            return pw * RC
        return (pw // VW) * (RC * VW) + pw % VW
    return pw * stride_wk


@triton.jit
def _load_packed(w_ptr, wrow, k0, stride_wk, RC: tl.constexpr, VW: tl.constexpr, BITS: tl.constexpr,
                 BK: tl.constexpr):
    """The packed words of codes k0..k0+BK-1 of the rows starting at wrow (`_row_offsets`) as uint32 [BN, BK/CPW]
    (unmasked: see `_load_words`)."""
    CPW: tl.constexpr = 32 // BITS
    pw = k0 // CPW + tl.arange(0, BK // CPW)
    return tl.load(w_ptr + wrow[:, None] + _word_offsets(pw, RC, VW, stride_wk)[None, :]).to(tl.uint32,
                                                                                          bitcast=True)


@triton.jit
def _load_words(w_ptr, qa_ptr, qm_ptr, wrow, grow, k0, stride_wk, stride_gg, RC: tl.constexpr, VW: tl.constexpr,
                GS: tl.constexpr, BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, BK: tl.constexpr):
    """The packed words of codes k0..k0+BK-1 of the rows starting at wrow (w_ptr int32, `_row_offsets`) and their
    groups' SWAR multiplier and bias (`_swar_words`); grow = the rows' offsets into qa/qm (stride_gn * row).
    Unmasked: the caller passes rows that exist (clamped) and a k0 inside the row, a multiple of BK. Groups hold
    whole words (format: GS % CPW == 0). The multiplier is a*step, the bias (m - a*offset + 128) * 0x01010101:
    [BN, 1] when the tile lies in one group, else one per word [BN, BK/CPW]."""
    CPW: tl.constexpr = 32 // BITS
    words = _load_packed(w_ptr, wrow, k0, stride_wk, RC, VW, BITS, BK)
    if BK <= GS:  # one group per row of the tile
        pq = (grow + (k0 // GS) * stride_gg)[:, None]
    else:
        pq = grow[:, None] + ((k0 + CPW * tl.arange(0, BK // CPW)) // GS)[None, :] * stride_gg
    qa = tl.load(qa_ptr + pq).to(tl.int32)
    mul = (qa * STEP).to(tl.uint32, bitcast=True)
    add = ((tl.load(qm_ptr + pq).to(tl.int32) - qa * OFF + 128) & 255).to(tl.uint32, bitcast=True) * 0x01010101
    return words, mul, add


@triton.jit
def _words_tile(words, mul, add, BITS: tl.constexpr):
    """int8 weights [BN, BK] in natural order from packed words and their scales (`_load_words`): SWAR on whole
    words (`_swar_words`), then each int32 split into its four bytes. The truncations re-pack into the same
    registers, so the split costs no instructions (sm_90a SASS of the 64x64x32 ternary tile: 80 K-loop
    instructions vs 145 for the per-element unpack from byte loads it replaced, KERNEL_NOTES v24)."""
    t = _swar_words(words, mul, add, BITS)
    b = tl.join(tl.join(t.to(tl.int8), (t >> 16).to(tl.int8)), tl.join((t >> 8).to(tl.int8), (t >> 24).to(tl.int8)))
    return tl.reshape(b, (t.shape[0], t.shape[1] * 4))


@triton.jit
def _unpack_kernel(w_ptr, qa_ptr, qm_ptr, out_ptr, N, stride_wc, stride_wk, stride_gn, stride_gg,
                   stride_out, RC: tl.constexpr, VW: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr,
                   STEP: tl.constexpr, OFF: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, EVEN_N: tl.constexpr):
    # SWAR on whole words: lane i of a packed word, (w >> B*i) & mask, holds codes CPW*p + 4*i .. + 3 in its four
    # bytes, i.e. in natural order, so one multiply-add by a*step with the bias (m - a*offset + 128) per byte gives
    # four int8 weights + 128 (each byte's value is w + 128 in [1, 255]: no carries) and an XOR unbiases them; the
    # LANES results of a word are stored as LANES consecutive int32. Word loads and vector stores are coalesced (the
    # byte-wise form this replaced used 2 of every 32 bytes it fetched: Nsight Compute, session 26). uint32: the
    # multiply wraps mod 2^32 by definition, per byte it never does.
    LANES: tl.constexpr = 8 // BITS
    CPW: tl.constexpr = 4 * LANES
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rn_in = _rows_in(rn, N, EVEN_N)
    # BW divides the words of a row: every tile lies inside it
    words, mul, add = _load_words(w_ptr, qa_ptr, qm_ptr, _row_offsets(rn_in, RC, VW, stride_wc),
                                  rn_in * stride_gn, tl.program_id(1) * BW * CPW, stride_wk, stride_gg, RC, VW, GS,
                                  BITS, STEP, OFF, BW * CPW)
    w = _swar_words(words, mul, add, BITS)
    # (the store's layout differs from the joins': Triton converts through shared memory, 32 KB a program, small
    # beside the 40 KB it moves to and from global memory)
    cols = tl.program_id(1) * BW * LANES + tl.arange(0, BW * LANES)
    tl.store(out_ptr + rn[:, None] * stride_out + cols[None, :], w, mask=rn[:, None] < N)


def unpack_weights(packed: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, bits: int, step: int, offset: int,
                   group_size: int) -> torch.Tensor:
    """Packed codes ([N, W] or a `layout.py` layout) -> int8 weights [N, K] in natural order: the prefill scratch."""
    packed = as_chunks(packed)
    n, words = packed_rows(packed), packed_words(packed)
    k = words * 32 // bits
    out = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    bw = min(words & -words, 256 // (8 // bits))  # words per tile: a power of two dividing the row, <= 256 outputs
    _unpack_kernel[(triton.cdiv(n, 32), words // bw)](
        packed, qa, qm, out.view(torch.int32), n, *word_strides(packed), *scale_strides(qa, qm), k // 4,
        RC=packed.shape[2], VW=packed.shape[3], GS=k if group_size == -1 else group_size, BITS=bits, STEP=step,
        OFF=offset, BN=32, BW=bw, EVEN_N=n % 32 == 0, num_warps=4)
    return out
