"""Triton kernels vs the torch reference: fresh random inputs, odd shapes, poisoned outputs.

CPU (CI): TRITON_INTERPRET=1 python -m tests.triton_check      (small shapes; exact int8 dots)
GPU (H100): python -m tests.triton_check --gpu                   (adds larger shapes and bf16 inputs)
Prints one line per case and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from twla_vllm import format as fmt
from twla_vllm.kernels import triton_ops as T
from twla_vllm.reference import kron_rotate, quantize_per_token, ternary_linear, unit_code_sums


def orth(n, gen, dev):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous().to(dev)


def block_orth(n, blocks, gen, dev):
    return torch.block_diag(*[orth(n // blocks, gen, "cpu") for _ in range(blocks)]).contiguous().to(dev)


def exact_epilogue(q, s, z, t, alpha, mu, k_blocks):
    """float64 epilogue over exact int64 accumulations (the integer part is exact by construction)."""
    m, k = q.shape
    n = t.shape[0]
    units = max(alpha.shape[1], k_blocks)
    ku = k // units
    acc = torch.einsum("mui,nui->umn", q.long().view(m, units, ku).cpu(), t.long().view(n, units, ku).cpu())
    sx = q.long().view(m, units, ku).sum(-1).cpu().double()
    a_u = alpha.double().cpu().repeat_interleave(units // alpha.shape[1], 1)
    m_u = mu.double().cpu().repeat_interleave(units // mu.shape[1], 1)
    s_u = s.double().cpu().repeat_interleave(units // k_blocks, 1)
    z_u = z.double().cpu().repeat_interleave(units // k_blocks, 1)
    wsum = a_u * t.double().cpu().view(n, units, ku).sum(-1) + m_u * ku
    return (torch.einsum("umn,nu,mu->mn", acc.double(), a_u, s_u) + (sx * s_u) @ m_u.t()
            - (z_u * s_u) @ wsum.t())


def check_case(m, n, k, gs, kb, bits, rotated, dtype, split, dev, gen) -> list[str]:
    fails = []
    for _, cfg in T.GEMV_CONFIGS:
        cfg["split_ctas"] = 1 << 20 if split else 0  # force split-K (fp32 atomics) or none
    if split and m <= T.GEMV_MAX_M:
        wk = k // 16
        cfg = next(c for max_m, c in T.GEMV_CONFIGS if m <= max_m)
        bp = T._gemv_words(wk, wk // max(fmt.num_groups(k, gs), kb), cfg["BP"])
        if T._gemv_split(1, wk, bp, 1 << 20) < 2:
            fails.append("case does not exercise split-K")
    x = (torch.randn(m, k, generator=gen) * 2 + torch.randn(1, k, generator=gen)).to(dev, dtype)
    g = fmt.num_groups(k, gs)
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    alpha = (torch.rand(n, g, generator=gen) * 0.05 + 0.01).half().to(dev)  # fp16 as stored
    mu = (torch.randn(n, g, generator=gen) * 0.01).half().to(dev)
    units = max(g, kb)
    left = right = None
    if rotated:
        n1 = {64: 4, 128: 8, 192: 8, 256: 16, 384: 16, 4096: 64}[k]
        left, right = block_orth(n1, kb, gen, dev), orth(k // n1, gen, dev)
    # act_quant vs reference (poisoned outputs)
    q = torch.full((m, k), -128, dtype=torch.int8, device=dev)
    s = torch.full((m, kb), float("nan"), device=dev)
    z = torch.full((m, kb), float("nan"), device=dev)
    sx = torch.full((m, units), -7, dtype=torch.int32, device=dev)
    T.act_quant(x, left, right, bits, 0.9, kb, units, out=(q, s, z, sx))
    xr = kron_rotate(x.float(), left, right)
    q_ref, s_ref, z_ref = quantize_per_token(xr, bits, 0.9, kb)
    if torch.isnan(s).any() or torch.isnan(z).any():
        fails.append("act_quant left s/z unwritten")
    if not torch.equal(sx.cpu().long(), q.cpu().long().view(m, units, -1).sum(-1)):
        fails.append("act_quant sx != per-unit sums of q")
    if not torch.allclose(s, s_ref, rtol=1e-5, atol=0):
        fails.append(f"act_quant s max rel err {((s - s_ref).abs() / s_ref).max():.2e}")
    dq = (q.float() - q_ref).abs()
    # IEEE-fp32 rotation in the kernel vs torch matmul: a value within ~1e-6 of a rounding boundary may
    # land one step away; anything else is a bug.
    if dq.max() > 1 or (dq > 0).float().mean() > (2e-3 if rotated else 0):
        fails.append(f"act_quant q: {(dq > 0).sum().item()} of {dq.numel()} differ, max {dq.max().item()}")
    # GEMM on identical int8 inputs vs the exact epilogue (poisoned output)
    packed = fmt.pack_ternary(t).to(dev)
    tsum = unit_code_sums(t, units).to(dev)
    y = torch.full((m, n), float("nan"), device=dev, dtype=torch.float32)
    q8 = q_ref.to(torch.int8).to(dev)
    sx_ref = q8.int().view(m, units, -1).sum(-1, dtype=torch.int32)
    T.ternary_gemm(q8, s_ref, z_ref, sx_ref, packed, alpha, mu, tsum, torch.float32, out=y)
    want = exact_epilogue(q_ref, s_ref, z_ref, t, alpha, mu, kb)
    if torch.isnan(y).any():
        fails.append("gemm left outputs unwritten")
    err = ((y.double().cpu() - want).abs().max() / want.abs().max()).item()
    if err > 1e-5:  # fp32 epilogue over exact integer sums: only fp32 rounding of a few FMAs remains
        fails.append(f"gemm rel err {err:.2e}")
    # end to end in the serving dtype vs reference.ternary_linear
    y2 = T.ternary_gemm(*T.act_quant(x, left, right, bits, 0.9, kb, units), packed, alpha, mu, tsum, x.dtype)
    ref = ternary_linear(x, t.to(dev), alpha, mu, left, right, bits, 0.9, kb)
    e2 = ((y2.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # bf16 output rounding / rare one-step activation flips
    if e2 > tol:
        fails.append(f"end-to-end rel err {e2:.2e}")
    return fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if a.gpu else "cpu"
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [  # (m, n, k, group, k_blocks, bits, rotated, dtype, split-K GEMV); m <= 8 runs the dp4a GEMV
        (1, 33, 128, 64, 1, 4, True, f32, False), (3, 40, 2048, -1, 1, 2, False, f32, True),
        (5, 24, 256, 32, 4, 6, True, f32, False), (17, 48, 128, -1, 2, 8, True, f32, False),
        (20, 37, 384, 128, 1, 4, True, f32, False), (2, 16, 2048, 128, 2, 3, False, f32, True),
        (8, 19, 192, 96, 1, 4, False, f32, False),  # 6-word units (SmolLM2's group 96)
        (24, 40, 512, -1, 1, 4, False, f32, False),  # one unit split along K by the GEMM's split-K
        (130, 24, 128, 64, 2, 4, True, f32, False),  # prefill path: int8 scratch + tensor-core tiles
    ]
    if a.gpu:
        cases += [(m, 4096, 4096, 128, 1, 4, True, bf16, sp) for m in (1, 7, 64, 300) for sp in (False, True)]
        cases += [(33, 1000, 4096, -1, 8, 6, True, bf16, False), (1, 11008 // 8, 384, 64, 2, 4, True, bf16, False),
                  (200, 96, 256, 64, 4, 4, True, f32, False), (1, 4096, 14336, 128, 2, 4, False, bf16, False),
                  (4, 4096, 14336, -1, 2, 4, False, bf16, True)]
    bad = 0
    for c in cases:
        fails = check_case(*c, dev, gen)
        bad += bool(fails)
        print(f"{'FAIL' if fails else 'ok  '} m={c[0]} n={c[1]} k={c[2]} group={c[3]} k_blocks={c[4]} bits={c[5]} "
              f"rot={c[6]} {str(c[7]).replace('torch.', '')} split={c[8]} {'; '.join(fails)}", flush=True)
    if a.gpu:  # the registered custom ops: schema, fake impls, dynamic-shape AOT dispatch
        import twla_vllm.ops  # noqa: F401
        x = torch.randn(5, 128, device=dev, dtype=torch.bfloat16)
        left, right = orth(8, gen, dev), orth(16, gen, dev)
        args = (x, left, right, 4, 0.9, 1, 2)
        torch.library.opcheck(torch.ops.twla.act_quant.default, args)
        q, s, z, sx = torch.ops.twla.act_quant(*args)
        t = torch.randint(-1, 2, (24, 128), generator=gen, dtype=torch.int8)
        al, mu = torch.rand(24, 2, device=dev).half(), torch.rand(24, 2, device=dev).half()
        torch.library.opcheck(torch.ops.twla.ternary_gemm.default,
                              (q, s, z, sx, fmt.pack_ternary(t).to(dev), al, mu, unit_code_sums(t, 2).to(dev),
                               torch.bfloat16))
        print("ok   opcheck act_quant, ternary_gemm")
    print(f"{len(cases) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
