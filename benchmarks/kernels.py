"""Kernel benchmark (CUDA): TWLA rotate+quantize and packed ternary GEMM/GEMV against cuBLAS bf16 and
torch._int_mm, same run, same shapes (Llama-3-8B linears, K -> N).

    python benchmarks/kernels.py            # prints a markdown table; medians from triton.testing.do_bench

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
from twla_vllm.reference import prepare_unit_sums  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 16, 64, 256, 2048, 8192]
FACTORS = {4096: (64, 64), 14336: (112, 128)}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
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
        packed = fmt.pack_ternary(t.cpu()).cuda()
        alpha = torch.rand(n, fmt.num_groups(k, gs), device="cuda") * 0.02
        mu = torch.randn(n, fmt.num_groups(k, gs), device="cuda") * 0.001
        wsum = prepare_unit_sums(t.float(), alpha, mu, 1).contiguous()
        left, right = (orth(f) for f in FACTORS[k])
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w_i8 = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z = T.act_quant(x, left, right, 4, 0.9, 1)
            t_quant = bench(lambda: T.act_quant(x, left, right, 4, 0.9, 1))
            t_gemm = bench(lambda: T.ternary_gemm(q, s, z, packed, alpha, mu, wsum, torch.bfloat16))
            t_all = bench(lambda: T.ternary_gemm(*T.act_quant(x, left, right, 4, 0.9, 1), packed, alpha, mu, wsum,
                                                 torch.bfloat16))
            t_bf16 = bench(lambda: x @ w_bf16.t())
            t_int = bench(lambda: torch._int_mm(q, w_i8.t())) if m > 16 else float("nan")
            if m <= 64:
                floor = n * k / 4 / bw * 1e6
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
