"""Triton kernels vs the torch reference: fresh random inputs, odd shapes, poisoned outputs, every weight code.

CPU (CI): TRITON_INTERPRET=1 python -m tests.triton_check            (small shapes; exact int8 dots)
GPU (H100): python -m tests.triton_check --gpu [--seeds 3]             (adds large shapes, bf16, inline PTX)
Prints one line per case and exits non-zero on any failure.

Tolerances: integer parts are compared exactly. The epilogue is compared against float64 on the same integers
(1e-5: a few fp32 roundings). act_quant codes must equal the reference exactly without a transform; with one,
the kernel's fp32 transform (3xTF32 on the GPU, IEEE on CPU) and torch's matmul round differently in the last
bit, so a value within ~1e-6 of a rounding boundary may land one step away (at most 1 in 500 codes, each by 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from twla_vllm import format as fmt
from twla_vllm.kernels import triton_ops as T
from twla_vllm.reference import block_row_sums, kron_rotate, quant_linear, quantize_per_token


def orth(n, gen, dev):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous().to(dev)


def block_orth(n, blocks, gen, dev):
    return torch.block_diag(*[orth(n // blocks, gen, "cpu") for _ in range(blocks)]).contiguous().to(dev)


@dataclass
class Case:
    m: int
    n: int
    k: int
    gs: int = 32
    kb: int = 1  # transform blocks
    ab: int = 0  # activation ranges per token (0: kb)
    bits: int = 4  # activation bits
    rot: bool = True
    dtype: torch.dtype = torch.float32
    code: str = "ternary"
    rank: int = 0
    shards: int = 1
    bias: bool = False
    scratch: bool = False
    lr_split: tuple | None = None  # override the branch's (K-chunks, K step)
    split: bool = True  # allow split-K in the GEMV
    precision: str | None = None  # act_quant's transform dots (None: the op's default)
    bt: int | None = None  # act_quant's tokens per program (None: its launch rule)
    pdl: bool | None = None  # programmatic dependent launch of the matmul (sm_90+; None: `tiles.use_pdl`)
    late_sum: bool | None = None  # the GEMV's sums over words after its K loop (None: `tiles.gemv_late_sum`)
    presum: bool | None = None  # the branch's partials summed before the matmul (None: `tiles.lowrank_presum`)
    layout: str = ""  # packed words and scales in a `triton_ops.LAYOUTS` layout ("": SERVED_LAYOUT)
    left_first: bool = False  # act_quant applies the left factor first (one token permute)

    def __str__(self) -> str:
        return (f"m={self.m} n={self.n} k={self.k} {self.code} g={self.gs} kb={self.kb}"
                f"{f' ab={self.ab}' if self.ab else ''} a{self.bits} rot={self.rot} "
                f"r={self.rank}x{self.shards} bias={self.bias} {str(self.dtype)[6:]}"
                f"{' scratch' if self.scratch else ''}{'' if self.split else ' nosplit'}"
                f"{'' if self.pdl is None else f' pdl={self.pdl}'}"
                f"{'' if self.late_sum is None else f' late-sum={self.late_sum}'}"
                f"{'' if self.presum is None else f' presum={self.presum}'}"
                f"{f' {self.layout}' if self.layout else ''}{' left-first' if self.left_first else ''}")


def random_layer(c: Case, gen, dev):
    code = fmt.CODES[c.code]
    g = fmt.num_groups(c.k, c.gs)
    codes = torch.randint(0, code.num_codes, (c.n, c.k), generator=gen, dtype=torch.int32)
    vmax, vmin = code.vmax, code.vmin
    qa = torch.randint(0, 127 // max(vmax, -vmin) + 1, (c.n, g), generator=gen, dtype=torch.int32)
    lo, hi = -127 - qa * vmin, 127 - qa * vmax  # a*v + m stays in [-127, 127]
    qm = (lo + (torch.rand(c.n, g, generator=gen) * (hi - lo + 1)).long().clamp(max=(hi - lo))).to(torch.int32)
    row_scale = (torch.rand(c.n, generator=gen) * 1e-3 + 1e-4).half()
    return code, codes, qa.to(torch.int8), qm.to(torch.int8), row_scale


def exact_gemm(q, s, z, w_int, row_scale, kb):
    """float64 epilogue over exact int64 dots."""
    m, k = q.shape
    n = w_int.shape[0]
    acc = torch.einsum("mbi,nbi->mbn", q.long().cpu().view(m, kb, k // kb), w_int.long().cpu().view(n, kb, k // kb))
    rs = w_int.long().cpu().view(n, kb, k // kb).sum(-1)
    y = ((acc - z.long().cpu().unsqueeze(-1) * rs.t().unsqueeze(0)).double() * s.double().cpu().unsqueeze(-1)).sum(1)
    return y * row_scale.double().cpu()


def check_case(c: Case, dev, gen) -> list[str]:
    fails = []
    ab = c.ab or c.kb
    code, codes, qa, qm, row_scale = random_layer(c, gen, dev)
    x = (torch.randn(c.m, c.k, generator=gen) * 2 + torch.randn(1, c.k, generator=gen)).to(dev, c.dtype)
    left = right = None
    if c.rot:
        n1 = {128: 8, 192: 8, 256: 16, 384: 16, 448: 28, 512: 16, 2048: 32, 4096: 64, 14336: 112}[c.k]
        left, right = block_orth(n1, c.kb, gen, dev), orth(c.k // n1, gen, dev)
    scratch = c.scratch or (c.m > T.GEMV_MAX_M and T.uses_scratch(c.m))
    # act_quant vs reference (poisoned outputs), in the order the matmul reads
    q = torch.full((c.m, c.k), -128, dtype=torch.int8, device=dev)
    s = torch.full((c.m, ab), float("nan"), device=dev)
    z = torch.full((c.m, ab), float("nan"), device=dev)
    T.act_quant(x, left, right, c.bits, 0.9, c.kb, c.precision, out=(q, s, z), act_blocks=ab, bt=c.bt,
                left_first=c.left_first or None)
    q_ref, s_ref, z_ref = quantize_per_token(kron_rotate(x.float(), left, right), c.bits, 0.9, ab)
    if torch.isnan(s).any() or torch.isnan(z).any():
        fails.append("act_quant left s/z unwritten")
    single_pass = c.rot and (c.precision or ("tf32" if dev == "cuda" else "ieee")) in ("tf32", "bf16")
    if not torch.allclose(s, s_ref, rtol=5e-3 if single_pass else 1e-5, atol=0):
        fails.append(f"act_quant s max rel err {((s - s_ref).abs() / s_ref).max():.2e}")
    # compare dequantized values: a zero point at an exact .5 tie (symmetric ranges) may round either way when
    # s differs in the last bit, shifting q and z together while s*(q - z) stays put
    blk = lambda t: t.repeat_interleave(c.k // ab, dim=1)  # noqa: E731
    dx = (blk(s) * (q.float() - blk(z)) - blk(s_ref) * (q_ref - blk(z_ref))).abs() / blk(s_ref)
    flips = (dx > 0.5).float().mean().item()
    # a single-pass transform errs by ~1e-3 of |x|, which is a larger share of a step the more bits there are
    # (without a transform: up to 1.6e-4 were seen on the H100 while the reference divided by a Python float, which
    # CUDA torch turns into a reciprocal multiply; fixed in the reference, 5e-4 kept as the bound; KERNEL_NOTES v7)
    allowed = (min(0.1, 1e-2 * 2 ** (c.bits - 4)) if single_pass else 2e-3) if c.rot else 5e-4
    allowed = max(allowed, 3 / dx.numel())  # a small case (one token of 128) may meet two or three boundaries
    if dx.max() > 1.5 or flips > allowed:
        fails.append(f"act_quant: {flips:.2e} of values a step off (allowed {allowed:.0e}), max {dx.max():.2f} steps")
    # weights: the unpacked int8 scratch equals the format's integer weights
    packed = fmt.pack_codes(codes, code).to(dev)
    w_int = fmt.int_weights(codes, qa, qm, code)
    row_scale = row_scale.to(dev)
    packed, qa, qm = T.resident(packed, qa.to(dev), qm.to(dev), code.bits, c.gs, c.layout)
    if scratch:
        un = T.unpack_weights(packed, qa, qm, code.bits, code.step, code.offset, c.gs)
        if not torch.equal(un.cpu(), w_int.to(torch.int8)):
            fails.append(f"unpack_weights: {(un.cpu() != w_int).sum().item()} bytes wrong")
    # the matmul on identical int8 inputs vs an exact epilogue (poisoned output)
    rowsum = block_row_sums(w_int, ab).to(dev)
    q8 = q_ref.to(torch.int8).to(dev)
    y = torch.full((c.m, c.n), float("nan"), device=dev)
    T.quant_matmul(q8, s_ref.to(dev), z_ref.to(dev), packed, row_scale, qa, qm, rowsum, code.bits,
                   code.step, code.offset, c.gs, torch.float32, scratch=scratch, out=y, gemv_split=c.split,
                   pdl=c.pdl, late_sum=c.late_sum)
    want = exact_gemm(q_ref, s_ref, z_ref, w_int, row_scale, ab)
    if torch.isnan(y).any():
        fails.append("matmul left outputs unwritten")
    err = ((y.double().cpu() - want).abs().max() / want.abs().max()).item()
    if err > 1e-5:
        fails.append(f"matmul rel err {err:.2e}")
    # end to end with low-rank branch and bias, in the serving dtype, vs reference.quant_linear
    la = lb = bias = None
    bounds = None
    if c.rank:
        la = (torch.randn(c.n, c.rank, generator=gen) * 0.05).half().to(dev)
        lb = (torch.randn(c.shards * c.rank, c.k, generator=gen) * 0.05).half().to(dev)
        cut = sorted(torch.randint(1, c.n, (2,), generator=gen).tolist())
        bounds = (cut[0], cut[1]) if c.shards == 3 else (cut[0], c.n) if c.shards == 2 else (c.n, c.n)
    if c.bias:
        bias = torch.randn(c.n, generator=gen).to(dev, c.dtype)
    # the factor order of the act_quant check above (None: the served one): its flips are what the tolerance
    # below allows for
    q2, s2, z2, lr = T.act_quant(x, left, right, c.bits, 0.9, c.kb, c.precision, lowrank_b=lb,
                                 act_blocks=ab, bt=c.bt, lowrank_split=c.lr_split, left_first=c.left_first or None)
    if la is not None:  # the branch's x·Bᵀ from act_quant's launch: K-chunk partials vs one fp64 product
        want_lr = x.double() @ lb.double().t()
        lr_err = ((lr.double().sum(0) - want_lr).abs().max() / want_lr.abs().max()).item()
        chunks = c.kb * (c.lr_split[0] if c.lr_split else T.lowrank_splits(c.m, c.k, c.kb, c.shards * c.rank))
        if lr.shape != (chunks, c.m, c.shards * c.rank) or lr_err > 1e-5:  # fp32 sums of K products
            fails.append(f"act_quant lowrank x·Bᵀ: shape {tuple(lr.shape)}, rel err {lr_err:.2e}")
    y2 = T.quant_matmul(q2, s2, z2, packed, row_scale, qa, qm, rowsum, code.bits, code.step, code.offset, c.gs,
                        c.dtype, la, lr, bias, bounds, scratch=scratch, gemv_split=c.split, pdl=c.pdl,
                        late_sum=c.late_sum, presum=c.presum)
    ref = quant_linear(x, w_int.to(dev), row_scale, rowsum, left, right, c.bits, 0.9, bias=bias)
    if la is not None:  # each row reads its own shard's slice of lr
        shard = (torch.arange(c.n, device=dev) >= bounds[0]).long() + (torch.arange(c.n, device=dev) >= bounds[1]).long()
        lr3 = lr.sum(0).view(c.m, c.shards, c.rank)[:, shard.clamp(max=c.shards - 1), :]  # [M, N, R]
        ref = (ref.float() + (lr3 * la.float().unsqueeze(0)).sum(-1)).to(c.dtype)
    e2 = ((y2.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    # bf16 output rounding; one-step activation flips (single-pass transforms flip more). Each flipped code moves
    # its token's outputs by at most s * max|W|: the flips measured above (same inputs, same kernel) are allowed
    # on top, so many tokens with a rounding-boundary flip or two do not fail a correct kernel
    tol = 5e-2 if single_pass else 2e-2 if c.dtype == torch.bfloat16 else 5e-3
    flip_out = ((dx > 0.5).sum(1).double().cpu() * s_ref.double().cpu().amax(1)).max().item() * \
        (w_int.abs().max().item() * row_scale.double().abs().max().item())
    tol += flip_out / ref.float().abs().max().item()
    if e2 > tol:
        fails.append(f"end-to-end rel err {e2:.2e}")
    if c.m == 1 and not c.rank and not c.left_first:  # act_quant in the GEMV's prologue (gemv_quant, the served
        # factor order): the same linear in one launch
        y3 = T.gemv_quant(x, left, right, c.bits, 0.9, c.kb, ab, packed, row_scale, qa, qm, rowsum, code.bits,
                          code.step, code.offset, c.gs, bias, c.precision)
        e3 = ((y3.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        # the interpreter runs act_quant's code with the same operations in both: equal bit for bit; compiled, the
        # transform's dots may be issued differently at other warp counts, so the end-to-end bound above applies
        if dev == "cpu" and not torch.equal(y3, y2):
            fails.append(f"gemv_quant differs from act_quant + GEMV: {(y3 != y2).sum().item()} outputs")
        if e3 > tol:
            fails.append(f"gemv_quant end-to-end rel err {e3:.2e}")
    return fails


OTHER_LAYOUTS = [lay for lay in T.LAYOUTS if lay != T.SERVED_LAYOUT]
CPU_CASES = [
    # a view whose rows are no power of two (28 x 16, down_proj's 14 rows a block at 2 K-blocks): padded rows
    Case(20, 24, 448, gs=32), Case(300, 24, 448, gs=32, kb=2), Case(1, 24, 448, gs=32, kb=2, code="int4"),
    Case(1, 33, 128, gs=64, rank=4, bias=True), Case(3, 40, 512, gs=-1, rot=False, bits=2),
    Case(5, 24, 256, gs=32, kb=4, bits=6), Case(2, 16, 512, gs=128, kb=2, bits=3, rot=False),
    Case(8, 19, 192, gs=96, rot=False, code="int4"), Case(4, 24, 256, code="binary", rank=4, shards=2),
    Case(17, 72, 128, gs=-1, kb=2, bits=8, rank=4, shards=3, bias=True),
    Case(20, 37, 384, gs=128, code="int4", bias=True), Case(24, 40, 512, gs=-1, rot=False, code="binary"),
    Case(33, 70, 256, gs=64, kb=2, scratch=True, code="int4"), Case(18, 65, 128, gs=32, code="binary", scratch=True),
    Case(3, 40, 2048, gs=-1, rot=False), Case(1, 16, 2048, gs=128, rot=False, code="int4", bias=True, rank=4),
    Case(12, 130, 256, gs=32, kb=2, rank=8, shards=2),
    Case(40, 33, 256, gs=64, kb=4, bt=4),  # several tokens per program
    # the GEMV's sums over words after the loop forced on / off: odd N, groups of 2 words, several K-blocks, a
    # branch, int4 (the rule takes it at M = 5..8 for groups of >= 128 weights)
    Case(5, 24, 256, gs=32, kb=4, bits=6, late_sum=True), Case(3, 24, 2048, gs=64, kb=2, rank=8, shards=2,
                                                                late_sum=True),
    Case(8, 19, 256, gs=128, rot=False, code="int4", late_sum=False), Case(1, 33, 128, gs=64, rank=4, bias=True,
                                                                          late_sum=True),
    Case(8, 24, 256, gs=128, code="binary", rank=4, shards=2),  # binary g128 at M = 8: late sums by the rule
    Case(37, 50, 512, gs=-1, rot=False, code="int4"),
    Case(300, 40, 256, gs=64, bt=2),  # the scratch path, 2 tokens a program
    Case(260, 40, 384, gs=64, kb=2, bt=2),  # 16 x 24 view, 2 K-blocks
    Case(70, 40, 256, gs=64, kb=2, rank=16, shards=3),  # branch: 2 token tiles x 2 column tiles x 2 K-blocks
    # the branch in K-chunks: decode sizes (fp32 multiply-adds) finished in the GEMV's own epilogue (kb 1) or
    # after the per-block split (kb 2)
    Case(1, 40, 2048, gs=32, rank=16, shards=3, bias=True, split=False),
    Case(3, 24, 2048, gs=64, kb=2, rank=8, shards=2),
    Case(20, 24, 2048, gs=64, rank=8, shards=2),  # tensor-core branch dot in 4 K-chunks
    Case(1, 24, 2048, gs=64, kb=2, rank=16, lr_split=(8, 256)),  # override: 8 chunks of 128 per block, step 256
    Case(8, 40, 512, gs=64, kb=2, rank=16, shards=3),  # split epilogue's multiply-adds on a narrowed [8, 16, 64] tile
    # the branch's partials summed before the matmul: by the rule (scratch path) and forced at the GEMM and GEMV
    Case(260, 40, 256, gs=64, kb=2, rank=8, shards=2), Case(20, 24, 2048, gs=64, rank=8, shards=2, presum=True),
    Case(3, 24, 2048, gs=64, kb=2, rank=8, shards=2, presum=True),
    # a branch too wide for one GEMV epilogue tile: split K, `_epilogue` adds it
    Case(8, 40, 512, gs=64, rank=16, shards=3), Case(6, 40, 512, gs=64, rank=16, shards=3, late_sum=True),
    # activation ranges finer than the transform blocks (act_blocks): 4 rows of 16 per range, 2 ranges per block
    Case(5, 24, 256, gs=32, ab=4), Case(40, 33, 256, gs=64, kb=2, ab=4, rank=4),
    Case(3, 40, 512, gs=32, rot=False, ab=4), Case(260, 40, 384, gs=32, kb=2, ab=4),
    # the packed GEMM's whole-word unpack: groups of one word in a 32-code tile (per-word scales), binary groups of
    # one word, int4 groups of 16
    Case(20, 24, 256, gs=16), Case(24, 40, 512, gs=32, code="binary"), Case(20, 24, 256, gs=16, code="int4"),
    # the other weight layouts (the cases above use SERVED_LAYOUT): GEMV, packed GEMM with one group and with
    # per-word scales, scratch unpack, a branch over 2 K-blocks; N = 20 is no multiple of the 8-row chunk (row-major
    # words, N-major scales), N = 24 is; a chunk's VW words (`tiles.chunk_words`): 2 for ternary g32 and binary
    # g64, 4 for int4, against GEMM K tiles of 2 to 8 words
    *[Case(m, n, 256, gs=gs, code=code, layout=lay) for lay in OTHER_LAYOUTS
      for m, n, gs, code in ((1, 24, 32, "ternary"), (5, 24, 128, "int4"), (20, 24, 32, "ternary"),
                             (20, 24, 16, "int4"), (300, 24, 64, "binary"), (3, 20, 32, "binary"),
                             (20, 20, 64, "ternary"))],
    *[Case(17, 72, 256, gs=128, kb=2, rank=4, shards=3, code="int4", layout=lay) for lay in OTHER_LAYOUTS],
    # act_quant's left factor first: 1, 2 and 4 tokens a program, padded 14-row blocks, finer activation ranges
    Case(40, 33, 256, gs=64, kb=4, bt=4, left_first=True), Case(260, 40, 384, gs=64, kb=2, bt=2, left_first=True),
    Case(300, 24, 448, gs=32, kb=2, bt=2, left_first=True), Case(3, 24, 256, gs=32, kb=2, ab=4, left_first=True),
    # one token in one launch (gemv_quant; every M = 1 case without a branch checks it): finer ranges in one block,
    # no transform with odd N and per-row groups, binary over 4 blocks with 7 tiles a program
    Case(1, 40, 256, gs=32, ab=4, bias=True), Case(1, 33, 512, gs=-1, rot=False, bias=True, bits=6),
    Case(1, 100, 256, gs=64, kb=4, code="binary"),
]


def gpu_cases() -> list[Case]:
    bf16 = torch.bfloat16
    out = [Case(m, 4096, 4096, gs=32, dtype=bf16, code=code) for m in (1, 7, 16, 64, 300)
           for code in ("ternary", "binary", "int4")]
    out += [Case(300, 512, 14336, gs=32, dtype=bf16), Case(64, 512, 14336, gs=32, dtype=bf16)]  # 112x112 left (tp1)
    out += [Case(1, 4096, 4096, gs=32, dtype=bf16, split=False), Case(300, 4096, 4096, gs=32, dtype=bf16, scratch=True),
            Case(33, 1000, 4096, gs=-1, kb=8, bits=6, dtype=bf16),
            Case(600, 4096, 4096, gs=32, kb=8, rank=32, shards=3, dtype=bf16, code="int4"),
            Case(1, 4096, 4096, gs=32, ab=32, dtype=bf16), Case(64, 4096, 4096, gs=32, ab=32, dtype=bf16),
            Case(1, 4096, 14336, gs=32, kb=8, dtype=bf16),  # down_proj at M = 1 (gemv_quant's 8 blocks too)
            Case(600, 4096, 14336, gs=32, kb=8, ab=112, rot=False, dtype=bf16), Case(1, 1376, 384, gs=64, kb=2),
            Case(200, 96, 256, gs=64, kb=4), Case(1, 4096, 14336, gs=32, kb=2, rot=False, dtype=bf16),
            Case(4, 4096, 14336, gs=-1, kb=1, rot=False, dtype=bf16), Case(64, 4096, 4096, gs=128, rank=32, shards=3,
                                                                          bias=True, dtype=bf16, code="int4"),
            Case(1, 4096, 4096, gs=32, rank=16, shards=2, dtype=bf16, code="binary"),
            Case(4, 4096, 14336, gs=128, kb=8, rank=32, dtype=bf16, code="int4"),
            Case(1, 4096, 14336, gs=128, kb=8, rank=16, dtype=bf16, code="binary"),
            Case(8, 4096, 14336, gs=128, kb=8, rank=16, dtype=bf16, code="binary"),
            Case(1, 6144, 4096, gs=128, rank=16, shards=3, dtype=bf16, code="binary"),
            Case(8, 4096, 4096, gs=32, dtype=bf16, precision="tf32"), Case(64, 4096, 4096, gs=32, dtype=bf16, precision="tf32"),
            Case(64, 4096, 4096, gs=32, dtype=bf16, precision="bf16"),
            Case(600, 4096, 4096, gs=32, dtype=bf16), Case(520, 4096, 14336, gs=32, kb=8, rot=False, dtype=bf16),
            Case(260, 2048, 4096, gs=32, dtype=bf16, code="binary", rank=16, shards=2, bias=True),
            # tiny K (a TP-sharded small model): 2 or 4 packed words a row
            Case(300, 48, 64, gs=32, rot=False, code="binary", scratch=True),
            Case(300, 48, 64, gs=32, rot=False, code="ternary", scratch=True)]
    # a branch too wide for the GEMV's epilogue tile (split K + `_epilogue`), with and without late sums
    out += [Case(8, 6144, 4096, gs=128, rank=16, shards=3, dtype=bf16, code="binary"),
            Case(4, 14336, 4096, gs=128, rank=32, dtype=bf16, code="int4"),
            Case(8, 6144, 4096, gs=128, rank=32, shards=3, dtype=bf16, code="int4", late_sum=False)]
    # the GEMV's sums over words after the loop, forced against the rule (`tiles.gemv_late_sum`)
    out += [Case(m, 4096, 4096, gs=gs, dtype=bf16, code=code, late_sum=not T.gemv_late_sum(m, gs)) for m in (1, 4, 8)
            for code, gs in (("ternary", 32), ("binary", 128), ("int4", 128))]
    out += [Case(8, 4096, 14336, gs=128, kb=8, rank=16, dtype=bf16, code="binary")]
    # programmatic dependent launch against the rule (`tiles.use_pdl`: on at M <= 8 and on one-block GEMMs): GEMV
    # (+ split epilogue with the branch) and one-block GEMM without it, 8-block GEMM and scratch GEMM with it
    out += [Case(1, 4096, 4096, gs=32, dtype=bf16, pdl=False), Case(1, 4096, 14336, gs=128, kb=8, rank=16,
                                                                    dtype=bf16, code="binary", pdl=False),
            Case(8, 4096, 4096, gs=32, dtype=bf16, pdl=False), Case(64, 4096, 14336, gs=32, kb=8, dtype=bf16, pdl=True),
            Case(300, 4096, 4096, gs=32, dtype=bf16, scratch=True, pdl=True),
            Case(64, 4096, 4096, gs=128, rank=32, dtype=bf16, code="int4", pdl=False)]
    out += [Case(64, 4096, 14336, gs=32, kb=8, rot=False, dtype=bf16),
            Case(100, 4096, 4096, gs=128, dtype=bf16, code="int4", rank=32, shards=3)]
    # the branch's partials summed before the matmul, against the rule (`tiles.lowrank_presum`: tensor-core paths
    # or >= 64 partials)
    out += [Case(64, 4096, 14336, gs=128, kb=8, rank=32, dtype=bf16, code="int4", presum=False),
            Case(600, 4096, 4096, gs=32, kb=8, rank=32, shards=3, dtype=bf16, code="int4", presum=False)]
    # the packed GEMM's whole-word unpack with 64-code K tiles (groups of >= 64) and with per-word scales (g16)
    out += [Case(m, 4096, 4096, gs=gs, dtype=bf16, code=code) for m in (16, 64)
            for code, gs in (("ternary", 64), ("binary", 128), ("int4", 128), ("ternary", 16))]
    # the other weight layouts on the compiled paths (the rest run SERVED_LAYOUT)
    out += [Case(m, 4096, 4096, gs=gs, dtype=bf16, code=code, layout=lay) for m in (1, 8, 64, 300)
            for code, gs in (("ternary", 32), ("int4", 128)) for lay in OTHER_LAYOUTS]
    out += [Case(64, 4096, 14336, gs=32, kb=8, dtype=bf16, layout=lay) for lay in OTHER_LAYOUTS]
    out += [Case(100, 4096, 4096, gs=128, dtype=bf16, code="int4", rank=32, shards=3, layout=lay)
            for lay in OTHER_LAYOUTS]
    # act_quant's left factor first, at the served views' token stacking (2 of 64x64, 8 of 112x128 in 8 blocks)
    out += [Case(m, 4096, k, gs=32, kb=kb, dtype=bf16, left_first=True, precision=p)
            for m, k, kb in ((300, 4096, 1), (64, 14336, 8), (2048, 14336, 8)) for p in (None, "tf32x3")]
    return out


def opcheck(dev, gen) -> None:
    """The registered custom op: schema, fake impl, dynamic-shape AOT dispatch, in every weight layout
    (`triton_ops.LAYOUTS`: row-major, 8-row x VW-word chunks)."""
    import twla_vllm.ops  # noqa: F401
    code, codes, qa, qm, row_scale = random_layer(Case(5, 48, 128), gen, dev)
    w_int = fmt.int_weights(codes, qa, qm, code)
    x = torch.randn(5, 128, device=dev, dtype=torch.bfloat16)
    for layout in T.LAYOUTS:
        packed, qa_l, qm_l = T.resident(fmt.pack_codes(codes, code).to(dev), qa.to(dev), qm.to(dev), code.bits, 32,
                                        layout)
        args = (x, packed, row_scale.to(dev), qa_l, qm_l, block_row_sums(w_int, 1).to(dev), orth(8, gen, dev),
                orth(16, gen, dev), None, None, None, code.bits, code.step, code.offset, 32, 4, 0.9, 1, 1, 48, 48)
        torch.library.opcheck(torch.ops.twla.quant_linear.default, args)


def linear_check(dev, gen) -> list[str]:
    """The serving class itself: `TritonKernel.process_weights` + `apply` on a fused three-shard layer with its own
    transform and low-rank branch per shard (rows sliced per shard at run time), in every weight layout, with shard
    sizes that are whole 8-row chunks (24, 16, 8) and that are not (20, 12, 16: row-major words). The layouts must
    agree bit for bit (same integer sums), and with the torch reference kernel within the end-to-end tolerance.
    Then one token without the branch through the one-launch path (`_fused_dispatch_check`)."""
    from twla_vllm import ops
    from twla_vllm.kernels import LinearSpec, TorchReferenceKernel, TritonKernel
    from twla_vllm.kernels.base import LayerWeights
    from twla_vllm.kernels.triton_ops import layout as layout_mod

    if dev == "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key("twla::quant_linear", "CPU"):
        ops._lib.impl("quant_linear", ops._quant_linear, "CPU")  # the interpreter runs the CUDA op's kernels on CPU
    fails = []
    served = layout_mod.SERVED_LAYOUT
    for shards in ((24, 16, 8), (20, 12, 16)):
        n, k, rank = sum(shards), 128, 4
        c = Case(5, n, k, gs=32)
        code, codes, qa, qm, row_scale = random_layer(c, gen, dev)
        w = LayerWeights(packed=fmt.pack_codes(codes, code).to(dev), codes=codes.to(dev), row_scale=row_scale.to(dev),
                         group_scale=qa.to(dev), group_offset=qm.to(dev),
                         w_int=fmt.int_weights(codes, qa, qm, code).to(torch.int8).to(dev),
                         left=torch.stack([orth(8, gen, dev) for _ in shards]),
                         right=torch.stack([orth(16, gen, dev) for _ in shards]),
                         lowrank_a=(torch.randn(n, rank, generator=gen) * 0.05).half().to(dev),
                         lowrank_b=(torch.randn(3 * rank, k, generator=gen) * 0.05).half().to(dev))
        spec = LinearSpec(name="model.layers.0.self_attn.qkv_proj", out_features=n, in_features=k, code=code,
                          group_size=32, act_bits=4, act_clip=0.9, k_blocks=1, act_blocks=1, rotation_rows=8,
                          lowrank_rank=rank, shard_sizes=shards, per_shard_rotation=True, device_type=dev,
                          dtype=torch.float32)
        x = torch.randn(c.m, k, generator=gen).to(dev)
        bias = torch.randn(n, generator=gen).to(dev)
        ref_layer = torch.nn.Module()
        ref_kernel = TorchReferenceKernel(spec)
        ref_kernel.process_weights(ref_layer, w)
        ref = ref_kernel.apply(ref_layer, x, bias)
        outs = {}
        for lay in T.LAYOUTS:
            layout_mod.SERVED_LAYOUT = lay
            try:
                layer, kernel = torch.nn.Module(), TritonKernel(spec)
                kernel.process_weights(layer, w)
                outs[lay] = kernel.apply(layer, x, bias)
                chunked = layer.twla_packed.dim() == 4
            finally:
                layout_mod.SERVED_LAYOUT = served
            if chunked != (lay != "rows" and all(sz % T.ROW_CHUNK == 0 for sz in shards)):
                fails.append(f"shards {shards} {lay}: words kept {'in' if chunked else 'without'} row chunks")
        for lay, y in outs.items():
            if not torch.equal(y, outs[T.LAYOUTS[0]]):
                fails.append(f"shards {shards}: TritonKernel on {lay} differs from {T.LAYOUTS[0]}")
        # one-step activation flips of a transformed token: the GPU's single-pass TF32 transform flips more codes
        # than the reference's fp32 one, so the CUDA bound is check_case's single-pass 5e-2 (an H100 run measured
        # 2.4e-2, session 30); the interpreter's fp32 transform agrees to ~1e-7. A wrong shard or chunk is O(1).
        err = ((outs[served] - ref).abs().max() / ref.abs().max()).item()
        if err > (5e-2 if dev == "cuda" else 2e-2):
            fails.append(f"shards {shards}: TritonKernel vs reference kernel rel err {err:.2e}")
        fails += _fused_dispatch_check(spec, w, x[:1], bias)
    return fails


def _fused_dispatch_check(spec, w, x, bias) -> list[str]:
    """One token through the served op with `tiles.FUSED_GEMV_ON` (TWLA_FUSED_GEMV=1) and without, on the same
    layer less its branch: the op must take gemv_quant (once per shard) and give act_quant + GEMV's outputs (bit
    for bit in the interpreter; within check_case's single-pass bound compiled)."""
    import dataclasses

    from twla_vllm.kernels import TritonKernel
    from twla_vllm.kernels.triton_ops import tiles

    spec = dataclasses.replace(spec, lowrank_rank=0)
    w = dataclasses.replace(w, lowrank_a=None, lowrank_b=None)
    layer, kernel = torch.nn.Module(), TritonKernel(spec)
    kernel.process_weights(layer, w)
    calls = []
    fused, on = T.gemv_quant, tiles.FUSED_GEMV_ON
    T.gemv_quant = lambda *a, **k: calls.append(1) or fused(*a, **k)
    try:
        outs = []
        for flag in (False, True):
            tiles.FUSED_GEMV_ON = flag
            outs.append(kernel.apply(layer, x, bias))
    finally:
        T.gemv_quant, tiles.FUSED_GEMV_ON = fused, on
    if len(calls) != len(spec.shard_sizes):
        return [f"TWLA_FUSED_GEMV: gemv_quant ran {len(calls)} times for {len(spec.shard_sizes)} shards"]
    err = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
    if x.device.type == "cpu" and not torch.equal(outs[0], outs[1]) or err > 5e-2:
        return [f"TWLA_FUSED_GEMV: the one-launch layer differs from the two-launch one (rel {err:.2e})"]
    return []


