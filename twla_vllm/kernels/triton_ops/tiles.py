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
# M = 1 with act_quant in the GEMV's prologue (gemv_quant.py, KERNEL_NOTES v31; not yet timed): (BN rows, BP words,
# warps). 4 warps for the transform's dots (act_quant's M = 1 launch); BN 16 keeps the 2-warp GEMV's 8 words a
# thread per chunk. Each program repeats the transform (~1 400 instructions a warp, sm_90a SASS) and streams its
# tiles one chunk ahead. `benchmarks/kernels.py --sweep --ms 1` times other tiles and 1-8 programs an SM.
FUSED_GEMV = (16, 64, 4)


def fused_programs_per_sm(rbp: int, cp: int, rotated: bool) -> int:
    """gemv_quant's programs per SM for a token view block of [rbp, cp] (padded): the grid is persistent, so it
    should be one wave. 4 keep ~16 KB of weights in flight per SM (the per-tile GEMV's ~4 resident 2-warp CTAs x 2
    chunks) where they fit: 96 registers with a 64x64 transform (ptxas, sm_90a); with a 128x128 right factor
    (down_proj's 112x128 view) 184 registers, so 2 (65 536 / (184 x 128) = 2.8)."""
    return 4 if not rotated or rbp * rbp + cp * cp <= 8192 else 2


FUSED_GEMV_ON = os.environ.get("TWLA_FUSED_GEMV") == "1"


def fuse_act_quant(m: int, has_branch: bool) -> bool:
    """Whether a linear runs as one `gemv_quant` launch: one token, no low-rank branch (its x·Bᵀ rides in
    act_quant's launch), and TWLA_FUSED_GEMV=1 until the serving table has timed it."""
    return FUSED_GEMV_ON and m == 1 and not has_branch


GEMV_SPLIT_CTAS = 528  # split K (int32 partials) while the grid has fewer CTAs than this (4 per SM)
GEMV_LOWRANK_SUM = 4096  # largest [BM, BN, branch columns] multiply-add tile of an epilogue's low-rank branch


