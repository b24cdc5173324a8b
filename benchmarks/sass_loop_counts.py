"""Instructions per K-loop iteration of the TWLA kernels, from their sm_90a SASS, on a machine without a GPU: the
proxy KERNEL_NOTES v15-v17 judged the mid-M kernels by (they are issue-bound there), not a timing. Then act_quant
(no K loop: one program's whole instruction stream) in both factor orders (KERNEL_NOTES v30), and the M = 1 GEMV
with act_quant in its prologue (KERNEL_NOTES v31; its row-tile loop holds an unrolled chunk loop where the trip
count is a constant, so the "loop" is then one tile).

    python benchmarks/sass_loop_counts.py [--json benchmarks/results/sass_counts.json]

Each variant is compiled as the launcher specializes a served layer's arguments (`tests.triton_compile_check`:
sm_90, pointers / strides / K / N divisible by 16), assembled by the ptxas that ships with Triton and disassembled
with its cuobjdump. The K loop is the backward branch whose body holds the kernel's tensor-core MMAs (IGMMA) or
dp4a (IDP). Printed per variant: loop instructions, MMA/dp4a count, instructions per 32 codes of K (GEMMs) or per
chunk (GEMVs), its memory instructions (global loads by width, shared-memory stores/loads, barriers: a layout
the loads cannot vectorize along K goes through shared memory), registers and spill bytes from `ptxas -v`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_file import merge_rows  # noqa: E402  (benchmarks/, the script's own folder)
from tests.triton_compile_check import (ACT, FUSED, FUSED_DOWN, GEMM, GEMV, NO_BRANCH, POINTERS, chunked,  # noqa: E402
                                        compile_variant)
from twla_vllm.kernels.triton_ops.act_quant import _act_quant_kernel  # noqa: E402
from twla_vllm.kernels.triton_ops.gemm import _gemm_kernel  # noqa: E402
from twla_vllm.kernels.triton_ops.gemv import _gemv_kernel  # noqa: E402
from twla_vllm.kernels.triton_ops.gemv_quant import _gemv_quant_kernel  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TERNARY_G32 = dict(GS=32)
INT4_G128 = dict(BITS=4, OFF=8, GS=128)
BINARY_G128 = dict(BITS=1, GS=128)
# (name, kernel, pointer kind, constexprs, warps); GEMM tiles are (BM tokens, BN rows, BK codes)
VARIANTS = [
    ("GEMV M=1 ternary, 64-word chunks", _gemv_kernel, "gemv", {**GEMV, **NO_BRANCH}, 2),
    ("GEMV M=8 ternary, 32-word chunks", _gemv_kernel, "gemv", {**GEMV, **NO_BRANCH, "BM": 8, "BN": 32, "BP": 32}, 4),
    ("GEMV M=8 ternary, late sums", _gemv_kernel, "gemv",
     {**GEMV, **NO_BRANCH, "BM": 8, "BN": 32, "BP": 32, "LATE_SUM": True}, 4),
    *[(f"GEMM {code} {bm}x64x{bk}", _gemm_kernel, "packed", {**GEMM, **NO_BRANCH, **consts, "BM": bm, "BK": bk}, 4)
      for code, consts in (("ternary", TERNARY_G32), ("binary", BINARY_G128), ("int4", INT4_G128))
      for bm in (16, 64) for bk in (32, 64)],
    *[(f"GEMV M={bm} ternary, {bp}-word chunks, 8x{vw} chunks", _gemv_kernel, "gemv",
       chunked({**GEMV, **NO_BRANCH, "BM": bm, "BN": bn, "BP": bp}, vw), warps)
      for bm, bn, bp, warps in ((1, 8, 64, 2), (8, 32, 32, 4)) for vw in (1, 2)],
    *[(f"GEMM {code} 64x64x{bk}, 8x{vw} chunks", _gemm_kernel, "packed",
       chunked({**GEMM, **NO_BRANCH, **consts, "BK": bk}, vw), 4)
      for code, consts, vws in (("ternary", TERNARY_G32, (1, 2)), ("int4", INT4_G128, (1, 4))) for bk in (32, 64)
      for vw in vws],
    ("GEMM scratch int4 128x128x128", _gemm_kernel, "matmul",
     {**GEMM, **NO_BRANCH, **INT4_G128, "SCRATCH": True, "BM": 128, "BN": 128, "BK": 128}, 8),
]
DOWN_PROJ = dict(ROWS=112, COLS=128, RBP=16, CP=128, KB=8, AB=8, QR=16, BT=8)  # 112x128 in 8 blocks, 8 tokens
# act_quant as served (the rule's tokens and warps) and against it, each in both factor orders: (name, consts, warps)
ACT_QUANT_VARIANTS = [
    (f"act_quant {view}, {bt} token(s), {warps} warps{', left first' if lf else ''}",
     {**ACT, **consts, "BT": bt, "LEFT_FIRST": lf}, warps)
    for view, consts, bt, warps in (("down_proj 112x128 in 8 blocks", DOWN_PROJ, 8, 8),
                                    ("down_proj 112x128 in 8 blocks", DOWN_PROJ, 8, 4),
                                    ("64x64", {}, 2, 4), ("64x64", {}, 1, 4))
    for lf in (False, True)]
# act_quant in the GEMV's prologue (gemv_quant.py, KERNEL_NOTES v31), at tiles.FUSED_GEMV's 16 rows on 4 warps and
# at the served GEMV's 8 rows on 2: (name, pointer kind, consts, warps)
FUSED_VARIANTS = [
    (f"gemv_quant {view}, {bn}-row tiles, {warps} warps", kind, {**FUSED, **consts, "BN": bn}, warps)
    for view, kind, consts in (("ternary 4096, 64x64 transform", "gemv_quant", {}),
                               ("ternary down_proj 112x128 in 8 blocks", "gemv_quant fp32 partials", FUSED_DOWN))
    for bn, warps in ((16, 4), (8, 2))]
SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")


def sass_and_ptxas(kernel, kind: str, consts: dict, warps: int) -> tuple[list[tuple[int, str]], str, int]:
    """(address, instruction) of the compiled variant, ptxas' register / spill line and the shared memory bytes
    Triton allocates a CTA."""
    compiled = compile_variant(kernel, POINTERS[kind], consts, warps)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([os.path.join(BIN, "ptxas-blackwell"), "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    lines = [(int(m.group(1), 16), m.group(2)) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    return (lines, f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled",
            compiled.metadata.shared)


def k_loop(lines: list[tuple[int, str]]) -> list[str]:
    """The instructions of the backward branch's body that holds the MMAs (or dp4a): the K loop."""
    where = {addr: i for i, (addr, _) in enumerate(lines)}
    best: list[str] = []
    for i, (addr, ins) in enumerate(lines):
        m = BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in where:
            body = [x for _, x in lines[where[int(m.group(1), 16)]:i + 1]]
            if any(op in x for x in body for op in ("GMMA", "IMMA", "IDP")) and len(body) > len(best):
                best = body
    return best


