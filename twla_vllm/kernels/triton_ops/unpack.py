"""Packed B-bit codes -> int8 weights a*v(c) + m: per tile in registers (the GEMM) or once into an int8 scratch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import block_k


def _lane_asm_source(bits: int) -> tuple[str, str]:
    """PTX for `_lanes_asm`: per lane i, t = (w >> bits*i) & mask; t = t*mul + add; out_i = t ^ 0x80808080. Operands:
    outputs $0..$(L-1), then the packed bytes, four `mul` registers and four `add` registers (pack=4)."""
    lanes = 8 // bits
    mask = (2**bits - 1) * 0x01010101
    w, mul, add = f"${lanes}", f"${lanes + 1}", f"${lanes + 5}"
    lines = []
    for i in range(lanes):
        shift = f"shr.u32 t, {w}, {bits * i}; and.b32 t, t, 0x{mask:08X};" if i else f"and.b32 t, {w}, 0x{mask:08X};"
        lines.append(f"{shift} mad.lo.u32 t, t, {mul}, {add}; xor.b32 ${i}, t, 0x80808080;")
    asm = "{\n.reg .b32 t;\n" + "\n".join(lines) + "\n}"
    return asm, ",".join(["=r"] * lanes + ["r"] * 9)


_ASM1, _CON1 = (tl.constexpr(v) for v in _lane_asm_source(1))
_ASM2, _CON2 = (tl.constexpr(v) for v in _lane_asm_source(2))
_ASM4, _CON4 = (tl.constexpr(v) for v in _lane_asm_source(4))


@triton.jit
def _lanes_asm(byts, mul, add, BITS: tl.constexpr):
    """LANES int8 tensors from packed bytes: lane i = ((w >> B*i) & mask) * mul + add, XOR 0x80 per byte.
    Four bytes (one packed word, all in one weight group) share one register; `mul`/`add` are the group's
    a*step and (m - a*offset + 128) * 0x01010101, read from the register of the word's first byte."""
    if BITS == 2:
        return tl.inline_asm_elementwise(_ASM2, _CON2, [byts, mul, add], dtype=(tl.int8,) * 4, is_pure=True, pack=4)
    elif BITS == 4:
        return tl.inline_asm_elementwise(_ASM4, _CON4, [byts, mul, add], dtype=(tl.int8,) * 2, is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_ASM1, _CON1, [byts, mul, add], dtype=(tl.int8,) * 8, is_pure=True, pack=4)


@triton.jit
def _lane_tl(u, i: tl.constexpr, a, c, BITS: tl.constexpr):
    """Pure-`tl` twin of one lane of `_lanes_asm` (per element, for the interpreter)."""
    code = (u >> (BITS * i)) & (2**BITS - 1)
    return (code * a + c).to(tl.int8)


