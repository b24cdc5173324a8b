"""Hardware counters of the served op's kernels (Nsight Compute), one launch of each case inside a profiled range:

    ncu --clock-control none --profile-from-start off --set full --print-details all \
        python benchmarks/profile_kernels.py [--cases ternary:4096:14336:64,...]

A case is code:K:N:M[:lowrank rank] with the serving config's transform for K (64x64 for 4096, 112x128 in 8 K-blocks
for 14336) and group size --group-size, built by `benchmarks/kernels.py`'s helpers. The op runs three times to
compile and warm up, then once between cudaProfilerStart/Stop, so ncu reports exactly the kernels of that one call
(act_quant, the unpack at scratch sizes, the GEMV/GEMM, the split epilogue) in launch order; each case's name is
printed (and pushed as an NVTX range) before its launch, so the report's "==PROF==" lines map to cases. CUDA only."""

from __future__ import annotations

import argparse

import torch

from kernels import (FACTORS, K_BLOCKS, laid_out, random_branches, random_layer,  # benchmarks/kernels.py
                     transform_factors)
from twla_vllm import format as fmt
from twla_vllm.reference import block_row_sums

DEFAULT_CASES = ("ternary:4096:14336:64,ternary:14336:4096:64,ternary:14336:4096:2048,ternary:4096:14336:2048,"
                 "ternary:4096:14336:1,int4:4096:14336:64:32")


def case_op(spec: str, gs: int):
    """The served op of one case as a closure (torch.ops.twla.quant_linear on `benchmarks/kernels.py`'s random
    layers, transforms and branches)."""
    code_name, k, n, m, *rank = spec.split(":")
    k, n, m, rank = int(k), int(n), int(m), int(rank[0]) if rank else 0
    if k not in FACTORS:
        raise ValueError(f"case {spec}: K = {k} has no serving transform (one of {sorted(FACTORS)})")
    code, kb = fmt.CODES[code_name], K_BLOCKS[k]
    _, _, left, right = transform_factors(k, kb)
    packed, rs, qa, qm, w_int = random_layer(n, k, gs, code)
    packed, rs, qa, qm, rowsum = laid_out(packed, rs, qa, qm, block_row_sums(w_int, kb).cuda())  # as served
    la, lb = random_branches(n, k, rank, 1)[0] if rank else (None, None)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.ops.twla.quant_linear(x, packed, rs, qa, qm, rowsum, left, right, la, lb, None, code.bits,
                                               code.step, code.offset, gs, 4, 0.9, kb, kb, n, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated code:K:N:M[:rank]")
    ap.add_argument("--group-size", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    ops = [(spec, case_op(spec, a.group_size)) for spec in a.cases.split(",")]
    for _, op in ops:
        for _ in range(3):
            op()
    torch.cuda.synchronize()
    for spec, op in ops:
        print(f"== case {spec} (group {a.group_size})", flush=True)
        torch.cuda.nvtx.range_push(spec)
        torch.cuda.cudart().cudaProfilerStart()
        y = op()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        torch.cuda.nvtx.range_pop()
        print(f"   output {tuple(y.shape)} {y.dtype}", flush=True)


if __name__ == "__main__":
    main()
