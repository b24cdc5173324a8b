"""Launch shapes of the TWLA kernels: K-tile widths, the GEMV / tensor-core / scratch paths by M, K-splits,
act_quant's tokens per program."""

from __future__ import annotations

import os


def block_k(unit: int, cap: int, floor: int = 32) -> int:
    """Largest power of two in [floor, cap] dividing `unit` (K, or a K-block)."""
    for bk in (256, 128, 64, 32, 16):
        if floor <= bk <= cap and unit % bk == 0:
            return bk
    raise ValueError(f"K-extent {unit} is not a multiple of {floor}")


GEMV_MAX_M = 8  # up to here: CUDA-core dp4a GEMV
GEMV_CONFIGS = ((1, 8, 64, 2), (GEMV_MAX_M, 32, 32, 4))  # (max M, BN, BP words, warps)
GEMV_SPLIT_CTAS = 528  # split K (int32 partials) while the grid has fewer CTAs than this (4 per SM)
GEMV_LOWRANK_SUM = 4096  # largest [BM, BN, branch columns] multiply-add tile of an epilogue's low-rank branch


# branch columns per tensor-core dot in an epilogue, in TF32 (one pass): the epilogue sets the whole kernel's registers,
# and the packed 64x64 GEMM (80 without a branch) took 173 with int4's rank-32 dot at once in 3xTF32 (2 CTAs per SM
# in an issue-bound loop); 8-column TF32 chunks take 92 (bwla's 3 x rank 16: 197 -> 90; ptxas sm_90a, session 23).
# TF32 rounds lr and A to 2^-11: an error of ~1e-3 of the branch, below the bf16 output's rounding (2^-9).
LOWRANK_DOT_CHUNK = 8
LOWRANK_DOT_PRECISION = "tf32"


