"""Triton kernels compiled for the H100 (sm_90) on a machine without a GPU: the code generation the interpreter
never runs (tl.dot shapes and layouts, inline PTX, reshapes and permutes lowered to registers, ptxas).

    python -m tests.triton_compile_check          # prints one line per variant; exit 1 on any failure

Compiles with the Triton installed here (CI's may be newer than the GPU machine's), so it catches code that cannot
compile, not every version difference: `python -m tests.triton_check --gpu` on the device stays the real check.
The variants cover what the launchers pick by M (GEMV, tensor-core GEMM on packed words, scratch GEMM, split-K
epilogue) with and without the low-rank branch, several K-blocks and activation ranges finer than the blocks.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from twla_vllm.kernels.triton_ops.act_quant import _act_quant_kernel
from twla_vllm.kernels.triton_ops.epilogue import _epilogue_kernel
from twla_vllm.kernels.triton_ops.gemm import _gemm_kernel
from twla_vllm.kernels.triton_ops.gemv import _gemv_kernel
from twla_vllm.kernels.triton_ops.gemv_quant import _gemv_quant_kernel
from twla_vllm.kernels.triton_ops.unpack import _unpack_kernel

H100 = GPUTarget("cuda", 90, 32)
# pointer element types as the launchers pass them (matmul.py, act_quant.py); other non-constexpr args are i32
POINTERS = {
    "act_quant": dict(x_ptr="*bf16", l_ptr="*fp32", r_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", z_ptr="*fp32",
                      b_ptr="*fp16", lr_ptr="*fp32"),
    "matmul": dict(x_ptr="*i32", q_ptr="*i8", s_ptr="*fp32", z_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp16",
                   qa_ptr="*i8", qm_ptr="*i8", rs_ptr="*i32", la_ptr="*fp16", lr_ptr="*fp32", bias_ptr="*bf16",
                   y_ptr="*bf16", acc_ptr="*i32"),
    "unpack": dict(w_ptr="*i32", qa_ptr="*i8", qm_ptr="*i8", out_ptr="*i32"),
}
POINTERS["act_quant fp32"] = {**POINTERS["act_quant"], "x_ptr": "*fp32"}  # a float32 model's activations
POINTERS["gemv"] = {**POINTERS["matmul"], "w_ptr": "*i32"}  # the GEMV reads packed int32 words
POINTERS["fp32 partials"] = {**POINTERS["matmul"], "acc_ptr": "*fp32"}  # several K-blocks: promoted partials
POINTERS["packed"] = {**POINTERS["matmul"], "w_ptr": "*i32"}  # the packed GEMM reads int32 words
POINTERS["packed fp32 partials"] = {**POINTERS["fp32 partials"], "w_ptr": "*i32"}
POINTERS["gemv fp32 partials"] = {**POINTERS["gemv"], "acc_ptr": "*fp32"}
# act_quant in the GEMV's prologue: the token and factors as act_quant's, its scratch as int8 and as int32 words
POINTERS["gemv_quant"] = {**POINTERS["gemv"], **POINTERS["act_quant"], "qs_ptr": "*i8", "qw_ptr": "*i32",
                          "ss_ptr": "*fp32", "zs_ptr": "*fp32", "acc_ptr": "*bf16"}
POINTERS["gemv_quant fp32 partials"] = {**POINTERS["gemv_quant"], "acc_ptr": "*fp32"}
ACT = dict(ROWS=64, COLS=64, RBP=64, CP=64, BT=2, HAS_ROT=True, KB=1, AB=1, QR=64, BITS=4, CLIP=0.9,
           PRECISION="tf32", ASM=True, GDC=True, SR=0, JB=16, BTL=16, BKL=128, KS=1, LR_DOT=True,
           LR_PRECISION="tf32", LEFT_FIRST=False)  # the branch's dot on bf16 x and fp16 B: one exact TF32 pass
BRANCH = dict(R=32, NSH=3, RP=32, CP=128)  # rank 32 x 3 fused shards
NO_BRANCH = dict(R=0, NSH=1, RP=16, CP=16)
# weight layouts (`layout.py`) as the launcher specializes them (strides equal to 1 become constants): the format's
# row-major words and scales (SERVED_LAYOUT "rows"), N a multiple of the tile (no row clamp) unless a variant says
ROWS = dict(RC=1, VW=1, stride_wk=1, stride_gg=1, EVEN_N=True)
GEMV = dict(**ROWS, BITS=2, STEP=1, OFF=1, GW=2, KB=1, LRKB=1, HAS_BIAS=True, BM=1, BN=8, BP=64, SPLIT=1, ASM=True,
            GDC=True, LATE_SUM=False, CPC=16)  # CPC: branch columns per multiply-add step
# one token of 4096 in a 64x64 view, ternary g32 into 4096 rows (tiles.FUSED_GEMV's tile)
FUSED = dict(**ROWS, K=4096, ROWS=64, COLS=64, RBP=64, XCP=64, HAS_ROT=True, KB=1, AB=1, QR=64, ABITS=4, CLIP=0.9,
             PRECISION="tf32", BITS=2, STEP=1, OFF=1, GW=2, HAS_BIAS=False, BN=16, BP=64, ASM=True, GDC=True,
             LEFT_FIRST=False)
FUSED_DOWN = dict(K=14336, ROWS=112, COLS=128, RBP=16, XCP=128, KB=8, AB=8, QR=16, BP=16)  # 112x128 in 8 blocks
UNPACK = dict(**ROWS, GS=32, BITS=2, STEP=1, OFF=1, BN=32, BW=64)
GEMM = dict(**ROWS, BITS=2, STEP=1, OFF=1, GS=32, KB=1, LRKB=1, HAS_BIAS=True, SCRATCH=False, SPLIT=1, BM=64,
            BN=64, BK=64, GROUP_N=8, PRECISION="tf32x3", GDC=True)

def chunked(consts: dict, vw: int) -> dict:
    """A variant's constants with the words in chunks of 8 rows x vw words (in-chunk strides are constants in the
    kernels) and N-major scales instead of row-major."""
    return {**{k: v for k, v in consts.items() if k not in ROWS or k == "EVEN_N"}, "RC": 8, "VW": vw, "stride_gn": 1}


VARIANTS = [
    ("act_quant", _act_quant_kernel, "act_quant", ACT, 4),
    ("act_quant + branch x·Bᵀ", _act_quant_kernel, "act_quant", {**ACT, "SR": 32, "JB": 32, "BTL": 64}, 4),
    ("act_quant fp32 x + branch x·Bᵀ (three TF32 passes)", _act_quant_kernel, "act_quant fp32",
     {**ACT, "SR": 32, "JB": 32, "BTL": 64, "LR_PRECISION": "tf32x3"}, 4),
    ("act_quant, 32 ranges", _act_quant_kernel, "act_quant", {**ACT, "AB": 32, "QR": 2}, 4),
    ("act_quant down_proj 8 blocks, 112 ranges", _act_quant_kernel, "act_quant",
     {**ACT, "ROWS": 112, "COLS": 128, "RBP": 16, "CP": 128, "KB": 8, "AB": 112, "QR": 1, "BT": 8}, 8),
    ("act_quant left factor first, 2 tokens of 64x64", _act_quant_kernel, "act_quant", {**ACT, "LEFT_FIRST": True}, 4),
    ("act_quant left factor first, down_proj 8 blocks, 8 tokens", _act_quant_kernel, "act_quant",
     {**ACT, "ROWS": 112, "COLS": 128, "RBP": 16, "CP": 128, "KB": 8, "AB": 8, "QR": 16, "BT": 8, "LEFT_FIRST": True},
     8),
    ("act_quant M=1, ranges + branch", _act_quant_kernel, "act_quant",
     {**ACT, "BT": 1, "AB": 32, "QR": 2, "SR": 48, "JB": 32, "BTL": 16}, 4),
    ("act_quant M=1 + branch in 8 K-chunks (fp32 FMA, 512-wide steps)", _act_quant_kernel, "act_quant",
     {**ACT, "BT": 1, "SR": 48, "JB": 32, "BTL": 1, "BKL": 512, "KS": 8, "LR_DOT": False}, 4),
    ("act_quant M=8 + branch in 32 K-chunks (fp32 FMA)", _act_quant_kernel, "act_quant",
     {**ACT, "BT": 1, "SR": 16, "JB": 16, "BTL": 8, "BKL": 128, "KS": 32, "LR_DOT": False}, 4),
    ("act_quant no transform", _act_quant_kernel, "act_quant",
     {**ACT, "HAS_ROT": False, "ROWS": 16, "COLS": 256, "RBP": 16, "CP": 256, "QR": 16, "BT": 1}, 4),
    ("gemv ternary", _gemv_kernel, "gemv", {**GEMV, **NO_BRANCH}, 2),
    ("gemv binary + branch, split 4", _gemv_kernel, "gemv", {**GEMV, **BRANCH, "BITS": 1, "SPLIT": 4}, 2),
    ("gemv binary + branch finished in-kernel (16 partials)", _gemv_kernel, "gemv",
     {**GEMV, "R": 16, "NSH": 3, "RP": 16, "CP": 64, "CPC": 64, "LRKB": 16, "BITS": 1}, 2),
    ("gemv M=8 binary + 3 x rank-16 branch in 4 chunks of 16 columns", _gemv_kernel, "gemv",
     {**GEMV, "BM": 8, "BN": 32, "BP": 32, "R": 16, "NSH": 3, "RP": 16, "CP": 64, "CPC": 16, "LRKB": 2, "BITS": 1}, 4),
    ("gemv M=8, sums over words after the loop", _gemv_kernel, "gemv",
     {**GEMV, **NO_BRANCH, "BM": 8, "BN": 32, "BP": 32, "LATE_SUM": True}, 4),
    ("gemv int4, 8 blocks", _gemv_kernel, "gemv fp32 partials",
     {**GEMV, **NO_BRANCH, "BITS": 4, "OFF": 8, "KB": 8, "SPLIT": 8}, 4),
    ("gemv_quant M=1 ternary, 64x64 transform", _gemv_quant_kernel, "gemv_quant", FUSED, 4),
    ("gemv_quant M=1 ternary, down_proj 8 blocks", _gemv_quant_kernel, "gemv_quant fp32 partials",
     {**FUSED, **FUSED_DOWN}, 4),
    ("gemv_quant M=1 int4 g128, no transform, 4 ranges, bias, 8x4 chunks", _gemv_quant_kernel, "gemv_quant",
     chunked({**FUSED, "HAS_ROT": False, "ROWS": 16, "COLS": 256, "RBP": 16, "XCP": 256, "AB": 4, "QR": 4,
              "BITS": 4, "OFF": 8, "GW": 16, "HAS_BIAS": True}, 4), 4),
    ("gemm packed ternary", _gemm_kernel, "packed", {**GEMM, **NO_BRANCH}, 4),
    ("gemm packed binary", _gemm_kernel, "packed", {**GEMM, **NO_BRANCH, "BITS": 1}, 4),
    ("gemm packed int4, groups of 16 in 64-wide tiles (per-word scales)", _gemm_kernel, "packed",
     {**GEMM, **NO_BRANCH, "BITS": 4, "OFF": 8, "GS": 16}, 4),
    ("gemm packed + branch (8 partials)", _gemm_kernel, "packed", {**GEMM, **BRANCH, "LRKB": 8}, 4),
    ("gemm packed, 32 ranges, split", _gemm_kernel, "packed fp32 partials",
     {**GEMM, **NO_BRANCH, "KB": 32, "SPLIT": 32}, 4),
    ("gemm packed ternary, 32-code K tiles", _gemm_kernel, "packed", {**GEMM, **NO_BRANCH, "BK": 32}, 4),
    ("gemm packed ternary, rows clamped (N not a multiple of the tile)", _gemm_kernel, "packed",
     {**GEMM, **NO_BRANCH, "BK": 32, "EVEN_N": False}, 4),
    ("gemm packed ternary, 8x2 chunks", _gemm_kernel, "packed", chunked({**GEMM, **NO_BRANCH, "BK": 32}, 2), 4),
    ("gemm packed ternary, 8x1 chunks", _gemm_kernel, "packed", chunked({**GEMM, **NO_BRANCH, "BK": 32}, 1), 4),
    ("gemm packed ternary, 8x8 chunks (TWLA_CHUNK_WORDS=8)", _gemm_kernel, "packed",
     chunked({**GEMM, **NO_BRANCH, "BK": 32}, 8), 4),
    ("gemm packed int4 + branch, 8x4 chunks, 8 K-blocks", _gemm_kernel, "packed fp32 partials",
     chunked({**GEMM, **BRANCH, "BITS": 4, "OFF": 8, "GS": 128, "KB": 8, "SPLIT": 8}, 4), 4),
    ("gemm scratch int4 + branch", _gemm_kernel, "matmul",
     {**GEMM, **BRANCH, "SCRATCH": True, "BITS": 4, "OFF": 8, "BM": 128, "BN": 128, "BK": 128}, 8),
    ("epilogue int32 partials + branch", _epilogue_kernel, "matmul",
     dict(KB=1, SPLIT=4, LRKB=8, HAS_BIAS=True, BM=32, BN=64, DOT=True, PRECISION="tf32x3", GDC=True, CPC=128,
          **BRANCH), 4),
    ("epilogue fp32 partials", _epilogue_kernel, "fp32 partials",
     dict(KB=8, SPLIT=8, LRKB=1, HAS_BIAS=False, BM=32, BN=64, DOT=True, PRECISION="tf32x3", GDC=True, CPC=16,
          **NO_BRANCH), 4),
    ("epilogue M=1, 8 blocks + branch (16 partials, multiply-adds)", _epilogue_kernel, "fp32 partials",
     dict(KB=8, SPLIT=8, LRKB=16, HAS_BIAS=False, BM=1, BN=64, DOT=False, PRECISION="tf32x3", GDC=True, R=16, NSH=1,
          RP=16, CP=16, CPC=16), 4),
    ("unpack ternary", _unpack_kernel, "unpack", UNPACK, 4),
    ("unpack binary", _unpack_kernel, "unpack", {**UNPACK, "BITS": 1, "STEP": 2, "BW": 32}, 4),
    ("unpack int4, per-row groups", _unpack_kernel, "unpack", {**UNPACK, "BITS": 4, "OFF": 8, "GS": 4096}, 4),
    ("gemv ternary, 8x2 chunks", _gemv_kernel, "gemv", chunked({**GEMV, **NO_BRANCH}, 2), 2),
    ("gemv ternary, 8x1 chunks", _gemv_kernel, "gemv", chunked({**GEMV, **NO_BRANCH}, 1), 2),
    ("gemv ternary, 8x8 chunks (TWLA_CHUNK_WORDS=8)", _gemv_kernel, "gemv", chunked({**GEMV, **NO_BRANCH}, 8), 2),
    ("gemv M=8 int4, 8x4 chunks, rows clamped", _gemv_kernel, "gemv",
     chunked({**GEMV, **NO_BRANCH, "BITS": 4, "OFF": 8, "BM": 8, "BN": 32, "BP": 32, "EVEN_N": False}, 4), 4),
    ("unpack ternary, 8x2 chunks", _unpack_kernel, "unpack", chunked(UNPACK, 2), 4),
    ("unpack ternary, 8x1 chunks", _unpack_kernel, "unpack", chunked(UNPACK, 1), 4),
]


def compile_variant(kernel, pointers: dict[str, str], consts: dict, warps: int):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    # as the launcher specializes a served layer's arguments: pointers, strides, K and N divisible by 16 (the
    # loads' vectorization and the code that runs depend on it; without it ptxas sees a variant that never runs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (sig[n].startswith("*") or n.startswith("stride") or n in ("K", "N"))}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=H100, options={"num_warps": warps})


def main() -> int:
    bad = 0
    for name, kernel, kind, consts, warps in VARIANTS:
        try:
            k = compile_variant(kernel, POINTERS[kind], consts, warps)
            print(f"ok   {name} ({len(k.asm['ptx']) // 1000} kB PTX)", flush=True)
        except Exception as e:  # noqa: BLE001 -- the line reports it
            bad += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:800]}", flush=True)
    print(f"{len(VARIANTS) - bad} compiled, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