@triton.jit
def _load_words(w_ptr, qa_ptr, qm_ptr, rn, k0, stride_w, G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr,
                BK: tl.constexpr):
    """Raw loads for `_lanes_tile`: the packed words of codes k0..k0+BK-1 of rows rn as bytes [BN, words, 4] (the
    four bytes of a word in one register of the inline assembly) and their groups' a, m [BN, words]. Unmasked: the
    caller passes rows that exist (clamped) and a k0 inside the row, a multiple of BK."""
    LANES: tl.constexpr = 8 // BITS
    CPW: tl.constexpr = 4 * LANES
    NW: tl.constexpr = BK // CPW  # words of one row in this tile
    wi = tl.arange(0, NW)
    bi = tl.arange(0, 4)
    byts = tl.load(w_ptr + rn[:, None, None] * stride_w + k0 // LANES + 4 * wi[None, :, None] + bi[None, None, :])
    pq = rn[:, None] * G + (k0 + wi[None, :] * CPW) // GS
    return byts, tl.load(qa_ptr + pq), tl.load(qm_ptr + pq)


@triton.jit
def _lanes_tile(byts, qa, qm, BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, ASM: tl.constexpr):
    """int8 weights [BN, BK] from `_load_words`' tiles, in lane order: column j = CPW*p + LANES*b + i holds code
    CPW*p + 4*i + b of the tile (a SWAR multiply-add gives four codes of one word per instruction pair)."""
    LANES: tl.constexpr = 8 // BITS
    CPW: tl.constexpr = 4 * LANES
    NW: tl.constexpr = BK // CPW
    qa = qa.to(tl.int32)[:, :, None]
    qm = qm.to(tl.int32)[:, :, None]
    if ASM:
        mul = tl.broadcast_to(qa * STEP, (BN, NW, 4))
        add = tl.broadcast_to(((qm - qa * OFF + 128) & 255) * 0x01010101, (BN, NW, 4))
        lanes = _lanes_asm(byts, mul, add, BITS)
        if BITS == 4:
            w = tl.join(lanes[0], lanes[1])
        elif BITS == 2:
            w = tl.join(tl.join(lanes[0], lanes[2]), tl.join(lanes[1], lanes[3]))
        else:
            w = tl.join(tl.join(tl.join(lanes[0], lanes[4]), tl.join(lanes[2], lanes[6])),
                        tl.join(tl.join(lanes[1], lanes[5]), tl.join(lanes[3], lanes[7])))
    else:
        u = byts.to(tl.int32) & 255
        a = qa * STEP
        c = qm - qa * OFF
        if BITS == 4:
            w = tl.join(_lane_tl(u, 0, a, c, BITS), _lane_tl(u, 1, a, c, BITS))
        elif BITS == 2:
            w = tl.join(tl.join(_lane_tl(u, 0, a, c, BITS), _lane_tl(u, 2, a, c, BITS)),
                        tl.join(_lane_tl(u, 1, a, c, BITS), _lane_tl(u, 3, a, c, BITS)))
        else:
            w = tl.join(tl.join(tl.join(_lane_tl(u, 0, a, c, BITS), _lane_tl(u, 4, a, c, BITS)),
                                tl.join(_lane_tl(u, 2, a, c, BITS), _lane_tl(u, 6, a, c, BITS))),
                        tl.join(tl.join(_lane_tl(u, 1, a, c, BITS), _lane_tl(u, 5, a, c, BITS)),
                                tl.join(_lane_tl(u, 3, a, c, BITS), _lane_tl(u, 7, a, c, BITS))))
    return tl.reshape(w, (BN, BK))


@triton.jit
def _load_rep(w_ptr, qa_ptr, qm_ptr, rn, k0, stride_w, G: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr,
              BK: tl.constexpr):
    """Raw loads for `_int_tile` (codes k0..k0+BK-1 of rows rn) and their groups' a, m. Unmasked: the caller
    passes rows that exist (clamped) and a k0 inside the row, a multiple of BK. Every element loads the byte that
    holds its code (byte-lane layout: byte 4*(k // CPW) + k % 4 of the row), w_ptr = the packed words viewed as
    bytes, stride_w in bytes; a plain 2-D tile, so no reshape sits between the loads and the dot. Triton does not
    pipeline byte loads through shared memory, so the GEMM issues the next tile's loads by hand (KERNEL_NOTES v7:
    1.4-2.2x); int32 word loads, which it would pipeline, measured slower (v8: 4096->14336, M=64 on the H200:
    108-1726 vs 70.5 µs)."""
    CPW: tl.constexpr = 32 // BITS
    j = tl.arange(0, BK)
    # k0 is a multiple of BK and BK of CPW, so code k0 + j sits (k0 // CPW) * 4 bytes after where code j does: the
    # per-element part of the address is the same every tile (KERNEL_NOTES v15)
    byts = tl.load(w_ptr + rn[:, None] * stride_w + (k0 // CPW) * 4 + ((j // CPW) * 4 + j % 4)[None, :])
    if BK <= GS:  # one group per row of the tile: a and m are a column
        pq = rn * G + k0 // GS
    else:
        pq = rn[:, None] * G + ((k0 + j) // GS)[None, :]
    qa = tl.load(qa_ptr + pq)
    qm = tl.load(qm_ptr + pq)
    if BK <= GS:
        qa, qm = qa[:, None], qm[:, None]
    return byts, qa, qm


@triton.jit
def _int_tile(byts, qa, qm, BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, BK: tl.constexpr):
    """int8 weights a*v(c) + m [BN, BK] in natural order from `_load_rep`'s tiles (shift, mask, multiply-add)."""
    CPW: tl.constexpr = 32 // BITS
    j = tl.arange(0, BK)
    codes = (byts.to(tl.int32) >> (BITS * ((j % CPW) // 4))[None, :]) & (2**BITS - 1)
    qa = qa.to(tl.int32)
    return (codes * (qa * STEP) + (qm.to(tl.int32) - qa * OFF)).to(tl.int8)


@triton.jit
def _unpack_kernel(w_ptr, qa_ptr, qm_ptr, out_ptr, N, K, stride_w, G: tl.constexpr, GS: tl.constexpr,
                   BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   ASM: tl.constexpr):
    # writes lane order (`lane_perm`), contiguous: the activations of the scratch GEMM come in the same order
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK  # BK divides K: every tile lies inside the rows
    byts, qa, qm = _load_words(w_ptr, qa_ptr, qm_ptr, tl.minimum(rn, N - 1), k0, stride_w, G, GS, BITS, BK)
    w = _lanes_tile(byts, qa, qm, BITS, STEP, OFF, BN, BK, ASM)
    rk = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn[:, None] < N) & (rk[None, :] < K))


def unpack_weights(packed: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, bits: int, step: int, offset: int,
                   group_size: int) -> torch.Tensor:
    """Packed codes -> int8 weights [N, K] in lane order (`lane_perm`): the prefill scratch."""
    n = packed.shape[0]
    k = packed.shape[1] * 32 // bits
    out = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    bk = block_k(k, 256)
    # the packed-PTX unpack needs >= 4 words per row in a tile: with fewer (binary at K = 64, measured on the
    # H100) Triton does not keep a word's four bytes in one register and the result is wrong; plain `tl` then
    asm = packed.device.type == "cuda" and bk * bits // 32 >= 4
    _unpack_kernel[(triton.cdiv(n, 64), k // bk)](
        packed.view(torch.int8), qa, qm, out, n, k, packed.stride(0) * 4, G=qa.shape[1],
        GS=k if group_size == -1 else group_size, BITS=bits, STEP=step, OFF=offset, BN=64, BK=bk,
        ASM=asm, num_warps=4)
    return out
