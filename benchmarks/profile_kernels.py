"""Hardware counters of the served op's kernels (Nsight Compute), one launch of each case inside a profiled range:

    ncu --clock-control none --profile-from-start off --set full --print-details all \
        python benchmarks/profile_kernels.py [--cases ternary:4096:14336:64,...]

A case is code:K:N:M[:lowrank rank] with the serving config's transform for K (`benchmarks/kernels.py`: 64x64 for
4096, 112x128 in 8 K-blocks for 14336) and group size --group-size. The op runs three times to compile and warm
up, then once between cudaProfilerStart/Stop, so ncu reports exactly the kernels of that one call (act_quant, the
unpack at scratch sizes, the GEMV/GEMM, the split epilogue) in launch order; each case's name is printed (and
pushed as an NVTX range) before its launch, so the report's "==PROF==" lines map to cases. Without ncu it just
runs the cases (a smoke test: on the CPU with TRITON_INTERPRET=1 and small M)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import twla_vllm.ops  # noqa: E402
from twla_vllm import format as fmt  # noqa: E402
from twla_vllm.reference import block_row_sums  # noqa: E402

FACTORS = {4096: (64, 64), 14336: (112, 128)}
K_BLOCKS = {4096: 1, 14336: 8}
DEFAULT_CASES = ("ternary:4096:14336:64,ternary:14336:4096:64,ternary:14336:4096:2048,ternary:4096:14336:2048,"
                 "ternary:4096:14336:1,int4:4096:14336:64:32")


def orth(n: int, device: str) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, device=device))[0].contiguous()


def case_op(spec: str, gs: int, device: str):
    """The served op of one case as a closure (torch.ops.twla.quant_linear on random weights and inputs)."""
    code_name, k, n, m, *rank = spec.split(":")
    k, n, m, rank = int(k), int(n), int(m), int(rank[0]) if rank else 0
    code, kb = fmt.CODES[code_name], K_BLOCKS.get(k, 1)
    if k not in FACTORS:
        raise ValueError(f"case {spec}: K = {k} has no serving transform (one of {sorted(FACTORS)})")
    n1, n2 = FACTORS[k]
    left = torch.block_diag(*[orth(n1 // kb, device) for _ in range(kb)]).contiguous()
    right = orth(n2, device)
    c = torch.randint(0, code.num_codes, (n, k), dtype=torch.int32)
    g = fmt.num_groups(k, gs)
    qa = torch.randint(1, 127 // max(code.vmax, -code.vmin) + 1, (n, g), dtype=torch.int8)
    qm = torch.zeros(n, g, dtype=torch.int8)
    rowsum = block_row_sums(fmt.int_weights(c, qa, qm, code), kb).to(device)
    packed, rs = fmt.pack_codes(c, code).to(device), (torch.rand(n) * 1e-3).half().to(device)
    la = (torch.randn(n, rank, device=device) * 0.05).half() if rank else None
    lb = (torch.randn(rank, k, device=device) * 0.05).half() if rank else None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, device=device, dtype=dtype)
    qa, qm = qa.to(device), qm.to(device)
    # the registered op on CUDA (as served); its body under the Triton interpreter elsewhere (smoke test)
    op = torch.ops.twla.quant_linear if device == "cuda" else twla_vllm.ops._quant_linear
    return lambda: op(x, packed, rs, qa, qm, rowsum, left, right, la, lb, None, code.bits, code.step, code.offset, gs,
                      4, 0.9, kb, kb, n, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated code:K:N:M[:rank]")
    ap.add_argument("--group-size", type=int, default=32)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ops = [(spec, case_op(spec, a.group_size, device)) for spec in a.cases.split(",")]
    for _, op in ops:
        for _ in range(3):
            op()
    if device == "cuda":
        torch.cuda.synchronize()
    for spec, op in ops:
        print(f"== case {spec} (group {a.group_size})", flush=True)
        if device == "cuda":
            torch.cuda.nvtx.range_push(spec)
            torch.cuda.cudart().cudaProfilerStart()
        y = op()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            torch.cuda.nvtx.range_pop()
        print(f"   output {tuple(y.shape)} {y.dtype}", flush=True)


if __name__ == "__main__":
    main()