def lowrank_chunk(bm: int, bn: int, cp: int) -> int:
    """Branch columns per multiply-add step of an epilogue tile [bm, bn]: all cp of them while the [bm, bn, cp]
    product stays within GEMV_LOWRANK_SUM (past it the broadcast sum spilled registers: KERNEL_NOTES v9), else the
    largest power of two that keeps it there."""
    return max(1, min(cp, GEMV_LOWRANK_SUM // (bm * bn)))
# tensor-core tiles by M bucket: (max M, BM tokens, BN rows, BK cap, warps, stages), from `benchmarks/kernels.py
# --sweep` on the H100 (benchmarks/KERNEL_NOTES.md v7). BK 32 = one weight group of the default group size, so a
# tile's group scales are one column; the scratch path (M >= SCRATCH_MIN_M) takes the last row.
GEMM_CONFIGS = ((16, 16, 64, 32, 4, 2), (64, 64, 64, 32, 4, 3), (255, 128, 64, 32, 4, 3),
                (1 << 62, 128, 128, 128, 8, 3))
SCRATCH_MIN_M = 256  # from here on: unpack once to an int8 scratch, then the GEMM on int8 weights


def uses_scratch(m: int) -> bool:
    return m >= SCRATCH_MIN_M


LOWRANK_DOT_MIN_CHUNK = 512  # K per branch program on the tensor-core path: 512 x rank 16-32 fp32 = 32-64 KB of B
LOWRANK_MAX_SPLITS = 32  # chunks per K-block at most (the H100 sweep went up to 32)
LOWRANK_FMA_PRODUCTS = 16384  # largest [BTL, JB, BKL] multiply-add tile of a decode-size branch program
LOWRANK_MIN_PROGRAMS = 128  # split K until the branch has this many programs (~1 per H100 SM), chunks permitting


def lowrank_tile(m: int, sr: int) -> tuple[int, int, int, bool]:
    """act_quant's branch programs: (BTL tokens, JB branch columns, BKL K step, tensor-core dot?). From M > 8 a
    3xTF32 dot of 16..64 tokens over 128-wide K steps; at decode sizes fp32 multiply-adds over [BTL, JB, BKL] with
    BTL = M rounded up to a power of two (a dot would pad to 16 rows), up to 16K products and 512 columns a step
    (H100, binary g128 rank 16, KERNEL_NOTES v12: step 512 vs 128 at M = 1 over 8 K-blocks of 1792: 24.5 vs
    28.2 µs; 128 vs 64 at M = 8: 23.2 vs 24.9 µs on 4096->4096)."""
    jb = min(32, max(16, 1 << (sr - 1).bit_length()))
    if m > GEMV_MAX_M:
        return min(64, max(16, 1 << (m - 1).bit_length())), jb, 128, True
    btl = 1 << (m - 1).bit_length()
    return btl, jb, min(512, LOWRANK_FMA_PRODUCTS // (btl * jb)), False


def lowrank_splits(m: int, k: int, k_blocks: int, sr: int) -> int:
    """K-chunks per K-block for act_quant's branch programs (the branch's x·Bᵀ always runs in act_quant's launch:
    at every measured shape it beat its own fp32 GEMM, KERNEL_NOTES v12). Each K-block splits into power-of-two
    chunks until there are LOWRANK_MIN_PROGRAMS programs, at most LOWRANK_MAX_SPLITS, each chunk at least one K
    step at decode sizes (more, shorter programs won at every M <= 8 shape of the H100 sweep) and
    LOWRANK_DOT_MIN_CHUNK columns on the tensor-core path. The partials are summed in order by the matmul's
    epilogue."""
    btl, jb, bkl, dot = lowrank_tile(m, sr)
    programs = -(-m // btl) * -(-sr // jb) * k_blocks
    min_chunk = LOWRANK_DOT_MIN_CHUNK if dot else bkl
    kbw = k // k_blocks
    ks = 1
    while (ks < LOWRANK_MAX_SPLITS and programs * ks < LOWRANK_MIN_PROGRAMS and kbw % (2 * ks) == 0
           and kbw // (2 * ks) >= min_chunk):
        ks *= 2
    return ks


def gemm_split(tiles: int, k: int, kb: int, bk: int) -> int:
    """K-splits of the packed-weight GEMM: up to 4 while the grid stays <= 1024 programs; with several
    activation K-blocks one split per block (two or four per block measured 3.5x slower: 14336->4096, M = 64,
    362 vs 103 µs; KERNEL_NOTES v7)."""
    if kb > 1:
        return kb if tiles * kb <= 2048 else 1
    split = 4
    while split > 1 and (tiles * split > 1024 or (k // split) % bk):
        split //= 2
    return split


MIN_PROGRAMS = 256  # act_quant keeps at least this many programs once it stacks tokens (~2 per H100 SM)


def tokens_per_program(m: int, k_blocks: int, rbp: int, cp: int, rotated: bool) -> int:
    """act_quant's launch rule. Stacking tokens lets one program load the factors once and run larger dots (with a
    transform: up to a 128-row right-factor dot, 2 tokens of 64x64, 8 of down_proj's 16x128 blocks; without one,
    up to 8K elements), but it must leave >= MIN_PROGRAMS programs: the widest of {1, 2, widest} that does.
    H100, `act_quant` µs by tokens per program (KERNEL_NOTES v10): 112x128 in 8 K-blocks, M = 64: 1: 13.1, 2: 9.8,
    8: 26.3 (64 programs); M = 128: 2: 17.8, 8: 26.7; M = 2048: 2: 269, 8: 248. 4 was slower than 2 and 8 at every
    M, so it is not a candidate."""
    widest = min(8, 128 // rbp, 16384 // (rbp * cp)) if rotated else min(8, 8192 // (rbp * cp))
    widest = max(1, widest)
    return max(bt for bt in {1, min(2, widest), widest} if bt == 1 or m * k_blocks // bt >= MIN_PROGRAMS)


def swar_gemm(bits: int, k_block: int) -> bool:
    """Whether the packed GEMM (M = 9..255) unpacks four codes per multiply-add in lane order (`quant_matmul(swar=)`,
    KERNEL_NOTES v16): 1- and 2-bit codes whose K-blocks hold whole 4-word tiles, with TWLA_SWAR=1 until timed (int4
    unpacks per element either way: its SASS count favours that)."""
    return bits < 4 and k_block % (128 // bits) == 0 and os.environ.get("TWLA_SWAR", "0") == "1"
