"""Experiment (not served): a lane-planar weight layout for the M = 9..255 GEMM (RESULTS.md, session 12).

    TRITON_INTERPRET=1 python benchmarks/gemm_layout_experiment.py   # exactness on small shapes (CI runs this)
    python benchmarks/gemm_layout_experiment.py                      # H100: exactness, then the timing table

Layout: per row, tiles of TK = W * CPW codes; word j of tile t holds, in bits [B*l, B*(l+1)), the code of column
k = t*TK + l*W + j. So shifting all W words of a tile by B*l and masking gives the int8 sub-tile of W
*consecutive* columns l*W .. l*W+W-1: an elementwise op on a [BN, W] int32 tile (pipelinable 4-byte loads, no
reshape), and with W = 32 = group size one sub-tile is one group (scales are a per-row column).
Checked against an exact int64 matmul (interpreter on CPU, and on the GPU); timed against the product's v7 GEMM
and bf16. Measured 1.4x faster than v7 on 4096->14336 but slower on 4096->4096 and behind bf16 everywhere, and the
M <= 8 GEMV cannot read this layout, so the product keeps the byte-lane layout.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from twla_vllm import format as fmt  # noqa: E402


@triton.jit
def _planar_gemm(q_ptr, w_ptr, qa_ptr, qm_ptr, acc_ptr, M, N, K, stride_q,
                 BITS: tl.constexpr, STEP: tl.constexpr, OFF: tl.constexpr, GS: tl.constexpr, W: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
                 STAGES: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    TK: tl.constexpr = W * CPW
    MASK: tl.constexpr = 2**BITS - 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rw = tl.arange(0, W)
    nt = K // TK
    t_lo = pid_s * (nt // SPLIT)
    t_hi = t_lo + nt // SPLIT
    WPR = K // CPW  # words per row
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    for t in tl.range(t_lo, t_hi, num_stages=STAGES):
        words = tl.load(w_ptr + rn[:, None] * WPR + t * W + rw[None, :], mask=rn[:, None] < N, other=0)
        for l in tl.static_range(CPW):
            g = (t * TK + l * W) // GS
            a = tl.load(qa_ptr + g * N + rn, mask=rn < N, other=0).to(tl.int32)
            m = tl.load(qm_ptr + g * N + rn, mask=rn < N, other=0).to(tl.int32)
            wl = (((words >> (BITS * l)) & MASK) * (a * STEP)[:, None] + (m - a * OFF)[:, None]).to(tl.int8)
            x = tl.load(q_ptr + rm[:, None] * stride_q + t * TK + l * W + rw[None, :], mask=rm[:, None] < M, other=0)
            if SWAP:
                acc = tl.dot(wl, tl.trans(x), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, tl.trans(wl), acc, out_dtype=tl.int32)
    if SWAP:
        ptrs = acc_ptr + (pid_s * M + rm[None, :]) * N + rn[:, None]
        tl.store(ptrs, acc, mask=(rm[None, :] < M) & (rn[:, None] < N))
    else:
        ptrs = acc_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :]
        tl.store(ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def pack_planar(codes: torch.Tensor, bits: int, w: int) -> torch.Tensor:
    """codes [N, K] in [0, 2^bits) -> int32 [N, K*bits/32] in the lane-planar layout."""
    n, k = codes.shape
    cpw = 32 // bits
    tk = w * cpw
    c = codes.to(torch.int64).reshape(n, k // tk, cpw, w)  # [n, t, l, j]
    shifts = (bits * torch.arange(cpw, dtype=torch.int64)).view(1, 1, cpw, 1)
    words = (c << shifts).sum(2)  # [n, t, j]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // cpw)


def planar_matmul(q, packed, qa_t, qm_t, bits, step, off, gs, w=32, bm=64, bn=64, swap=True, split=1, warps=4,
                  stages=3, out=None):
    """int32 [M, N] = q [M, K] int8 · W_intᵀ from the planar words and the group integers stored [G, N]; with
    split > 1 the K-split partials land in `out` [split, M, N] and are summed here."""
    m, k = q.shape
    n = packed.shape[0]
    acc = out if out is not None else torch.empty(split, m, n, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    _planar_gemm[grid](q, packed, qa_t, qm_t, acc, m, n, k, q.stride(0), BITS=bits, STEP=step, OFF=off, GS=gs, W=w,
                       BM=bm, BN=bn, SWAP=swap, SPLIT=split, STAGES=stages, num_warps=warps)
    return acc.sum(0) if split > 1 else acc[0]


def make(n, k, gs, code):
    """Random codes of `code` (a format.CODES name), group integers with |a*v + m| <= 127, and W_int (int64)."""
    wc = fmt.CODES[code]
    c = torch.randint(0, wc.num_codes, (n, k))
    vmax = max(wc.vmax, -wc.vmin)
    qa = torch.randint(1, 119 // vmax + 1, (n, k // gs), dtype=torch.int8)
    qm = torch.randint(-8, 9, (n, k // gs), dtype=torch.int8)
    rep = lambda t: t.to(torch.int64).repeat_interleave(gs, 1)  # noqa: E731
    return c, qa, qm, (wc.step * c - wc.offset) * rep(qa) + rep(qm)


def check(device, cases, seeds=(0, 1)):
    bad = 0
    for seed in seeds:
        for (m, n, k, gs, code, kw) in cases:
            torch.manual_seed(seed)
            wc = fmt.CODES[code]
            c, qa, qm, w_int = make(n, k, gs, code)
            x = torch.randint(-8, 8, (m, k), dtype=torch.int8)
            want = x.to(torch.int64) @ w_int.t()
            got = planar_matmul(x.to(device), pack_planar(c, wc.bits, 32).to(device), qa.t().contiguous().to(device),
                                qm.t().contiguous().to(device), wc.bits, wc.step, wc.offset, gs, **kw)
            got = got.cpu().to(torch.int64)
            ok = torch.equal(got, want)
            bad += not ok
            print(f"check seed {seed} m={m} n={n} k={k} gs={gs} {code} {kw}: {'ok' if ok else 'WRONG'}", flush=True)
    return bad


SMALL = [(20, 48, 1024, 32, "ternary", dict(bm=16, bn=16)),
         (20, 48, 1024, 64, "ternary", dict(bm=16, bn=32, swap=False)),
         (5, 64, 512, 128, "int4", dict(bm=16, bn=16, split=2)), (33, 16, 2048, 32, "binary", dict(bm=16, bn=16))]

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(1 if check("cpu", SMALL, seeds=(0,)) else 0)
    import twla_vllm.ops  # noqa: F401
    from twla_vllm.kernels import triton_ops as T
    from twla_vllm.reference import block_row_sums
    bad = check("cuda", SMALL + [(64, 4096, 4096, 32, "ternary", dict(bm=64, bn=64, swap=s, split=sp))
                                 for s in (True, False) for sp in (1, 4)], seeds=(0, 1))

    def bench(fn):
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3

    rows = []
    for (k, n) in ((4096, 14336), (4096, 4096)):
        torch.manual_seed(0)
        gs = 32
        code = fmt.CODES["ternary"]
        cb = (code.bits, code.step, code.offset)
        c, qa, qm, w_int = make(n, k, gs, "ternary")
        copies = 4
        planar = [(pack_planar(c, 2, 32).cuda(), qa.t().contiguous().cuda(), qm.t().contiguous().cuda())
                  for _ in range(copies)]
        v7 = [(fmt.pack_codes(c.to(torch.int32), code).cuda(), (torch.rand(n) * 1e-3).half().cuda(), qa.cuda(),
               qm.cuda(), block_row_sums(w_int.to(torch.int8), 1).cuda()) for _ in range(copies)]
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in (16, 64, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z, _ = T.act_quant(x, None, None, 4, 1.0, 1)
            t_v7 = bench(lambda: [T.quant_matmul(q, s, z, p, rs, a_, m_, r, *cb, gs, torch.bfloat16)
                                  for p, rs, a_, m_, r in v7]) / copies
            t_bf = bench(lambda: [x @ w.t() for w in wbf]) / copies
            best = (1e9, None)
            bm = min(128, max(16, m))
            for swap in (True, False):
                for bn, warps in ((64, 4), (128, 8)):
                    for stages in (2, 3):
                        for split in (1, 2, 4):
                            kw = dict(bm=bm, bn=bn, swap=swap, split=split, warps=warps, stages=stages)
                            outs = [torch.empty(split, m, n, dtype=torch.int32, device="cuda") for _ in range(copies)]
                            try:
                                us = bench(lambda: [planar_matmul(q, p, a_, m_, *cb, gs, out=o, **kw)
                                                    for (p, a_, m_), o in zip(planar, outs)]) / copies
                            except Exception as e:  # noqa: BLE001
                                print("fail", kw, type(e).__name__, str(e)[:100])
                                continue
                            rows.append((k, n, m, kw, us))
                            if us < best[0]:
                                best = (us, kw)
            print(f"RESULT {k}->{n} M={m}: v7 gemm {t_v7:.1f} us, bf16 {t_bf:.1f} us, planar best {best[0]:.1f} us "
                  f"{best[1]}", flush=True)
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[4]))
    for r in rows:
        print("ROW", r)
    print("check failures:", bad)
