"""Kernel benchmark (CUDA): TWLA rotate+quantize and packed ternary GEMM/GEMV against cuBLAS bf16 and
torch._int_mm, same run, same shapes (Llama-3-8B linears, K -> N).

    python benchmarks/kernels.py            # prints a markdown table

Timing as served: CUDA graphs (triton.testing.do_bench_cudagraph, median), and each timed call cycles
through enough copies of the layer's weights (> 100 MB) that they stream from HBM, not from the 50 MB L2,
as consecutive layers of a model do.

Columns: quant = fused rotate+quantize alone; gemm = ternary GEMM alone; twla = quant + gemm (end to end);
floor% = byte floor (2-bit codes at the measured copy bandwidth) / twla for M <= 64, else the int8
tensor-core floor (measured _int_mm-class peak) / twla.
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twla_vllm import format as fmt  # noqa: E402
from twla_vllm.kernels import triton_ops as T  # noqa: E402
from twla_vllm.reference import unit_code_sums  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 8, 16, 64, 256, 2048, 8192]
FACTORS = {4096: (64, 64), 14336: (112, 128)}
K_BLOCKS = {4096: 1, 14336: 8}  # as benchmarks/serve.py: down_proj's input in 8 shard-local blocks


L2_BEATING_BYTES = 128 << 20


def bench(fn, copies: int = 1) -> float:
    """µs per call of fn(i), i cycling over `copies` weight copies inside one CUDA graph."""
    us = triton.testing.do_bench_cudagraph(lambda: [fn(i) for i in range(copies)], rep=50, return_mode="median")
    return us * 1e3 / copies


def n_copies(nbytes: int) -> int:
    return -(-L2_BEATING_BYTES // nbytes)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda i: b.copy_(a))
    return 2 * a.numel() / (us * 1e-6)


def orth(n):
    q, _ = torch.linalg.qr(torch.randn(n, n, device="cuda"))
    return q.contiguous()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=128, help="weight group along K; -1 = per row")
    gs = ap.parse_args().group_size
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for k, n in SHAPES:
        t = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
        g = fmt.num_groups(k, gs)
        kb = K_BLOCKS[k]
        u = max(g, kb)
        c2 = n_copies(n * k // 4)
        packed = [fmt.pack_ternary(t.cpu()).cuda() for _ in range(c2)]
        alpha = [(torch.rand(n, g, device="cuda") * 0.02).half() for _ in range(c2)]
        mu = [(torch.randn(n, g, device="cuda") * 0.001).half() for _ in range(c2)]
        tsum = [unit_code_sums(t, u) for _ in range(c2)]
        left, right = (orth(f) for f in FACTORS[k])
        c16, c8 = n_copies(2 * n * k), n_copies(n * k)
        w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(c16)]
        w_i8 = [torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda") for _ in range(c8)]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z, sx = T.act_quant(x, left, right, 4, 0.9, kb, u)
            t_quant = bench(lambda i: T.act_quant(x, left, right, 4, 0.9, kb, u))
            t_gemm = bench(lambda i: T.ternary_gemm(q, s, z, sx, packed[i], alpha[i], mu[i], tsum[i], torch.bfloat16),
                           c2)
            t_all = bench(lambda i: T.ternary_gemm(*T.act_quant(x, left, right, 4, 0.9, kb, u), packed[i], alpha[i],
                                                   mu[i], tsum[i], torch.bfloat16), c2)
            t_bf16 = bench(lambda i: x @ w_bf16[i].t(), c16)
            t_int = bench(lambda i: torch._int_mm(q, w_i8[i].t()), c8) if m > 16 else float("nan")
            if m <= 64:
                floor = n * (k / 4 + 6 * g) / bw * 1e6  # codes + fp16 alpha/mu + int16 unit sums
            else:
                floor = 2 * m * n * k / 1.1e15 * 1e6  # measured Triton int8 peak on H100 (kernels.md)
            rows.append((k, n, m, t_quant, t_gemm, t_all, t_bf16, t_int, t_bf16 / t_all, floor / t_all))
            print(f"{k}->{n} M={m}: twla {t_all:.1f} us, bf16 {t_bf16:.1f} us", flush=True)
    print(f"\ngroup size {gs}\n| K->N | M | quant µs | gemm µs | twla µs | bf16 µs | _int_mm µs | bf16/twla | floor % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n, m, tq, tg, ta, tb, ti, ratio, fl in rows:
        print(f"| {k}->{n} | {m} | {tq:.1f} | {tg:.1f} | {ta:.1f} | {tb:.1f} | {ti:.1f} | {ratio:.2f}x | {100 * fl:.0f}% |")


if __name__ == "__main__":
    main()