def memory_ops(loop: list[str]) -> str:
    """Global loads by width (LDG32 / 64 / 128, U8 for bytes; LDGSTS = cp.async), shared-memory STS / LDS and
    barriers in the loop."""
    ops = collections.Counter()
    for x in loop:
        op = re.sub(r"^@!?U?P\w+\s+", "", x).split()[0]
        parts = op.split(".")
        if parts[0] == "LDG":
            width = next((p for p in parts[1:] if p in ("64", "128", "U8", "S8", "U16", "S16")), "32")
            ops[f"LDG{width}"] += 1
        elif parts[0] in ("LDGSTS", "STS", "LDS", "BAR", "LDSM"):
            ops[parts[0]] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "–"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the rows here (benchmarks/results schema)")
    a = ap.parse_args()
    rows = []
    print("| kernel, tile | loop instructions | MMA or dp4a | per 32 codes of K | top opcodes | memory | registers |")
    print("|---|---|---|---|---|---|---|")
    for name, kernel, kind, consts, warps in VARIANTS:
        lines, regs, _ = sass_and_ptxas(kernel, kind, consts, warps)
        loop = k_loop(lines)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in loop)
        work = sum(v for op, v in ops.items() if "MMA" in op or op == "IDP")
        per32 = f"{len(loop) * 32 / consts['BK']:.1f}" if kernel is _gemm_kernel else "–"
        top = ", ".join(f"{op} {v}" for op, v in ops.most_common(4))
        print(f"| {name} | {len(loop)} | {work} | {per32} | {top} | {memory_ops(loop)} | {regs} |", flush=True)
        rows.append(dict(kernel=name, loop_instructions=len(loop), memory=memory_ops(loop), registers=regs))
    print("\n| act_quant variant | instructions a warp | memory | registers | shared memory KB |")
    print("|---|---|---|---|---|")
    for name, consts, warps in ACT_QUANT_VARIANTS:
        lines, regs, shared = sass_and_ptxas(_act_quant_kernel, "act_quant", consts, warps)
        body = [x for _, x in lines]
        print(f"| {name} | {len(body)} | {memory_ops(body)} | {regs} | {shared / 1024:.0f} |", flush=True)
        rows.append(dict(kernel=name, instructions=len(body), memory=memory_ops(body), registers=regs,
                         shared_bytes=shared))
    print("\n| act_quant in the GEMV's prologue | instructions a warp | largest loop with dp4a: instructions / dp4a | "
          "registers | shared memory KB |")
    print("|---|---|---|---|---|")
    for name, kind, consts, warps in FUSED_VARIANTS:
        lines, regs, shared = sass_and_ptxas(_gemv_quant_kernel, kind, consts, warps)
        loop = k_loop(lines)
        idp = sum(1 for x in loop if "IDP" in x)
        print(f"| {name} | {len(lines)} | {len(loop)} / {idp} | {regs} | {shared / 1024:.0f} |", flush=True)
        rows.append(dict(kernel=name, instructions=len(lines), loop_instructions=len(loop), registers=regs,
                         shared_bytes=shared))
    if a.json:
        merge_rows(a.json, rows, key=lambda r: r["kernel"], device="cpu (sm_90a SASS, no GPU)")


if __name__ == "__main__":
    main()
