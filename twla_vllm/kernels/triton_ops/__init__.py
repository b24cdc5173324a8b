"""Triton kernels for TWLA linears, format v2 (CUDA; also run under TRITON_INTERPRET=1 for CPU tests).
One module per op, the torch reference of every op in `twla_vllm.reference`.

act_quant:  per token and K-block: Kronecker transform L·X·R, asymmetric quantization to `bits` into int8
            containers, step s and zero point z per block; several tokens per program for large M.
gemv:       M <= 8 on CUDA cores. Byte-lane SWAR: (w >> B*i) & mask gives four codes per op, `dp4a` multiplies
            them by four int8 activations; per weight group the integer sums are promoted with the group's
            integers: acc += a*(step*Σc·x - offset*Σx) + m*Σx (per chunk, or per word and summed after the loop
            for groups of >= 4 words at M = 2..8: `tiles.gemv_late_sum`). Everything stays int32 and exact. Each
            chunk's weight words are loaded one chunk ahead.
gemm:       M > 8 on int8 tensor cores, tokens as the MMA's M. The weight tile is unpacked in registers to
            w_int = a*v(c) + m (int8) from whole packed words (SWAR, as unpack) loaded one tile ahead; the K loop
            is a plain int8 dot into int32, split over K into int32 partials when the tile grid is small; s_n,
            the activation step and the zero-point term z*rowsum go to the epilogue (epilogue.py), together with
            the low-rank branch lowrank_a @ (x @ lowrank_bᵀ) (one tensor-core dot per tile past decode sizes) and
            the bias; x @ lowrank_bᵀ comes from act_quant's launch (K-chunked partials, `lowrank_splits`; one TF32
            pass on 16-bit x and B, exact products; summed before the tensor-core matmuls, `lowrank_presum`).
layout:     where the kernels read packed words (row-major, or RC-row chunks so a tile's loads are whole
            32-byte sectors) and group scales (any strides); what TritonKernel keeps (SERVED_LAYOUT).
pdl:        programmatic dependent launch: at decode sizes the matmul starts while act_quant runs (`tiles.use_pdl`).
matmul:     `quant_matmul` picks the path by M (tiles.py).
gemv_quant: one token in one launch: every program of a persistent GEMV transforms and quantizes its K-block of
            the token itself (act_quant's code) before its share of row tiles (`tiles.fuse_act_quant`).
unpack:     large M unpacks the weights once into an int8 scratch and runs the same GEMM on it (SCRATCH). The
            unpack builds four int8 weights per multiply-add from one packed word (SWAR on uint32): lane i,
            ((w >> B*i) & mask) * (a*step) + (m - a*offset + 128), XOR 0x80 per byte, holds four consecutive codes,
            so the scratch is in natural order and stored as whole words.

Every kernel evaluates `twla_vllm.reference.quant_linear`: exact integer dots, then
y = s_n * Σ_b s_b * float32(acc_b - z_b * rowsum_b) (+ low-rank, bias). Rounding is half-to-even everywhere.
"""

from .act_quant import act_quant, act_ranges_supported
from .layout import LAYOUTS, ROW_CHUNK, SERVED_LAYOUT, chunk_rows, packed_rows, resident
from .gemv_quant import gemv_quant
from .matmul import quant_matmul
from .pdl import gdc
from .tiles import GEMV_MAX_M, fuse_act_quant, gemv_late_sum, lowrank_presum, lowrank_splits, use_pdl, uses_scratch
from .unpack import unpack_weights

__all__ = ["GEMV_MAX_M", "LAYOUTS", "ROW_CHUNK", "SERVED_LAYOUT", "act_quant", "act_ranges_supported", "chunk_rows",
           "fuse_act_quant", "gdc", "gemv_late_sum", "gemv_quant", "lowrank_presum", "lowrank_splits", "packed_rows",
           "quant_matmul", "resident", "unpack_weights", "use_pdl", "uses_scratch"]