def lowrank_chunk(bm: int, bn: int, cp: int) -> int:
    """Branch columns per multiply-add step of an epilogue tile [bm, bn]: all cp of them while the [bm, bn, cp]
    product stays within GEMV_LOWRANK_SUM (past it the broadcast sum spilled registers: KERNEL_NOTES v9), else the
    largest power of two that keeps it there."""
    return max(1, min(cp, GEMV_LOWRANK_SUM // (bm * bn)))
# tensor-core tiles by M bucket: (max M, BM tokens, BN rows, BK cap, warps, stages), from `benchmarks/kernels.py
# --sweep` on the H100 (benchmarks/KERNEL_NOTES.md v7); the scratch path (M >= SCRATCH_MIN_M) takes the last row.
# The packed path's K tile is at most one weight group (matmul.py): BK 32 for ternary g32 (BK 64 was slower at 7
# of 9 shapes on the H100, up to 1.8x: two groups' scales per row), 64 for groups of >= 64 (int4 and binary g128:
# K-loop instructions per 32 codes at 64x64 tiles, BK 32 / 64: int4 81 / 63.5, binary 197 / 53.5 in sm_90a SASS;
# one word a row per tile at BK 32 sends binary's lane joins through shared memory). KERNEL_NOTES v24.
GEMM_CONFIGS = ((16, 16, 64, 64, 4, 2), (64, 64, 64, 64, 4, 3), (255, 128, 64, 64, 4, 3),
                (1 << 62, 128, 128, 128, 8, 3))
SCRATCH_MIN_M = 256  # from here on: unpack once to an int8 scratch, then the GEMM on int8 weights
CHUNK_MAX_WORDS = 4  # a chunked layout's words per row and chunk at most: 16 bytes, one vector load


def packed_k_cap(bk_cap: int, group_size: int) -> int:
    """The packed GEMM's K-tile cap: the config's, but at most one weight group (at least 32 codes), since a
    tile over several groups needs per-word scales (slower for ternary g32: see GEMM_CONFIGS)."""
    return min(bk_cap, max(32, group_size))


def chunk_words(bits: int, group_size: int, words: int, want: int = 0) -> int:
    """Words VW a row keeps together in the "chunks" layout (`layout.py`): the packed GEMM's K tile at M <= 255
    (`packed_k_cap` of the 9..255-token configs' cap) in words, so each trip reads whole RC x VW chunks, capped at
    CHUNK_MAX_WORDS (or `want` words, a power of two, for measurements), halved until it divides the row's `words`.
    Ternary g32: 2, binary g128: 2, int4 g128: 4."""
    vw = want or min(CHUNK_MAX_WORDS, max(1, packed_k_cap(GEMM_CONFIGS[1][3], group_size) * bits // 32))
    while words % vw:
        vw //= 2
    return vw


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


LOWRANK_PRESUM_PARTIALS = 64  # on the GEMV path, pre-sum from this many partials (measured at 8..128)


def lowrank_presum(m: int, partials: int) -> bool:
    """Whether quant_matmul sums act_quant's branch partials into one [M, R] with a torch reduction before the
    matmul instead of each output tile reading all of them: on the tensor-core paths (M > GEMV_MAX_M) and on the
    GEMV from LOWRANK_PRESUM_PARTIALS partials. H100, int4 g128 rank 32, whole op µs pre-summed / not (4096->4096,
    4096->14336, 14336->4096): M = 2048 (4 / 4 / 8 partials) 144.5 / 145.8, 372.0 / 392.9, 667.8 / 675.8 (session
    25); M = 64 (8 / 8 / 16) 34.8 / 40.0, 78.5 / 82.2, 122.8 / 125.4 (session 26, the first run with PDL on one-block
    GEMMs; session 25 without it: 36.6 / 35.4, 79.6 / 80.7, 125.4 / 128.2); M = 8 14336->4096 (128 partials) 69.4 /
    78.0, but with 32 partials (4096-wide) 33.9 / 32.3 and 69.4 / 67.5; M = 1 (8 / 8 / 16) 18.3 / 14.2, 27.0 /
    21.9, 29.7 / 26.7 (session 25, KERNEL_NOTES v22-v23)."""
    return partials > 1 and (m > GEMV_MAX_M or partials >= LOWRANK_PRESUM_PARTIALS)


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


# act_quant's factor order: the right factor first (served) unless TWLA_ACT_LEFT_FIRST=1 in the environment (read at
# import): the left factor first, one token permute instead of two (KERNEL_NOTES v30), a switch for serve.py's "+lf"
# until the act_quant sweep has timed it
ACT_LEFT_FIRST = os.environ.get("TWLA_ACT_LEFT_FIRST") == "1"
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


def use_pdl(m: int, k_blocks: int) -> bool:
    """Programmatic dependent launch for the matmul after act_quant (pdl.py): on the GEMV path (M <= 8), and on the
    packed GEMM (M = 9..255) with one activation K-block. H100, whole op µs without / with it: M = 1 ternary
    4096->4096 11.1 / 10.1, 14336->4096 20.0 / 18.4; M = 4 14.4 / 12.0 (session 23, KERNEL_NOTES v20); int4 g128
    M = 64 4096->4096 30.5 / 28.4 and 30.3 / 28.5, 4096->14336 67.5 / 66.2 and 68.0 / 66.4 (sessions 24 and 25,
    v22). Off where the GEMM splits per K-block (14336->4096 in 8 blocks: ternary M = 16 66.9 / 86.7, M = 64
    101.4 / 134.4; int4 M = 64 109.5 / 129.0) and on the scratch path (M = 2048: 103.7 / 103.6, 290.6 / 290.6)."""
    return m <= GEMV_MAX_M or (k_blocks == 1 and not uses_scratch(m))


def gemv_late_sum(m: int, group_weights: int) -> bool:
    """Whether the GEMV sums each weight group's words once after its K loop instead of per chunk (v17): at
    M = 5..8 for groups of >= 128 weights. H100 whole op µs per chunk / late (KERNEL_NOTES v21; 4096->4096,
    4096->14336, 14336->4096): M = 8 int4 g128 25.7 / 22.5, 87.1 / 53.2, 66.0 / 54.6; binary g128 15.9 / 16.2,
    29.7 / 28.1, 47.3 / 34.4; ternary g128 17.5 / 16.4, 45.0 / 33.2, 42.5 / 37.2; ternary g64 16.7 / 18.2, 42.9 /
    41.6, 40.2 / 45.1 and g32 lost on every shape. At M = 2 and 4 late sums lost at ternary g32, g64 and g128 on
    every shape (g128 M = 4: 11.6 / 15.0, 23.2 / 29.8, 28.2 / 29.6); int4 and binary were not timed there. M = 1
    keeps its group sums in-thread (SASS: 237 vs 252)."""
    return GEMV_MAX_M // 2 < m <= GEMV_MAX_M and group_weights >= 128
