"""Tile-config sweep for the fixed M-bucket tables in twla_vllm/kernels/triton_ops.py (CUDA).

    python benchmarks/kernel_sweep.py     # prints µs per config; pick winners into _GEMV_CONFIG/_GEMM_CONFIGS
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


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main() -> None:
    torch.manual_seed(0)
    k, n = 4096, 14336
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = fmt.pack_ternary(t).cuda()
    for gs in (128, -1):
        g = fmt.num_groups(k, gs)
        alpha, mu = torch.rand(n, g, device="cuda"), torch.rand(n, g, device="cuda")
        wsum = prepare_unit_sums(t.float(), alpha.cpu(), mu.cpu(), 1).cuda()
        for m, configs, attr in (
                (1, [(8, 128, 2, 2), (16, 128, 4, 2), (16, 256, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2),
                     (8, 256, 2, 3)], "_GEMV_CONFIG"),
                (8192, [((16, 32, 256, 4, 3), (64, 64, 256, 4, 3), (128, 128, 128, 8, 3), c) for c in
                        [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                         (128, 128, 64, 4, 4)]], "_GEMM_CONFIGS")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z = T.act_quant(x, None, None, 4, 1.0, 1)
            for c in configs:
                setattr(T, attr, c)
                try:
                    us = bench(lambda: T.ternary_gemm(q, s, z, packed, alpha, mu, wsum, torch.bfloat16))
                except Exception as e:  # noqa: BLE001 - report configs that do not compile
                    us = float("nan")
                    print("error", type(e).__name__, str(e)[:120])
                print(f"gs={gs} M={m} {attr}={c if m == 1 else c[-1]}: {us:.1f} us", flush=True)


if __name__ == "__main__":
    main()
