"""Tile-config sweep for the fixed tables in twla_vllm/kernels/triton_ops.py (CUDA).

    python benchmarks/kernel_sweep.py     # µs per config, best per shape last; copy winners into
                                          # GEMV_CONFIGS / GEMM_CONFIGS
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twla_vllm import format as fmt  # noqa: E402
from twla_vllm.kernels import triton_ops as T  # noqa: E402
from twla_vllm.reference import unit_code_sums  # noqa: E402

from kernels import bench, n_copies  # noqa: E402  (benchmarks/kernels.py: graph-timed, weights cycling over copies)


def layer(k, n, gs):
    t = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    g = fmt.num_groups(k, gs)
    alpha = torch.rand(n, g, device="cuda").half()
    mu = torch.rand(n, g, device="cuda").half()
    return fmt.pack_ternary(t).cuda(), alpha, mu, unit_code_sums(t, g).cuda()


LAYERS: dict = {}


def run(m, k, n, gs):
    copies = n_copies(n * k // 4)
    if (k, n, gs) not in LAYERS:
        LAYERS[(k, n, gs)] = [layer(k, n, gs) for _ in range(copies)]
    layers = LAYERS[(k, n, gs)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qszs = T.act_quant(x, None, None, 4, 1.0, 1, layers[0][3].shape[1])
    return bench(lambda i: T.ternary_gemm(*qszs, *layers[i], torch.bfloat16), copies)


def act_quant_variants() -> None:
    """Fused rotate+quantize at decode sizes: precision of the rotation dots × warps (one CUDA graph each)."""
    import triton as tr

    for n1, n2 in ((64, 64), (112, 128)):
        k = n1 * n2
        left, right = (torch.linalg.qr(torch.randn(n, n, device="cuda"))[0].contiguous() for n in (n1, n2))
        for m in (1, 8, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q = torch.empty(m, k, dtype=torch.int8, device="cuda")
            s = torch.empty(m, 1, device="cuda")
            z = torch.empty(m, 1, device="cuda")
            sx = torch.empty(m, k // 128, dtype=torch.int32, device="cuda")
            rp, cp = tr.next_power_of_2(n1), tr.next_power_of_2(n2)
            for prec in ("tf32x3", "tf32", "ieee"):
                for warps in (4, 8, 16):
                    def call(i, prec=prec, warps=warps):
                        T._act_quant_kernel[(m,)](x, left, right, q, s, z, sx, k, x.stride(0), q.stride(0), ROWS=n1,
                                                  COLS=n2, RP=rp, CP=cp, HAS_ROT=True, KB=1, BITS=4, CLIP=0.9,
                                                  U=k // 128, UP=tr.next_power_of_2(k // 128), KUP=128,
                                                  PRECISION=prec, num_warps=warps)
                    try:
                        us = bench(call, 1)
                    except Exception as e:  # noqa: BLE001
                        us = float("nan")
                        print("error", type(e).__name__, str(e)[:120])
                    print(f"act_quant {n1}x{n2} M={m} {prec} warps={warps}: {us:.1f} us", flush=True)


def main() -> None:
    torch.manual_seed(0)
    if "--act-quant" in sys.argv:
        act_quant_variants()
        return
    best = {}
    shapes = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 4096)]
    sweeps = {1: list(itertools.product((8, 16), (64, 128), (1, 2, 4), (0, 1056, 2112))),
              8: list(itertools.product((16, 32), (32, 64), (4, 8), (0, 1056)))}
    for m, grid in sweeps.items():
        cfg = next(c for max_m, c in T.GEMV_CONFIGS if m <= max_m)
        saved_cfg = dict(cfg)
        for bn, bp, warps, split in grid:
            cfg.update(BN=bn, BP=bp, warps=warps, stages=2, split_ctas=split)
            for k, n in shapes[:3] if m > 1 else shapes:
                try:
                    us = run(m, k, n, 128)
                except Exception as e:  # noqa: BLE001 - report configs that do not compile
                    us = float("nan")
                    print("error", type(e).__name__, str(e)[:160])
                key = (m, k, n)
                print(f"GEMV M={m} {k}->{n} BN={bn} BP={bp} warps={warps} split_ctas={split}: {us:.1f} us", flush=True)
                if us == us and us < best.get(key, (1e9,))[0]:
                    best[key] = (us, dict(cfg))
        cfg.clear()
        cfg.update(saved_cfg)
    saved = list(T.GEMM_CONFIGS)
    for m, idx, cands in ((64, 1, [(64, 64, 256, 4, 3), (64, 128, 128, 4, 3), (64, 64, 128, 4, 4), (64, 128, 256, 8, 3)]),
                          (8192, 3, [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 64, 8, 4),
                                     (128, 128, 128, 4, 3)])):
        for c in cands:
            T.GEMM_CONFIGS = tuple(c if i == idx else saved[i] for i in range(4))
            for gs in (128, -1):
                k, n = 4096, 14336
                try:
                    us = run(m, k, n, gs)
                except Exception as e:  # noqa: BLE001
                    us = float("nan")
                    print("error", type(e).__name__, str(e)[:160])
                print(f"GEMM M={m} gs={gs} {k}->{n} {c}: {us:.1f} us", flush=True)
                key = (m, k, n, gs)
                if us == us and us < best.get(key, (1e9,))[0]:
                    best[key] = (us, c)
        T.GEMM_CONFIGS = tuple(saved)
    print("\nbest:")
    for key, (us, c) in best.items():
        print(f"  {key}: {us:.1f} us  {c}")


if __name__ == "__main__":
    main()
