"""The launch settings `benchmarks/kernels.py --sweep` times against the rules in
`twla_vllm/kernels/triton_ops/tiles.py`: candidate `quant_matmul` settings per M (SWEEP) and `gemv_quant`'s tiles
and programs per SM at M = 1 (FUSED_SWEEP)."""

# --sweep: candidate quant_matmul settings per M, timed on 4096->14336 (and at M = 64 on every shape):
# tile = (BM, BN, BK cap, warps, stages), split = K-splits (None: `triton_ops.gemm_split`), scratch = unpack
# once into an int8 scratch first (triton_ops._gemm_kernel)
SWEEP = {m: [dict(tile=(bm, bn, bk, w, st)) for bn, w in ((64, 4), (128, 8)) for st in (2, 3) for bk in (32, 64)]
         + [dict(tile=(bm, 64, 32, 4, 3), split=sp) for sp in (1, 2, 8)]
         for m, bm in ((16, 16), (64, 64), (128, 128))}
SWEEP[256] = [dict(scratch=sc, tile=(bm, 128, bk, 8, 3)) for sc in (True, False) for bm, bk in ((128, 128), (256, 64))]
# prefill: the scratch tile (the rule's last row is 128x128x128, 8 warps, 3 stages) against halved tiles, which
# leave more registers for the fp32 sums of several activation K-blocks (down_proj: 255 registers, ncu session 26)
SWEEP[2048] = SWEEP[8192] = [dict(scratch=True, tile=t) for t in ((128, 128, 128, 8, 3), (256, 128, 128, 8, 3),
                                                                  (128, 64, 128, 4, 3), (64, 128, 128, 4, 3),
                                                                  (128, 128, 64, 8, 4), (128, 64, 128, 8, 4))]
SWEEP[64] += [dict(tile=(64, 64, 32, 4, 3), split=sp) for sp in (16, 32)]
# K tiles over several groups (per-word scales) and deeper stages: with whole-sector loads (row chunks) a wider
# tile needs fewer trips
SWEEP[64] += [dict(tile=(64, bn, 128, w, st)) for bn, w in ((64, 4), (128, 8)) for st in (3, 5)]
# M = 8 on the tensor-core path (a 16-token tile) against the GEMV the rule picks (tiles.GEMV_MAX_M)
SWEEP[8] = [dict(tile=(16, bn, 32, w, st)) for bn, w in ((64, 4), (128, 8)) for st in (3, 5)]
# the GEMV's (BN rows, BP words a chunk, warps) against tiles.GEMV_CONFIGS' (8, 64, 2) at M = 1 (and (32, 32, 4) at
# M = 8): wider chunks keep more of a row's words in flight per trip (a 4096-wide ternary row is 256 words, so BP
# 256 is one trip), more rows per CTA fewer CTAs (on every shape at M = 1: the op there is latency-bound)
SWEEP[1] = [dict(gemv_tile=t) for t in ((8, 128, 2), (8, 256, 2), (16, 64, 4), (16, 128, 4), (4, 256, 1),
                                        (8, 256, 4))]
SWEEP[8] += [dict(gemv_tile=t) for t in ((16, 64, 4), (64, 32, 8), (16, 32, 2))]

# --sweep at M = 1: gemv_quant's (BN rows, BP words, warps) tile and programs per SM against tiles.FUSED_GEMV and
# tiles.fused_programs_per_sm
FUSED_SWEEP = [(tile, per_sm)
               for tile in ((8, 64, 2), (16, 64, 4), (32, 64, 4), (16, 64, 8), (16, 128, 4), (16, 256, 4))
               for per_sm in (1, 2, 4, 8)]
