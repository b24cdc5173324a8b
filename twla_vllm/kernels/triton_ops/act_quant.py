"""Activations: Kronecker transform L·X·R + asymmetric per-token quantization, and the low-rank branch's
down-projection x·Bᵀ in the same launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .pdl import gdc
from .tiles import ACT_LEFT_FIRST, block_k, lowrank_splits, lowrank_tile, tokens_per_program


@triton.jit
def _round_half_even(v, ASM: tl.constexpr):
    if ASM:  # one cvt.rni (round to nearest even)
        return libdevice.rint(v)
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
def _lowrank_down(x_ptr, b_ptr, lr_ptr, M, stride_x, lid, K: tl.constexpr, KB: tl.constexpr, KS: tl.constexpr,
                  SR: tl.constexpr, JB: tl.constexpr, BTL: tl.constexpr, BKL: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One K-chunk's share of lr = x @ Bᵀ for BTL tokens and JB branch columns. K-block b splits into KS chunks;
    lr_ptr [KB*KS, M, SR] fp32 holds one partial per chunk (the matmul's epilogue sums them in a fixed order:
    deterministic, no atomics). DOT: a tensor-core dot (>= 16 tokens); else fp32 multiply-adds (decode sizes)."""
    b = tl.program_id(1)
    NJ: tl.constexpr = (SR + JB - 1) // JB
    CW: tl.constexpr = K // KB // KS  # columns per chunk
    c = lid % KS
    tile = lid // KS
    tok = (tile // NJ) * BTL + tl.arange(0, BTL)
    j = (tile % NJ) * JB + tl.arange(0, JB)
    acc = tl.zeros([BTL, JB], dtype=tl.float32)
    for k0 in range(0, CW, BKL):
        kk = k0 + tl.arange(0, BKL)
        col = (b * KS + c) * CW + kk
        xt = tl.load(x_ptr + tok[:, None] * stride_x + col[None, :], mask=(tok[:, None] < M) & (kk[None, :] < CW),
                     other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + j[:, None] * K + col[None, :], mask=(j[:, None] < SR) & (kk[None, :] < CW),
                     other=0.0).to(tl.float32)
        if DOT:
            acc += tl.dot(xt, tl.trans(bt), input_precision=PRECISION)
        else:
            acc += tl.sum(xt[:, None, :] * bt[None, :, :], axis=2)
    tl.store(lr_ptr + ((b * KS + c) * M + tok[:, None]) * SR + j[None, :], acc,
             mask=(tok[:, None] < M) & (j[None, :] < SR))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "bf16":  # single-pass bf16 operands, fp32 accumulation
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _block_factors(l_ptr, r_ptr, b, RB: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, RBP: tl.constexpr,
                   CP: tl.constexpr):
    """K-block b's diagonal block of the left factor [RBP, RBP] and the right factor [CP, CP], zero-padded."""
    rr = tl.arange(0, RBP)
    ci = tl.arange(0, CP)
    lm = tl.load(l_ptr + (b * RB + rr[:, None]) * ROWS + b * RB + rr[None, :],
                 mask=(rr[:, None] < RB) & (rr[None, :] < RB), other=0.0)
    rm = tl.load(r_ptr + ci[:, None] * COLS + ci[None, :], mask=(ci[:, None] < COLS) & (ci[None, :] < COLS),
                 other=0.0)
    return lm, rm


@triton.jit
def _quantize_tokens(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, M, stride_x, stride_q, pid, b, ROWS: tl.constexpr,
                     COLS: tl.constexpr, RBP: tl.constexpr, CP: tl.constexpr, BT: tl.constexpr,
                     HAS_ROT: tl.constexpr, KB: tl.constexpr, AB: tl.constexpr, QR: tl.constexpr,
                     BITS: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr,
                     LEFT_FIRST: tl.constexpr):
    # One program per (BT tokens, K-block b). A token row is viewed as [ROWS, COLS] (= [n1, n2] when transformed);
    # K-block b owns rows [b*RB, (b+1)*RB), and the left factor is block-diagonal along those blocks (checked at
    # load), so blocks transform and quantize independently. The BT tokens are stacked as [BT*RBP, CP]: one dot
    # with the right factor for all of them, and one with the left factor after moving the token index next to
    # the columns ([RBP, BT*CP]), so both are plain 2-D tensor-core dots and the factors are loaded once.
    # With AB > KB activation ranges, each block's rows split further into QB = AB/KB ranges of QR rows (a power
    # of two, so the padded RBP rows split into whole ranges; the ranges past RB are padding and not stored);
    # with AB == KB, QR = RBP: one range over the whole (padded) block.
    # LEFT_FIRST (BT > 1): load the tokens as [RBP, BT*CP] instead, apply the left factor first (as the reference
    # does) and move the token index back beside the rows once, before the right-factor dot: one token permute
    # through shared memory instead of two (KERNEL_NOTES v30).
    RB: tl.constexpr = ROWS // KB
    ti = pid * BT + tl.arange(0, BT * RBP) // RBP  # token of each stacked row
    ri = tl.arange(0, BT * RBP) % RBP
    ci = tl.arange(0, CP)
    valid = (ti[:, None] < M) & (ri[:, None] < RB) & (ci[None, :] < COLS)
    offs = (b * RB + ri[:, None]) * COLS + ci[None, :]  # position within a token
    if HAS_ROT and LEFT_FIRST:
        rl = tl.arange(0, RBP)
        tc = pid * BT + tl.arange(0, BT * CP) // CP  # token of each stacked column
        cl = tl.arange(0, BT * CP) % CP
        x = tl.load(x_ptr + tc[None, :] * stride_x + (b * RB + rl[:, None]) * COLS + cl[None, :],
                    mask=(tc[None, :] < M) & (rl[:, None] < RB) & (cl[None, :] < COLS), other=0.0).to(tl.float32)
        lm, rm = _block_factors(l_ptr, r_ptr, b, RB, ROWS, COLS, RBP, CP)
        x = _dot(lm, x, PRECISION)
        if BT > 1:
            x = tl.reshape(tl.permute(tl.reshape(x, (RBP, BT, CP)), (1, 0, 2)), (BT * RBP, CP))
        x = _dot(x, rm, PRECISION)
    else:
        x = tl.load(x_ptr + ti[:, None] * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_ROT:
            lm, rm = _block_factors(l_ptr, r_ptr, b, RB, ROWS, COLS, RBP, CP)
            x = _dot(x, rm, PRECISION)
            if BT > 1:
                x = tl.reshape(tl.permute(tl.reshape(x, (BT, RBP, CP)), (1, 0, 2)), (RBP, BT * CP))
            x = _dot(lm, x, PRECISION)
            if BT > 1:
                x = tl.reshape(tl.permute(tl.reshape(x, (RBP, BT, CP)), (1, 0, 2)), (BT * RBP, CP))
    qmax = 2.0 ** BITS - 1.0
    half = 2.0 ** (BITS - 1)
    QB: tl.constexpr = AB // KB
    NR: tl.constexpr = BT * (RBP // QR)  # ranges in this program, padding included
    xt = tl.reshape(x, (NR, QR * CP))
    vt = tl.reshape(valid, (NR, QR * CP))
    hi = _mul_rn(tl.max(tl.where(vt, xt, float("-inf")), axis=1), CLIP, ASM)
    lo = _mul_rn(tl.min(tl.where(vt, xt, float("inf")), axis=1), CLIP, ASM)
    # IEEE-rounded divisions (div_rn): the default fast fp32 division differs from torch's in the last bit,
    # which flips a rounding decision now and then
    s = tl.maximum(tl.math.div_rn(hi - lo, qmax), 1e-8)  # [NR]
    z = _round_half_even(tl.math.div_rn(-lo, s), ASM)
    tok = pid * BT + tl.arange(0, NR) // (RBP // QR)
    rng = tl.arange(0, NR) % (RBP // QR)  # range within the block
    ok = (tok < M) & (rng < QB)
    tl.store(s_ptr + tok * AB + b * QB + rng, s, mask=ok)
    tl.store(z_ptr + tok * AB + b * QB + rng, z - half, mask=ok)
    # padding (rows past the block, columns past the view) divides s by itself: IEEE division of a zero takes the
    # slow-path subroutine (FCHK), which down_proj's 2 padded rows of 16 made a quarter of the kernel's instructions
    # (Nsight Compute, session 26)
    q = _round_half_even(tl.math.div_rn(tl.where(vt, xt, s[:, None]), s[:, None]), ASM) + z[:, None]
    q = tl.reshape(tl.minimum(tl.maximum(q, 0.0), qmax) - half, (BT * RBP, CP))
    tl.store(q_ptr + ti[:, None] * stride_q + offs, q.to(tl.int8), mask=valid)


@triton.jit
def _act_quant_kernel(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, b_ptr, lr_ptr, M, NQ, stride_x, stride_q,
                      ROWS: tl.constexpr, COLS: tl.constexpr, RBP: tl.constexpr, CP: tl.constexpr,
                      BT: tl.constexpr, HAS_ROT: tl.constexpr, KB: tl.constexpr, AB: tl.constexpr,
                      QR: tl.constexpr, BITS: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
                      ASM: tl.constexpr, SR: tl.constexpr, JB: tl.constexpr, BTL: tl.constexpr, BKL: tl.constexpr,
                      KS: tl.constexpr, LR_DOT: tl.constexpr, LR_PRECISION: tl.constexpr, GDC: tl.constexpr,
                      LEFT_FIRST: tl.constexpr):
    # Programs [0, NQ) along axis 0 transform and quantize BT tokens each; with a low-rank branch (SR > 0) the
    # programs after them compute its down-projection x @ lowrank_bᵀ from the same unrotated x, in the same
    # launch (horizontal fusion: no separate GEMM, no fp32 copy of x). Axis 1 is the K-block either way.
    if GDC:  # let the matmul launch now: it streams its weights until it waits on these outputs (pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid < NQ:
        _quantize_tokens(x_ptr, l_ptr, r_ptr, q_ptr, s_ptr, z_ptr, M, stride_x, stride_q, pid, tl.program_id(1), ROWS,
                         COLS, RBP, CP, BT, HAS_ROT, KB, AB, QR, BITS, CLIP, PRECISION, ASM, LEFT_FIRST)
    if SR > 0:  # compile-time: kernels without a branch have no such programs
        if pid >= NQ:
            _lowrank_down(x_ptr, b_ptr, lr_ptr, M, stride_x, pid - NQ, ROWS * COLS, KB, KS, SR, JB, BTL, BKL,
                          LR_DOT, LR_PRECISION)


def act_quant(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, bits: int, clip: float,
              k_blocks: int, precision: str | None = None,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, bt: int | None = None,
              warps: int | None = None, lowrank_b: torch.Tensor | None = None, act_blocks: int = 0,
              lowrank_split: tuple[int, int] | None = None, left_first: bool | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] -> (q int8 [M, K], s fp32 [M, AB], z fp32 [M, AB], lr) as `reference.quantize_per_token` of
    `reference.kron_rotate(x, left, right)` with AB = act_blocks (0: k_blocks) ranges per token. A left factor
    must be block-diagonal over the k_blocks (TwlaLinearMethod checks it at load); AB must split each k-block
    into a power of two of whole view rows (`token_view`). `precision` of the transform dots: "tf32x3"
    (fp32-accurate), "tf32" (the CUDA default: single pass, ~0.1% of 4-bit codes one step off, see
    benchmarks/RESULTS.md) or "bf16".
    lowrank_b [SR, K] (fp16 as stored, or fp32): the same launch also computes the low-rank branch's x @ lowrank_bᵀ
    with fp32-exact products (`lowrank_dot_precision`), returned as lr [P, M, SR] partial sums, P = k_blocks *
    `lowrank_splits`, for `quant_matmul` (None without lowrank_b).
    `out`: preallocated outputs (tests poison them). `bt` (tokens per program), `warps`, `lowrank_split` (the
    branch's K-chunks per K-block and K step per program): override the launch heuristics (benchmarks, tests).
    `left_first`: apply the left factor before the right one (one token permute instead of two when a program
    stacks tokens; None: `tiles.ACT_LEFT_FIRST`, off unless TWLA_ACT_LEFT_FIRST=1, KERNEL_NOTES v30)."""
    m, k = x.shape
    x = x.contiguous()
    ab = act_blocks or k_blocks
    q, s, z = out or (torch.empty(m, k, dtype=torch.int8, device=x.device),
                      torch.empty(m, ab, dtype=torch.float32, device=x.device),
                      torch.empty(m, ab, dtype=torch.float32, device=x.device))
    cuda = x.device.type == "cuda"
    precision = precision or ("tf32" if cuda else "ieee")
    rows, cols = token_view(k, k_blocks, ab, None if left is None else (left.shape[0], right.shape[0]))
    rbp = triton.next_power_of_2(rows // k_blocks)
    if left is not None:
        rbp = max(16, rbp)  # tl.dot needs >= 16
    cp = max(16, triton.next_power_of_2(cols))
    bt = bt or tokens_per_program(m, k_blocks, rbp, cp, left is not None)
    warps = warps or (4 if bt * rbp * cp <= (16384 if left is not None else 4096) else 8)
    nq = triton.cdiv(m, bt)
    sr = 0 if lowrank_b is None else lowrank_b.shape[0]
    btl, jb, bkl, lr_dot = lowrank_tile(m, sr)
    ks = lowrank_splits(m, k, k_blocks, sr) if sr else 1
    if sr and lowrank_split:
        ks, bkl = lowrank_split
        if (k // k_blocks) % ks or bkl & (bkl - 1):
            raise ValueError(f"lowrank_split {lowrank_split}: {ks} chunks do not divide a K-block of {k // k_blocks}, "
                             f"or the step is not a power of two")
    lr = None if not sr else torch.empty(k_blocks * ks, m, sr, dtype=torch.float32, device=x.device)
    nl = triton.cdiv(m, btl) * triton.cdiv(sr, jb) * ks if sr else 0
    if m:
        _act_quant_kernel[(nq + nl, k_blocks)](
            x, left if left is not None else x, right if right is not None else x, q, s, z,
            lowrank_b.contiguous() if sr else x, lr if sr else s, m, nq, x.stride(0), q.stride(0), ROWS=rows,
            COLS=cols, RBP=rbp, CP=cp, BT=bt, HAS_ROT=left is not None, KB=k_blocks, AB=ab,
            QR=rbp if ab == k_blocks else rows // ab, BITS=bits,
            CLIP=float(clip),
            PRECISION=precision, ASM=cuda, SR=sr, JB=jb, BTL=btl, BKL=bkl, KS=ks, LR_DOT=lr_dot,
            LR_PRECISION=lowrank_dot_precision(x.dtype, lowrank_b.dtype if sr else x.dtype, cuda), GDC=gdc(x.device),
            LEFT_FIRST=(ACT_LEFT_FIRST if left_first is None else left_first) and left is not None,
            num_warps=warps)
    return q, s, z, lr


def lowrank_dot_precision(x_dtype: torch.dtype, b_dtype: torch.dtype, cuda: bool) -> str:
    """The branch dot's input precision: one TF32 pass where both operands are 16-bit (bf16's 8 and fp16's 11
    significant bits fit TF32's 11, so every product is exact in fp32, as with three passes); "tf32x3" for fp32
    operands; "ieee" off CUDA (the interpreter)."""
    if not cuda:
        return "ieee"
    sixteen = (torch.bfloat16, torch.float16)
    return "tf32" if x_dtype in sixteen and b_dtype in sixteen else "tf32x3"


def token_view(k: int, k_blocks: int, act_blocks: int, rotation: tuple[int, int] | None) -> tuple[int, int]:
    """The [rows, cols] view of a token act_quant works on: the transform's [n1, n2], or without one a view
    whose rows split into the k-blocks. With act_blocks > k_blocks each activation range must be a power of two
    of whole rows (so the block's padded rows split into whole ranges); ValueError if that cannot be."""
    if rotation is not None:
        rows, cols = rotation
    else:  # widest row (<= 256 columns) that tiles one activation range
        cols = block_k(k // act_blocks, 256, 16)
        rows = k // cols
    per_range = rows // act_blocks if rows % act_blocks == 0 else 0
    if act_blocks > k_blocks and (not per_range or per_range & (per_range - 1)):
        raise ValueError(f"{act_blocks} activation ranges over {k_blocks} k-block(s) of a [{rows}, {cols}] token "
                         f"view: each range must be a power of two of whole rows")
    return rows, cols


def act_ranges_supported(k: int, k_blocks: int, act_blocks: int, rotation_rows: int) -> bool:
    """Whether act_quant can split a token into these activation ranges (rotation_rows: n1, 0 = no transform)."""
    try:
        token_view(k, k_blocks, act_blocks, (rotation_rows, k // rotation_rows) if rotation_rows else None)
    except ValueError:
        return False
    return True
