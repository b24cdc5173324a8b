"""Triton kernels for TWLA linears, format v2 (CUDA; also run under TRITON_INTERPRET=1 for CPU tests).

act_quant:  per token and K-block: Kronecker transform L·X·R, asymmetric quantization to `bits` into int8
            containers, step s and zero point z per block; several tokens per program for large M.
gemv:       M <= 8 on CUDA cores. Byte-lane SWAR: (w >> B*i) & mask gives four codes per op, `dp4a` multiplies
            them by four int8 activations; per weight group the integer sums are promoted with the group's
            integers: acc += a*(step*Σc·x - offset*Σx) + m*Σx. Everything stays int32 and exact.
gemm:       M > 8 on int8 tensor cores, tokens as the MMA's M. The weight tile is unpacked in registers to
            w_int = a*v(c) + m (int8) from 2-D byte loads issued one tile ahead; the K loop is a plain int8 dot into int32, split over K
            into int32 partials when the tile grid is small; s_n, the activation step and the zero-point term
            z*rowsum go to the epilogue, together with the low-rank branch lowrank_a @ (x @ lowrank_bᵀ) and the bias.
unpack:     large M unpacks the weights once into an int8 scratch and runs the same GEMM on it (SCRATCH). The
            unpack builds four int8 weights per instruction pair from one packed word: ((w >> B*i) & mask) *
            (a*step) + (m - a*offset + 128), then XOR 0x80 per byte (inline PTX; a pure-`tl` twin for the
            interpreter gives the same bytes), in "lane order" (`lane_perm`); act_quant then writes the activations
            in the same order.

Every kernel evaluates `twla_vllm.reference.quant_linear`: exact integer dots, then
y = s_n * Σ_b s_b * float32(acc_b - z_b * rowsum_b) (+ low-rank, bias). Rounding is half-to-even everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _mul_rn(a, b, ASM: tl.constexpr):
    """a * b rounded on its own: the compiler may not contract it into an FMA with a following add (the
    reference rounds clip*max and clip*min separately; a fused subtract moves the step by an ulp and flips
    codes)."""
    if ASM:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


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


# ------------------------------------------------------------------------------------------------------
# Activations: transform + per-token quantization
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _act_quant_kernel(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, M, stride_x, stride_q,
                      ROWS: tl.constexpr, COLS: tl.constexpr, RBP: tl.constexpr, CP: tl.constexpr,
                      BT: tl.constexpr, HAS_ROT: tl.constexpr, KB: tl.constexpr, BITS: tl.constexpr,
                      CLIP: tl.constexpr, LANES: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    # One program per (BT tokens, K-block). A token row is viewed as [ROWS, COLS] (= [n1, n2] when transformed);
    # K-block b owns rows [b*RB, (b+1)*RB), and the left factor is block-diagonal along those blocks (checked at
    # load), so blocks transform and quantize independently. The BT tokens are stacked as [BT*RBP, CP]: one dot
    # with the right factor for all of them, and one with the left factor after moving the token index next to
    # the columns ([RBP, BT*CP]), so both are plain 2-D tensor-core dots and the factors are loaded once.
    pid = tl.program_id(0)
    b = tl.program_id(1)
    RB: tl.constexpr = ROWS // KB
    ti = pid * BT + tl.arange(0, BT * RBP) // RBP  # token of each stacked row
    ri = tl.arange(0, BT * RBP) % RBP
    ci = tl.arange(0, CP)
    valid = (ti[:, None] < M) & (ri[:, None] < RB) & (ci[None, :] < COLS)
    offs = (b * RB + ri[:, None]) * COLS + ci[None, :]  # position within a token
    x = tl.load(x_ptr + ti[:, None] * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_ROT:
        rr = tl.arange(0, RBP)
        lm = tl.load(l_ptr + (b * RB + rr[:, None]) * ROWS + b * RB + rr[None, :],
                     mask=(rr[:, None] < RB) & (rr[None, :] < RB), other=0.0)
        rm = tl.load(r_ptr + ci[:, None] * COLS + ci[None, :],
                     mask=(ci[:, None] < COLS) & (ci[None, :] < COLS), other=0.0)
        if PRECISION == "bf16":  # single-pass bf16 operands, fp32 accumulation
            x = tl.dot(x.to(tl.bfloat16), rm.to(tl.bfloat16))
        else:
            x = tl.dot(x, rm, input_precision=PRECISION)
        if BT > 1:
            x = tl.reshape(tl.permute(tl.reshape(x, (BT, RBP, CP)), (1, 0, 2)), (RBP, BT * CP))
        if PRECISION == "bf16":
            x = tl.dot(lm.to(tl.bfloat16), x.to(tl.bfloat16))
        else:
            x = tl.dot(lm, x, input_precision=PRECISION)
        if BT > 1:
            x = tl.reshape(tl.permute(tl.reshape(x, (RBP, BT, CP)), (1, 0, 2)), (BT * RBP, CP))
    qmax = 2.0 ** BITS - 1.0
    half = 2.0 ** (BITS - 1)
    xt = tl.reshape(x, (BT, RBP * CP))
    vt = tl.reshape(valid, (BT, RBP * CP))
    hi = _mul_rn(tl.max(tl.where(vt, xt, float("-inf")), axis=1), CLIP, ASM)
    lo = _mul_rn(tl.min(tl.where(vt, xt, float("inf")), axis=1), CLIP, ASM)
    # IEEE-rounded divisions (div_rn): the default fast fp32 division differs from torch's in the last bit,
    # which flips a rounding decision now and then
    s = tl.maximum(tl.math.div_rn(hi - lo, qmax), 1e-8)  # [BT]
    z = _round_half_even(tl.math.div_rn(-lo, s))
    tok = pid * BT + tl.arange(0, BT)
    tl.store(s_ptr + tok * KB + b, s, mask=tok < M)
    tl.store(z_ptr + tok * KB + b, z - half, mask=tok < M)
    q = _round_half_even(tl.math.div_rn(xt, s[:, None])) + z[:, None]
    q = tl.reshape(tl.minimum(tl.maximum(q, 0.0), qmax) - half, (BT * RBP, CP))
    if LANES > 0:  # lane order (the int8 scratch's order): k = CPW*p + 4*i + b is stored at CPW*p + LANES*b + i
        CPW: tl.constexpr = 4 * LANES
        if COLS % CPW == 0:  # words never cross a row of the view: permute in registers, store contiguously
            q = tl.reshape(tl.permute(tl.reshape(q, (BT * RBP, CP // CPW, LANES, 4)), (0, 1, 3, 2)), (BT * RBP, CP))
        else:
            r = offs % CPW
            offs = offs - r + LANES * (r % 4) + r // 4
    tl.store(q_ptr + ti[:, None] * stride_q + offs, q.to(tl.int8), mask=valid)


def act_quant(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, bits: int, clip: float,
              k_blocks: int, precision: str | None = None, lanes: int = 0,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, bt: int | None = None,
              warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], s fp32 [M, KB], z fp32 [M, KB]) as `reference.quantize_per_token` of
    `reference.kron_rotate(x, left, right)`. A left factor must be block-diagonal over the k_blocks
    (TwlaLinearMethod checks it at load). `precision` of the transform dots: "tf32x3" (fp32-accurate), "tf32"
    (the CUDA default: single pass, ~0.1% of 4-bit codes one step off, see benchmarks/RESULTS.md) or "bf16".
    lanes > 0 stores q in the lane order of a code with that many lanes (what `unpack_weights` writes).
    `out`: preallocated outputs (tests poison them). `bt` (tokens per program), `warps`: override the launch
    heuristic (benchmarks)."""
    m, k = x.shape
    x = x.contiguous()
    q, s, z = out or (torch.empty(m, k, dtype=torch.int8, device=x.device),
                      torch.empty(m, k_blocks, dtype=torch.float32, device=x.device),
                      torch.empty(m, k_blocks, dtype=torch.float32, device=x.device))
    cuda = x.device.type == "cuda"
    precision = precision or ("tf32" if cuda else "ieee")
    if left is not None:
        rows, cols = left.shape[0], right.shape[0]
        rbp = max(16, triton.next_power_of_2(rows // k_blocks))  # tl.dot needs >= 16
    else:  # no transform: any [rows, cols] view whose rows split into the k_blocks
        cols = block_k(k // k_blocks, 256, 16)
        rows = k // cols
        rbp = triton.next_power_of_2(rows // k_blocks)
    cp = max(16, triton.next_power_of_2(cols))
    # tokens per program: one at decode sizes (latency); for many tokens, with a transform, stack tokens until
    # the right-factor dot has 128 rows (2 tokens of 64x64, 8 of the 16x128 blocks of down_proj's 112x128:
    # 1.7x faster there than 4 tokens, `benchmarks/kernels.py --act-quant-sweep`); without one, 8K elements
    if m <= 16:
        bt = bt or 1
    elif left is not None:
        bt = bt or max(1, min(8, 128 // rbp, 16384 // (rbp * cp)))
    else:
        bt = bt or max(1, min(8, 8192 // (rbp * cp)))
    warps = warps or (4 if bt * rbp * cp <= (16384 if left is not None else 4096) else 8)
    if m:
        _act_quant_kernel[(triton.cdiv(m, bt), k_blocks)](
            x, left if left is not None else x, right if right is not None else x, q, s, z, m, x.stride(0),
            q.stride(0), ROWS=rows, COLS=cols, RBP=rbp, CP=cp, BT=bt, HAS_ROT=left is not None, KB=k_blocks,
            BITS=bits, CLIP=float(clip), LANES=lanes, PRECISION=precision, ASM=cuda,
            num_warps=warps)
    return q, s, z


def lane_perm(k: int, lanes: int) -> torch.Tensor:
    """Index map of lane order: position j holds natural k = perm[j] (CPW = 4*lanes codes per word)."""
    j = torch.arange(k)
    cpw = 4 * lanes
    r = j % cpw
    return j - r + 4 * (r % lanes) + r // lanes


# ------------------------------------------------------------------------------------------------------
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
def _unpack_tile(w_ptr, qa_ptr, qm_ptr, rn, k0, N, K, stride_w, G: tl.constexpr, GS: tl.constexpr,
                 BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 ASM: tl.constexpr):
    """int8 weights [BN, BK] for rows rn and codes k0..k0+BK-1, in lane order: column j = CPW*p + LANES*b + i
    holds the code k = k0 + CPW*p + 4*i + b. w_ptr points at the packed words viewed as bytes. The bytes are
    loaded as [BN, words, 4] so the four bytes of a word are one register of the inline assembly (which reads
    its group's multiplier from that register's first element)."""
    LANES: tl.constexpr = 8 // BITS
    CPW: tl.constexpr = 4 * LANES
    NW: tl.constexpr = BK // CPW  # words of one row in this tile
    wi = tl.arange(0, NW)
    bi = tl.arange(0, 4)
    ok = (rn[:, None] < N) & (k0 + wi[None, :] * CPW < K)
    byts = tl.load(w_ptr + rn[:, None, None] * stride_w + k0 // LANES + 4 * wi[None, :, None] + bi[None, None, :],
                   mask=ok[:, :, None], other=0)
    pq = rn[:, None] * G + (k0 + wi[None, :] * CPW) // GS
    qa = tl.load(qa_ptr + pq, mask=ok, other=0).to(tl.int32)[:, :, None]
    qm = tl.load(qm_ptr + pq, mask=ok, other=0).to(tl.int32)[:, :, None]
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
def _load_rep(w_ptr, qa_ptr, qm_ptr, rn, k0, N, K, stride_w, G: tl.constexpr, GS: tl.constexpr,
              BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Raw loads for `_int_tile` (codes k0..k0+BK-1 of rows rn, nothing at or past K): every element loads the
    byte that holds its code (byte-lane layout: byte 4*(k // CPW) + k % 4 of the row) and its group's a, m, as
    plain 2-D tiles, so no reshape sits between the loads and the dot (a 3-D word unpack + reshape measured
    1.4-2.2x slower, KERNEL_NOTES v7). w_ptr: packed words viewed as bytes, stride_w in bytes. Split from the
    arithmetic so the GEMM can issue the loads of tiles ahead before using this one."""
    CPW: tl.constexpr = 32 // BITS
    rk = k0 + tl.arange(0, BK)
    ok = (rn[:, None] < N) & (rk[None, :] < K)
    byts = tl.load(w_ptr + rn[:, None] * stride_w + ((rk // CPW) * 4 + rk % 4)[None, :], mask=ok, other=0)
    if BK <= GS:  # one group per row of the tile: a and m are a column
        pq = rn * G + k0 // GS
        ok_n = (rn < N) & (rn * 0 + k0 < K)
        qa = tl.load(qa_ptr + pq, mask=ok_n, other=0)[:, None]
        qm = tl.load(qm_ptr + pq, mask=ok_n, other=0)[:, None]
    else:
        pq = rn[:, None] * G + (rk // GS)[None, :]
        qa = tl.load(qa_ptr + pq, mask=ok, other=0)
        qm = tl.load(qm_ptr + pq, mask=ok, other=0)
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
    k0 = tl.program_id(1) * BK
    w = _unpack_tile(w_ptr, qa_ptr, qm_ptr, rn, k0, N, K, stride_w, G, GS, BITS, STEP, OFF, BN, BK, ASM)
    rk = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn[:, None] < N) & (rk[None, :] < K))


# ------------------------------------------------------------------------------------------------------
# Decode GEMV (M <= 8): dp4a on byte lanes, integer group promotion
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gemv_kernel(x_ptr, s_ptr, z_ptr, w_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr, la_ptr, lr_ptr, bias_ptr, y_ptr,
                 acc_ptr, M, N, K, stride_x, stride_w, stride_y, stride_lr, SB1, SB2,
                 BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, GW: tl.constexpr,
                 KB: tl.constexpr, R: tl.constexpr, NSH: tl.constexpr, RP: tl.constexpr,
                 CP: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                 SPLIT: tl.constexpr, ASM: tl.constexpr):
    # x_ptr: int8 activations (natural order) viewed as int32 words [M, K/4]; w_ptr: packed words [N, K/CPW].
    # Word p of a row holds codes CPW*p..; (word >> B*i) & mask = codes CPW*p+4i..+3, which meet activation
    # word LANES*p + i in one dp4a. GW = words per weight group. Program (n, s) covers K-split s; with several
    # activation K-blocks (KB > 1) the splits are the blocks, each promoted with its own step and zero point into
    # an fp32 partial (acc_ptr [KB, M, N]) that `_epilogue_kernel` sums in a fixed order; with one block, int32
    # partials [SPLIT, M, N].
    LANES: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (2**BITS - 1) * 0x01010101
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rp = tl.arange(0, BP)
    span = K // (4 * LANES) // SPLIT  # words per split
    UPI: tl.constexpr = BP // GW if BP >= GW else 1  # weight groups touched per chunk
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    ones = tl.full([BM, BP], 0x01010101, dtype=tl.int32)
    for w0 in range(pid_s * span, (pid_s + 1) * span, BP):
        wt = tl.load(w_ptr + rn[:, None] * stride_w + w0 + rp[None, :], mask=rn[:, None] < N, other=0)
        cx = tl.zeros([BM, BN, BP], dtype=tl.int32)
        sx = tl.zeros([BM, BP], dtype=tl.int32)
        for i in tl.static_range(LANES):
            xi = tl.load(x_ptr + rm[:, None] * stride_x + LANES * (w0 + rp[None, :]) + i, mask=rm[:, None] < M,
                         other=0)
            wl = (wt >> (BITS * i)) & MASK
            cx = _dp4a(tl.broadcast_to(wl[None, :, :], (BM, BN, BP)), tl.broadcast_to(xi[:, None, :], (BM, BN, BP)),
                       cx, ASM)
            sx = _dp4a(xi, ones, sx, ASM)
        cx_g = tl.sum(tl.reshape(cx, (BM, BN, UPI, BP // UPI)), axis=3)  # Σ c·x per (token, row, group)
        sx_g = tl.sum(tl.reshape(sx, (BM, UPI, BP // UPI)), axis=2)  # Σ x per (token, group)
        g = w0 // GW + tl.arange(0, UPI)
        pq = rn[:, None] * G + g[None, :]
        qa = tl.load(qa_ptr + pq, mask=rn[:, None] < N, other=0).to(tl.int32)
        qm = tl.load(qm_ptr + pq, mask=rn[:, None] < N, other=0).to(tl.int32)
        # Σ_k (a*v + m)*x = a*(step*Σ c·x - offset*Σ x) + m*Σ x, exact in int32
        acc += tl.sum(qa[None, :, :] * (STEP * cx_g - OFF * sx_g[:, None, :]) + qm[None, :, :] * sx_g[:, None, :],
                      axis=2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if KB > 1:  # this split is activation block pid_s
        sb = tl.load(s_ptr + rm * KB + pid_s, mask=rm < M, other=0.0)
        zb = tl.load(z_ptr + rm * KB + pid_s, mask=rm < M, other=0.0).to(tl.int32)
        rs = tl.load(rs_ptr + rn * KB + pid_s, mask=rn < N, other=0)
        y = sb[:, None] * (acc - zb[:, None] * rs[None, :]).to(tl.float32)
        tl.store(acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], y, mask=mask)
    elif SPLIT > 1:  # int32 partial sums (exact); `_epilogue_kernel` adds them up and finishes
        tl.store(acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)
    else:
        sb = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
        zb = tl.load(z_ptr + rm, mask=rm < M, other=0.0).to(tl.int32)
        rs = tl.load(rs_ptr + rn, mask=rn < N, other=0)
        y = sb[:, None] * (acc - zb[:, None] * rs[None, :]).to(tl.float32)
        y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH, RP, CP,
                    HAS_BIAS, False, "ieee")
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R: tl.constexpr,
            NSH: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
            PRECISION: tl.constexpr):
    """y [BM, BN] (tokens x rows): * row scale, + low-rank branch, + bias. The rows of a fused module belong
    to NSH shards (row bounds SB1 <= SB2), each with its own R columns of lr = x @ lowrank_bᵀ [M, NSH*R]."""
    y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if R > 0:
        c = tl.arange(0, CP)
        sh, j = c // RP, c % RP
        ok_c = (j < R) & (sh < NSH)
        shard = (rn >= SB1).to(tl.int32) + (rn >= SB2).to(tl.int32)
        a = tl.load(la_ptr + rn[:, None] * R + j[None, :],
                    mask=(rn[:, None] < N) & ok_c[None, :] & (shard[:, None] == sh[None, :]), other=0.0)
        lr = tl.load(lr_ptr + rm[:, None] * stride_lr + (sh * R + j)[None, :],
                     mask=(rm[:, None] < M) & ok_c[None, :], other=0.0)
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
                     NSH: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    # after a split GEMV/GEMM: acc_ptr [SPLIT, M, N] holds int32 partial sums (KB == 1; summed exactly) or fp32
    # partials already promoted per activation block (KB > 1; summed in a fixed order)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    part = acc_ptr + rm[:, None] * N + rn[None, :]
    if KB == 1:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for b in tl.static_range(SPLIT):
            acc += tl.load(part + b * M * N, mask=mask, other=0)
        sb = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
        zb = tl.load(z_ptr + rm, mask=rm < M, other=0.0).to(tl.int32)
        rs = tl.load(rs_ptr + rn, mask=rn < N, other=0)
        y = sb[:, None] * (acc - zb[:, None] * rs[None, :]).to(tl.float32)
    else:
        y = tl.zeros([BM, BN], dtype=tl.float32)
        for b in tl.static_range(SPLIT):
            y += tl.load(part + b * M * N, mask=mask, other=0.0)
    y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH, RP, CP,
                HAS_BIAS, False, "ieee")
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Tensor-core GEMM (M > 8): int8 weight tile unpacked in registers (or read from the int8 scratch)
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(q_ptr, s_ptr, z_ptr, w_ptr, ws_ptr, qa_ptr, qm_ptr, rs_ptr, la_ptr, lr_ptr, bias_ptr, y_ptr,
                 acc_ptr, M, N, K, stride_q, stride_w, stride_y, stride_lr, SB1, SB2,
                 BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, GS: tl.constexpr,
                 KB: tl.constexpr, R: tl.constexpr, NSH: tl.constexpr, RP: tl.constexpr,
                 CP: tl.constexpr, HAS_BIAS: tl.constexpr, SCRATCH: tl.constexpr, SPLIT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr, ASM: tl.constexpr,
                 PRECISION: tl.constexpr):
    # acc [BM tokens, BN rows] = x [BM, BK] . w_intᵀ, int8 x int8 -> int32 on tensor cores.
    # SCRATCH 0: w_ptr = the packed words viewed as bytes, unpacked per tile (`_load_rep` + `_int_tile`), q in
    # natural order. The next tile's loads are issued before this tile's dot so their latency overlaps it (the
    # byte loads are not pipelined by Triton, and without this the loop waits on every tile: 1.2-1.5x slower).
    # SCRATCH 1: w_ptr = the int8 scratch [N, K] and q, both in lane order (the dot is order-agnostic as long as
    # both agree).
    # SPLIT > 1: program (tile, s) covers K-range s and leaves a partial in acc_ptr [SPLIT, M, N] for
    # `_epilogue_kernel`: int32 sums (KB == 1) or, with several activation K-blocks (then SPLIT is a multiple of
    # KB, every split inside one block), fp32 values already promoted with the block's step and zero point.
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
    BLK = K // KB
    k_lo = pid_s * (K // SPLIT)
    k_hi = k_lo + K // SPLIT
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    y = tl.zeros([BM, BN], dtype=tl.float32)
    if not SCRATCH:
        ahead = _load_rep(w_ptr, qa_ptr, qm_ptr, rn, k_lo, N, k_hi, stride_w, G, GS, BITS, BN, BK)
    for k0 in range(k_lo, k_hi, BK):
        if SCRATCH:
            w = tl.load(w_ptr + rn[:, None] * stride_w + k0 + rk[None, :],
                        mask=(rn[:, None] < N) & (k0 + rk[None, :] < K), other=0)
        else:
            cur = ahead
            ahead = _load_rep(w_ptr, qa_ptr, qm_ptr, rn, k0 + BK, N, k_hi, stride_w, G, GS, BITS, BN, BK)
            w = _int_tile(cur[0], cur[1], cur[2], BITS, STEP, OFF, BK)
        x = tl.load(q_ptr + rm[:, None] * stride_q + k0 + rk[None, :],
                    mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        if KB > 1:
            block_end = (k0 + BK) % BLK == 0
            if block_end | (k0 + BK == k_hi):  # end of a K-block, or of this split inside one
                b = k0 // BLK
                sb = tl.load(s_ptr + rm * KB + b, mask=rm < M, other=0.0)
                # the zero-point term z*rowsum covers the whole block: only the split that ends it subtracts it
                zb = tl.load(z_ptr + rm * KB + b, mask=rm < M, other=0.0).to(tl.int32) * block_end.to(tl.int32)
                rs = tl.load(rs_ptr + rn * KB + b, mask=rn < N, other=0)
                y += (acc - zb[:, None] * rs[None, :]).to(tl.float32) * sb[:, None]
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
            sb = tl.load(s_ptr + rm, mask=rm < M, other=0.0)
            zb = tl.load(z_ptr + rm, mask=rm < M, other=0.0).to(tl.int32)
            rs = tl.load(rs_ptr + rn, mask=rn < N, other=0)
            y = (acc - zb[:, None] * rs[None, :]).to(tl.float32) * sb[:, None]
        y = _finish(y, rm, rn, M, N, ws_ptr, la_ptr, lr_ptr, bias_ptr, stride_lr, SB1, SB2, R, NSH,
                    RP, CP, HAS_BIAS, True, PRECISION)
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
def block_k(unit: int, cap: int, floor: int = 32) -> int:
    """Largest power of two in [floor, cap] dividing `unit` (K, or a K-block)."""
    for bk in (256, 128, 64, 32, 16):
        if floor <= bk <= cap and unit % bk == 0:
            return bk
    raise ValueError(f"K-extent {unit} is not a multiple of {floor}")


GEMV_MAX_M = 8  # up to here: CUDA-core dp4a GEMV
GEMV_CONFIGS = ((1, 8, 64, 2), (GEMV_MAX_M, 32, 32, 4))  # (max M, BN, BP words, warps)
GEMV_SPLIT_CTAS = 528  # split K (int32 partials) while the grid has fewer CTAs than this (4 per SM)
# tensor-core tiles by M bucket: (max M, BM tokens, BN rows, BK cap, warps, stages), from `benchmarks/kernels.py
# --sweep` on the H100 (4096 -> 14336; benchmarks/KERNEL_NOTES.md)
# tensor-core tiles by M bucket: (max M, BM tokens, BN rows, BK cap, warps, stages), from `benchmarks/kernels.py
# --sweep` on the H100 (benchmarks/KERNEL_NOTES.md v7). BK 32 = one weight group of the default group size, so a
# tile's group scales are one column; the scratch path (M >= SCRATCH_MIN_M) takes the last row.
GEMM_CONFIGS = ((16, 16, 64, 32, 4, 2), (64, 64, 64, 32, 4, 3), (255, 128, 64, 32, 4, 3),
                (1 << 62, 128, 128, 128, 8, 3))
SCRATCH_MIN_M = 256  # from here on: unpack once to an int8 scratch, then the GEMM on int8 weights


def uses_scratch(m: int) -> bool:
    return m >= SCRATCH_MIN_M


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


def quant_matmul(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, packed: torch.Tensor, row_scale: torch.Tensor,
                 qa: torch.Tensor, qm: torch.Tensor, rowsum: torch.Tensor, bits: int, step: int, offset: int,
                 group_size: int, out_dtype: torch.dtype, lowrank_a: torch.Tensor | None = None,
                 lr: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 shard_bounds: tuple[int, int] | None = None, scratch: bool | None = None,
                 tile: tuple[int, int, int, int, int] | None = None, out: torch.Tensor | None = None,
                 split: int | None = None) -> torch.Tensor:
    """y [M, N] = s_n * Σ_b s_b (q·W_intᵀ - z_b rowsum_b) (+ lowrank_a @ lrᵀ per shard, + bias).

    q/s/z from `act_quant` (lane order iff `uses_scratch(M)`); packed [N, K*bits/32] int32; row_scale [N]
    fp16/fp32; qa/qm [N, G] int8; rowsum [N, KB] int32; lr [M, S*R] fp32 = x @ lowrank_bᵀ of the S shards,
    whose rows end at shard_bounds (two ascending row indices; (N, N) for one shard). `scratch`, `tile`
    (BM, BN, BK cap, warps, stages), `split`: override the tensor-core path's table and split rule
    (benchmarks)."""
    m, k = q.shape
    n = packed.shape[0]
    kb, g = s.shape[1], qa.shape[1]
    gs = k if group_size == -1 else group_size
    y = out if out is not None else torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return y
    r = 0 if lowrank_a is None else lowrank_a.shape[1]
    nsh = lr.shape[1] // r if r else 1
    rp = max(16, triton.next_power_of_2(r))
    sb1, sb2 = shard_bounds or (n, n)
    args = (row_scale, qa, qm, rowsum, lowrank_a if r else row_scale, lr if r else s,
            bias if bias is not None else row_scale, y)
    meta = dict(BITS=bits, STEP=step, OFF=offset, G=g, KB=kb, R=r, NSH=nsh, RP=rp,
                CP=triton.next_power_of_2(nsh * rp), HAS_BIAS=bias is not None)
    stride_lr = lr.stride(0) if r else 0
    asm = q.device.type == "cuda"
    if m <= GEMV_MAX_M and tile is None:
        _, bn, bp, warps = next(c for c in GEMV_CONFIGS if m <= c[0])
        lanes = 8 // bits
        words = k // (4 * lanes)
        gw = gs // (4 * lanes)
        while (words // kb) % bp or (bp % gw and gw % bp):  # a power of two that never straddles a group
            bp //= 2
        n_ctas = triton.cdiv(n, bn)
        split = kb  # several activation blocks: one split per block
        while kb == 1 and n_ctas * split * 2 <= GEMV_SPLIT_CTAS and words % (2 * split * bp) == 0:
            split *= 2
        acc = torch.empty(split, m, n, dtype=torch.int32 if kb == 1 else torch.float32, device=q.device) \
            if split > 1 else y
        bm = triton.next_power_of_2(m)
        _gemv_kernel[(n_ctas, split)](q.view(torch.int32), s, z, packed, *args, acc, m, n, k, q.stride(0) // 4,
                                      packed.stride(0), y.stride(0), stride_lr, sb1, sb2, GW=gw, BM=bm, BN=bn, BP=bp,
                                      SPLIT=split, ASM=asm, num_warps=warps, **meta)
        if split > 1:
            _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split)
        return y
    bm, bn, bkc, warps, stages = tile or next(c for c in GEMM_CONFIGS if m <= c[0])[1:]
    if tile is None and kb > 1 and not uses_scratch(m):
        bm = min(bm, 64)  # 128-token tiles with the per-block fp32 promotion: 439 vs 188 µs (14336->4096, M=128)
    use_scratch = uses_scratch(m) if scratch is None else scratch
    w = unpack_weights(packed, qa, qm, bits, step, offset, group_size) if use_scratch else packed.view(torch.int8)
    bk = block_k(k // kb, bkc)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split is None:  # enough programs to hide the unpack loop's latency (benchmarks/KERNEL_NOTES.md v7)
        split = 1 if use_scratch else gemm_split(tiles, k, kb, bk)
    if split > 1 and ((k // split) % bk or split % kb):
        raise ValueError(f"split {split} does not cut K = {k} ({kb} blocks) into whole {bk}-wide tiles per block")
    acc = torch.empty(split, m, n, dtype=torch.int32 if kb == 1 else torch.float32, device=q.device) \
        if split > 1 else y
    _gemm_kernel[(tiles, split)](q, s, z, w, *args, acc, m, n, k, q.stride(0), w.stride(0), y.stride(0), stride_lr,
                                 sb1, sb2, GS=gs, SCRATCH=use_scratch, SPLIT=split, BM=bm, BN=bn, BK=bk, GROUP_N=8, ASM=asm,
                                 PRECISION="ieee" if q.device.type == "cpu" else "tf32x3", num_warps=warps,
                                 num_stages=stages, **meta)
    if split > 1:
        _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split)
    return y


def gemm_split(tiles: int, k: int, kb: int, bk: int) -> int:
    """K-splits of the packed-weight GEMM: up to 4 while the grid stays <= 1024 programs; with several
    activation K-blocks one split per block (the kernel also takes several per block)."""
    if kb > 1:  # (more splits per block measured 3.5x slower: 14336->4096, M = 64: 362 vs 103 µs)
        return kb if tiles * kb <= 2048 else 1
    split = 4
    while split > 1 and (tiles * split > 1024 or (k // split) % bk):
        split //= 2
    return split


def _epilogue(acc, s, z, args, m, n, y, stride_lr, sb1, sb2, meta, split) -> None:
    meta = {key: v for key, v in meta.items() if key not in ("BITS", "STEP", "OFF", "G")}
    bm = min(32, triton.next_power_of_2(m))
    _epilogue_kernel[(triton.cdiv(n, 64), triton.cdiv(m, bm))](acc, s, z, *args, m, n, y.stride(0), stride_lr, sb1,
                                                               sb2, SPLIT=split, BM=bm, BN=64, num_warps=4, **meta)