def rule_check(dev, gen) -> list[str]:
    """`quant_matmul` with each launch rule overridden the other way (`pdl`, `late_sum`; at decode sizes also the
    GEMV's tile) against the rules, at sizes where the rule is on and where it is off: equal bit for bit, since the
    integer sums are exact and only their order and the launch differ."""
    fails = []
    for code_name, gs, m in (("binary", 128, 4), ("ternary", 32, 8), ("int4", 128, 1), ("ternary", 32, 24),
                             ("binary", 128, 40), ("int4", 64, 12)):
        c = Case(m, 40, 512, gs=gs, code=code_name, rot=False)
        code, codes, qa, qm, row_scale = random_layer(c, gen, dev)
        w_int = fmt.int_weights(codes, qa, qm, code)
        q = torch.randint(-8, 8, (m, c.k), generator=gen, dtype=torch.int8).to(dev)
        s, z = torch.rand(m, 1, generator=gen).to(dev), torch.randint(-8, 8, (m, 1), generator=gen).float().to(dev)
        args = (q, s, z, fmt.pack_codes(codes, code).to(dev), row_scale.to(dev), qa.to(dev), qm.to(dev),
                block_row_sums(w_int, 1).to(dev), code.bits, code.step, code.offset, gs, torch.bfloat16)
        ruled = T.quant_matmul(*args)
        overrides = [("pdl", not T.use_pdl(m, 1)), ("late_sum", not T.gemv_late_sum(m, gs))]
        if m <= T.GEMV_MAX_M:  # the GEMV's tile of the benchmarks' sweep: 256-word chunks on 1 warp, 16 rows on 4
            overrides += [("gemv_tile", (4, 256, 1)), ("gemv_tile", (16, 64, 4))]
        for key, flipped in overrides:
            if not torch.equal(T.quant_matmul(*args, **{key: flipped}), ruled):
                fails.append(f"{code_name} g{gs} M={m}: {key}={flipped} changes the output")
    return fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--seeds", type=int, default=1, help="repeat every case with this many fresh seeds")
    ap.add_argument("--quick", action="store_true",
                    help="--gpu: only the serving shapes (M = 1..300, every code; M = 1 also through gemv_quant), "
                         "down_proj at M = 1, the layout and left-first cases (~1/4 of the time; the whole check "
                         "stays the bar)")
    a = ap.parse_args()
    dev = "cuda" if a.gpu else "cpu"
    cases = CPU_CASES + (gpu_cases() if a.gpu else [])
    if a.quick:
        serving = gpu_cases()[:15]  # M = 1..300 on 4096x4096, every code
        down_1 = Case(1, 4096, 14336, gs=32, kb=8, dtype=torch.bfloat16)  # gemv_quant over 8 blocks
        cases = [c for c in cases if c.n == 4096 and (c.layout or c.left_first) or c in serving or c == down_1]
    bad = total = 0
    for _ in range(a.seeds):
        seed = int.from_bytes(os.urandom(4), "little")
        gen = torch.Generator().manual_seed(seed)
        for c in cases:
            fails = check_case(c, dev, gen)
            bad += bool(fails)
            total += 1
            print(f"{'FAIL' if fails else 'ok  '} seed={seed} {c} {'; '.join(fails)}", flush=True)
        fails = rule_check(dev, gen)
        bad += bool(fails)
        total += 1
        print(f"{'FAIL' if fails else 'ok  '} seed={seed} launch rules overridden {'; '.join(fails)}", flush=True)
        fails = linear_check(dev, gen)
        bad += bool(fails)
        total += 1
        print(f"{'FAIL' if fails else 'ok  '} seed={seed} TritonKernel layer in every layout {'; '.join(fails)}",
              flush=True)
        if a.gpu:
            opcheck(dev, gen)
            print("ok   opcheck quant_linear")
    print(f"{total - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
