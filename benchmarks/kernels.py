"""Kernel benchmark (CUDA): TWLA transform+quantize and the packed-code GEMV/GEMM (format v2) against cuBLAS
bf16, fp8 and torch._int_mm, same run, same shapes (Llama-3-8B linears, K -> N).

    python benchmarks/kernels.py [--group-size 32] [--code ternary] [--json benchmarks/results/kernels.json]
    python benchmarks/kernels.py --sweep      # also time alternative tensor-core tiles and the int8 scratch path
    python benchmarks/kernels.py --act-quant  # transform precision: time and code agreement with float64
    python benchmarks/kernels.py --act-quant-sweep --ms 16,64,128,256,512,2048,8192   # act_quant tokens/program
    python benchmarks/kernels.py --code int4 --group-size 128 --lowrank 32   # + the low-rank branch, fused or not
    python benchmarks/kernels.py --code binary --group-size 128 --lowrank 16 --lowrank-sweep --ms 1,8  # x·Bᵀ launch
    python benchmarks/kernels.py --act-group-size 128   # + the op with activation ranges of ~128 channels

Timing as served: CUDA graphs (triton.testing.do_bench_cudagraph, median), and each timed call cycles through
enough copies of the layer's weights (> 128 MB) that they stream from HBM, not from the 50 MB L2, as
consecutive layers of a model do.

Columns: quant = fused transform+quantize alone; gemm = the matmul alone; twla = the whole op as served
(`torch.ops.twla.quant_linear`: quant + matmul + epilogue); floor% = byte floor (codes + int8 group scales at
the measured copy bandwidth) / twla for M <= 64, else the int8 tensor-core floor (1.1 POPS, kernels.md) / twla.
With --lowrank R: + branch = the whole op with a rank-R 16-bit branch as served; fused / unfused = the same with
x·Bᵀ computed in act_quant's launch (what the op does) / as its own fp32 GEMM (A·(·) in the matmul's epilogue
either way); quant = act_quant with the branch's x·Bᵀ programs in its launch (against the quant column: what
the branch adds before the matmul); GEMM unsplit (M = 9..255, one K-block) = the op without / with the branch, the
packed GEMM forced to one K-split so that the branch is added in its own epilogue; B fp32 = the op with the branch's
B in fp32 (three TF32 passes: the form before session 25); pre-sum on / off = the op with the branch's partials
summed before the matmul the other way from `tiles.lowrank_presum`.
GEMM on resident int8 (M > 8) = the scratch GEMM on an int8 copy of the weights unpacked beforehand: what keeping
one resident (1 byte/weight more) would buy against the gemm column.
Layouts: every column reads the weights as TritonKernel keeps them (`triton_ops.SERVED_LAYOUT`); gemm on <layout>
= the matmul alone (GEMV, GEMM or scratch unpack + GEMM, as the rule picks) on each other `triton_ops.LAYOUTS`
layout (8-row x VW-word chunks with N-major scales; the same with one word; row-major), checked bit for bit
against the gemm column (KERNEL_NOTES v27, v28).
The launch rules flipped, each checked bit for bit against the op: PDL on / off (sm_90+): the whole op with
programmatic dependent launch the other way from `tiles.use_pdl` (on at M <= 8, and at M = 9..255 with one
K-block); late sums on / off (M = 2..8): the GEMV summing its words after the K loop the other way from
`tiles.gemv_late_sum` (on at M = 5..8 for groups of >= 128 weights).
One launch (M = 1): the whole op as one `gemv_quant` launch (act_quant in the GEMV's prologue, a persistent grid;
TWLA_FUSED_GEMV=1 serves it), checked against the op; with --sweep also its tiles and programs per SM (FUSED_SWEEP).
With --act-group-size G: + ranges = the whole op with activation ranges of about G channels (twla-quantize
--act-group-size G picks the same count: offline.layout.pick_act_blocks) instead of one per transform block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import twla_vllm.ops  # noqa: E402,F401
from twla_vllm import format as fmt  # noqa: E402
from twla_vllm.kernels import triton_ops as T  # noqa: E402
from twla_vllm.kernels.triton_ops.tiles import LOWRANK_FMA_PRODUCTS, lowrank_splits, lowrank_tile  # noqa: E402
from twla_vllm.reference import block_row_sums, kron_rotate, quantize_per_token  # noqa: E402
from twla_offline.layout import pick_act_blocks  # noqa: E402
from kernel_sweeps import FUSED_SWEEP, SWEEP  # noqa: E402  (benchmarks/, the script's own folder)

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


def orth(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, device="cuda"))
    return q.contiguous()


def transform_factors(k: int, kb: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """The serving config's Kronecker factors for input width k: (n1, n2, block-diagonal left, right)."""
    n1, n2 = FACTORS[k]
    return n1, n2, torch.block_diag(*[orth(n1 // kb) for _ in range(kb)]).contiguous(), orth(n2)


def random_layer(n: int, k: int, gs: int, code: fmt.WeightCode):
    c = torch.randint(0, code.num_codes, (n, k), dtype=torch.int32)
    g = fmt.num_groups(k, gs)
    qa = torch.randint(1, 127 // max(code.vmax, -code.vmin) + 1, (n, g), dtype=torch.int8)
    qm = torch.zeros(n, g, dtype=torch.int8)
    w_int = fmt.int_weights(c, qa, qm, code)
    return (fmt.pack_codes(c, code).cuda(), (torch.rand(n) * 1e-3).half().cuda(), qa.cuda(), qm.cuda(), w_int)


def laid_out(packed, rs, qa, qm, rsum, code: fmt.WeightCode, gs: int, layout: str = "") -> tuple:
    """One weight copy (packed, row scale, qa, qm, row sums) in a `triton_ops.resident` layout (served: as
    TritonKernel keeps it, "")."""
    packed, qa, qm = T.resident(packed, qa, qm, code.bits, gs, layout)
    return packed, rs, qa, qm, rsum


def act_quant_table() -> None:
    """Transform precision at serving sizes: µs and fraction of codes equal to a float64 transform."""
    print("\n| factors | K-blocks | M | precision | µs | codes equal to float64 |\n|---|---|---|---|---|---|")
    for k, kb in ((4096, 1), (14336, 8)):
        n1, n2, left, right = transform_factors(k, kb)
        for m in (1, 64, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * (1 + 3 * torch.rand(k, device="cuda"))
            want, _, _ = quantize_per_token(kron_rotate(x.double(), left.double(), right.double()).float(), 4, 0.9, kb)
            for prec in ("tf32x3", "tf32", "bf16"):
                us = bench(lambda i: T.act_quant(x, left, right, 4, 0.9, kb, prec))
                q = T.act_quant(x, left, right, 4, 0.9, kb, prec)[0]
                agree = (q.float() == want).float().mean().item()
                print(f"| {n1}x{n2} | {kb} | {m} | {prec} | {us:.1f} | {agree:.5f} |", flush=True)


def act_quant_sweep(ms: list[int]) -> None:
    """act_quant's tokens per program: the launch rule (`tiles.tokens_per_program`) against fixed values, TF32
    transform, default warps ("/8w": 8), the left factor applied first ("L": one token permute, KERNEL_NOTES v30);
    codes compared with one token per program in the same factor order."""
    print("\n| factors | K-blocks | M | µs by tokens per program (!: a code differs from bt=1) |\n|---|---|---|---|")
    for k, kb in ((14336, 8), (4096, 1)):
        n1, n2, left, right = transform_factors(k, kb)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = {lf: T.act_quant(x, left, right, 4, 0.9, kb, bt=1, left_first=lf)[0] for lf in (False, True)}
            cells = []
            for bt, warps, lf in ((None, None, False), (None, None, True), (1, None, False), (1, None, True),
                                  (1, 8, False), (2, None, False), (2, None, True), (4, None, False),
                                  (8, None, False), (8, None, True), (8, 8, False), (8, 8, True)):
                kw = dict(bt=bt, warps=warps, left_first=lf)
                label = f"{'rule' if bt is None else bt}{f'/{warps}w' if warps else ''}{'L' if lf else ''}"
                try:
                    same = torch.equal(T.act_quant(x, left, right, 4, 0.9, kb, **kw)[0], want[lf])
                    us = bench(lambda i: T.act_quant(x, left, right, 4, 0.9, kb, **kw))
                    cells.append(f"{label}: {us:.1f}{'' if same else '!'}")
                except Exception as e:  # noqa: BLE001 - a setting that does not compile is a result too
                    cells.append(f"{label}: {type(e).__name__}")
            print(f"| {n1}x{n2} | {kb} | {m} | {' / '.join(cells)} |", flush=True)


def random_branches(n: int, k: int, rank: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`copies` rank-`rank` branches (A fp16 [n, rank], B fp16 [rank, k], as served)."""
    return [((torch.randn(n, rank, device="cuda") * 0.05).half(), (torch.randn(rank, k, device="cuda") * 0.05).half())
            for _ in range(copies)]


def flipped_rules(m: int, kb: int, group_weights: int, gdc: bool) -> list[tuple[str, dict]]:
    """(column, `quant_matmul` options) of the launch rules flipped at this M and K-block count: PDL (sm_90+), at
    M = 2..8 the GEMV's late sums."""
    out = [("pdl_flipped_us", dict(pdl=not T.use_pdl(m, kb)))] if gdc else []
    if 1 < m <= T.GEMV_MAX_M:
        out.append(("late_sum_flipped_us", dict(late_sum=not T.gemv_late_sum(m, group_weights))))
    return out


def branch_op(x, layers, branch_ab, left, right, kb, code, gs, fuse: bool = True, split=None, gemm_split=None,
              branch: bool = True, presum=None):
    """op(i): the whole op on weight copy i with its low-rank branch, x·Bᵀ computed in act_quant's launch (fuse;
    `split` = (K-chunks, K step) overrides its launch rule) or as its own fp32 GEMM; A·(·) in the matmul's epilogue
    either way. `gemm_split`, `presum` override the GEMM's K-splits and the partials' pre-sum; branch=False: the
    same op without the branch."""
    n = T.packed_rows(layers[0][0])

    def call(i):
        p, rs, qa, qm, rsum = layers[i]
        la, lb = branch_ab[i] if branch else (None, None)
        q, s, z, lr = T.act_quant(x, left, right, 4, 0.9, kb, lowrank_b=lb if fuse else None,
                                  lowrank_split=split)
        if branch and not fuse:
            lr = x.float() @ lb.float().t()
        return T.quant_matmul(q, s, z, p, rs, qa, qm, rsum, code.bits, code.step, code.offset, gs, x.dtype, la, lr,
                              None, (n, n), split=gemm_split, presum=presum)
    return call


def branch_times(x, layers, branch_ab, left, right, kb, code, gs, copies) -> dict[str, float]:
    """The whole op with a low-rank branch as served, its two forms (`branch_op`, fused and not), act_quant with
    the branch's programs, the op with B in fp32 (three TF32 passes: the form before session 25) and with the
    partials' pre-sum flipped (`tiles.lowrank_presum`), and at M = 9..255 the op with the packed GEMM unsplit,
    without and with the branch."""
    n = T.packed_rows(layers[0][0])
    fused, unfused = (branch_op(x, layers, branch_ab, left, right, kb, code, gs, fuse) for fuse in (True, False))
    m = x.shape[0]
    partials = kb * lowrank_split_rule(m, x.shape[1], kb, branch_ab[0][1].shape[0])[0]
    presum_flipped = branch_op(x, layers, branch_ab, left, right, kb, code, gs,
                               presum=not T.lowrank_presum(m, partials))

    def served(i, b32=False):
        p, rs, qa, qm, rsum = layers[i]
        la, lb = branch_ab[i]
        lb = lb.float() if b32 else lb
        return torch.ops.twla.quant_linear(x, p, rs, qa, qm, rsum, left, right, la, lb, None, code.bits, code.step,
                                           code.offset, gs, 4, 0.9, kb, kb, n, n)

    want = unfused(0).float()
    for f in (fused, served, lambda i: served(i, b32=True), presum_flipped):
        if not torch.allclose(f(0).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max()):
            raise AssertionError("the low-rank branch's forms disagree")
    times = {"branch_us": bench(served, copies), "branch_fused_us": bench(fused, copies),
             "branch_unfused_us": bench(unfused, copies),
             "branch_b32_us": bench(lambda i: served(i, b32=True), copies), "partials": partials,
             "branch_presum_flipped_us": bench(presum_flipped, copies),
             # act_quant with the branch's x·Bᵀ programs in its launch: the quant column's op plus the branch
             "quant_branch_us": bench(lambda i: T.act_quant(x, left, right, 4, 0.9, kb, lowrank_b=branch_ab[i][1]),
                                      copies)}
    if T.GEMV_MAX_M < m and not T.uses_scratch(m) and kb == 1:
        # the packed GEMM unsplit, so the branch is added in its own epilogue instead of `_epilogue_kernel`'s
        # (where the branch's cost sits at M = 16..255: KERNEL_NOTES v19)
        unsplit = branch_op(x, layers, branch_ab, left, right, kb, code, gs, gemm_split=1)
        if not torch.allclose(unsplit(0).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max()):
            raise AssertionError("the unsplit GEMM's branch disagrees")
        times["unsplit_us"] = bench(branch_op(x, layers, branch_ab, left, right, kb, code, gs, gemm_split=1,
                                              branch=False), copies)
        times["branch_unsplit_us"] = bench(unsplit, copies)
    return times


def one_launch_times(x, layers, left, right, kb, code, gs, copies, served, sweep: bool) -> dict[str, float]:
    """The op at M = 1 as one `gemv_quant` launch (tiles.FUSED_GEMV), checked against the served op `served` within
    single-pass transform flips (its transform runs at another warp count), and with --sweep its other launches."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def fused(i, **kw):
        p, rs, qa, qm, rsum = layers[i]
        return T.gemv_quant(x, left, right, 4, 0.9, kb, kb, p, rs, qa, qm, rsum, code.bits, code.step, code.offset,
                            gs, **kw)

    out = {}
    for tile, per_sm in [(None, None)] + (FUSED_SWEEP if sweep else []):
        kw = {} if tile is None else dict(tile=tile, programs=max(1, per_sm * sms // kb))
        y = fused(0, **kw).float()
        if not torch.allclose(y, served.float(), rtol=1e-2, atol=1e-2 * served.float().abs().max().item()):
            raise AssertionError(f"gemv_quant {kw} differs from the served op")
        us = bench(lambda i: fused(i, **kw), copies)
        out["one_launch_us" if tile is None else f"one_launch_{tile[0]}x{tile[1]}_{tile[2]}w_{per_sm}sm_us"] = us
        if tile is not None:
            print(f"  gemv_quant tile {tile}, {per_sm} programs/SM: {us:.1f} us", flush=True)
    return out


def lowrank_sweep(code, gs: int, rank: int, ms: list[int]) -> list[dict]:
    """The branch's x·Bᵀ launch in act_quant (KERNEL_NOTES v11-v12): the whole op with a rank-`rank` branch by
    (K-chunks per K-block, K step per program), against the launch rule and the separate fp32 GEMM; `!` marks a
    setting whose output differs from the rule's by more than 1e-2 relative (its row value is then null)."""
    print("\n| K->N | K-blocks | M | µs: rule / own GEMM / (chunks, step) |\n|---|---|---|---|")
    rows = []
    for k, n in SHAPES:
        kb = K_BLOCKS[k]
        _, _, left, right = transform_factors(k, kb)
        c = n_copies(n * k * code.bits // 8 + 2 * n * fmt.num_groups(k, gs))
        layers = []
        for _ in range(c):
            packed, rs, qa, qm, w_int = random_layer(n, k, gs, code)
            layers.append(laid_out(packed, rs, qa, qm, block_row_sums(w_int, kb).cuda(), code, gs))
        branch_ab = random_branches(n, k, rank, c)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            args = (x, layers, branch_ab, left, right, kb, code, gs)
            want = branch_op(*args)(0).float()
            row = dict(k=k, n=n, k_blocks=kb, m=m, rule_splits=list(lowrank_split_rule(m, k, kb, rank)),
                       rule_us=bench(branch_op(*args), c), gemm_us=bench(branch_op(*args, fuse=False), c), splits={})
            cells = [f"rule {row['rule_us']:.1f}", f"gemm {row['gemm_us']:.1f}"]
            btl, jb, _, dot = lowrank_tile(m, rank)
            for ks in (1, 2, 4, 8, 16, 32):
                for step in (64, 128, 256, 512):
                    if ((k // kb) % ks or step > 2 * (k // kb // ks)
                            or (not dot and btl * jb * step > LOWRANK_FMA_PRODUCTS)):
                        continue  # chunks must tile the block; a larger multiply-add tile would spill
                    op = branch_op(*args, split=(ks, step))
                    try:
                        ok = torch.allclose(op(0).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max())
                        us = bench(op, c)
                        cells.append(f"({ks}, {step}) {us:.1f}{'' if ok else '!'}")
                        row["splits"][f"{ks},{step}"] = us if ok else None
                    except Exception as e:  # noqa: BLE001 - a setting that does not compile is a result too
                        cells.append(f"({ks}, {step}) {type(e).__name__}")
                        row["splits"][f"{ks},{step}"] = None
            print(f"| {k}->{n} | {kb} | {m} | {' / '.join(cells)} |", flush=True)
            rows.append(row)
    return rows


def lowrank_split_rule(m: int, k: int, kb: int, rank: int) -> tuple[int, int]:
    """(K-chunks, K step) the launch rules pick for a rank-`rank` branch (tiles.lowrank_splits / lowrank_tile)."""
    return lowrank_splits(m, k, kb, rank), lowrank_tile(m, rank)[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=32, help="weight group along K; -1 = per row")
    ap.add_argument("--code", default="ternary", choices=sorted(fmt.CODES))
    ap.add_argument("--sweep", action="store_true",
                    help="time alternative tensor-core tiles and unpack paths (M in SWEEP; see SWEEP)")
    ap.add_argument("--act-quant", action="store_true", help="transform precision table")
    ap.add_argument("--act-quant-sweep", action="store_true", help="act_quant tokens-per-program table (--ms)")
    ap.add_argument("--lowrank", type=int, default=0, help="also time the op with a rank-R branch, fused and not")
    ap.add_argument("--lowrank-sweep", action="store_true",
                    help="the branch's x·Bᵀ launch by (K-chunks, K step) for --lowrank R at --ms, then stop")
    ap.add_argument("--act-group-size", type=int, default=0,
                    help="also time the op with activation ranges of about this many channels")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}:{n}" for k, n in SHAPES), help="K:N,... (default: all three)")
    ap.add_argument("--row-blocks", type=int, default=K_BLOCKS[14336],
                    help="activation K-blocks of the 14336-wide input (1: a TP-1-only checkpoint, serve.py's +tp1)")
    ap.add_argument("--json", help="write the rows here (benchmarks/results schema)")
    a = ap.parse_args()
    K_BLOCKS[14336] = a.row_blocks  # read by every table below
    gs, code = a.group_size, fmt.CODES[a.code]
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, {code.name} group {gs}")
    if a.lowrank_sweep:
        rows = lowrank_sweep(code, gs, a.lowrank or 16, list(map(int, a.ms.split(","))))
        if a.json:
            write_json(a, code, rows)
        return
    if a.act_quant:
        act_quant_table()
    if a.act_quant_sweep:
        act_quant_sweep(list(map(int, a.ms.split(","))))
    rows, sweep = [], []
    for k, n in (tuple(map(int, sh.split(":"))) for sh in a.shapes.split(",")):
        kb = K_BLOCKS[k]
        ab = pick_act_blocks(k, FACTORS[k][0], kb, gs, a.act_group_size)  # 0: this shape has no finer ranges
        g = fmt.num_groups(k, gs)
        nbytes = n * k * code.bits // 8 + 2 * n * g
        c = n_copies(nbytes)
        layers, range_sums = [], []
        branch_ab = random_branches(n, k, a.lowrank, c) if a.lowrank else []
        layouts = {lay: [] for lay in T.LAYOUTS if lay != T.SERVED_LAYOUT}  # the same copies in the other layouts
        for _ in range(c):
            packed, rs, qa, qm, w_int = random_layer(n, k, gs, code)
            rsum = block_row_sums(w_int, kb).cuda()
            layers.append(laid_out(packed, rs, qa, qm, rsum, code, gs))
            for name, copies in layouts.items():
                copies.append(laid_out(packed, rs, qa, qm, rsum, code, gs, name))
            if ab:
                range_sums.append(block_row_sums(w_int, ab).cuda())
        _, _, left, right = transform_factors(k, kb)
        c16, c8 = n_copies(2 * n * k), n_copies(n * k)
        w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(c16)]
        w_i8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(c8)]
        w_f8 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn) for _ in range(c8)]
        one = torch.ones((), device="cuda")
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z, _ = T.act_quant(x, left, right, 4, 0.9, kb)
            group = k if gs == -1 else gs
            variants = {"group_weights": group}  # the op with its launch rules flipped, each checked equal to it

            def mm(i, layout=None, **kw):  # layout: this copy in `layouts[layout]` instead of SERVED_LAYOUT
                p, rs, qa, qm, rsum = layers[i] if layout is None else layouts[layout][i]
                return T.quant_matmul(q, s, z, p, rs, qa, qm, rsum, code.bits, code.step, code.offset, gs,
                                      torch.bfloat16, **kw)

            def op(i, ranges=False):
                p, rs, qa, qm, rsum = layers[i]
                return torch.ops.twla.quant_linear(x, p, rs, qa, qm, range_sums[i] if ranges else rsum, left, right,
                                                   None, None, None, code.bits, code.step, code.offset, gs, 4, 0.9,
                                                   kb, ab if ranges else kb, n, n)

            def op_with(i, **options):  # the op's two launches with quant_matmul `options`
                p, rs, qa, qm, rsum = layers[i]
                qi, si, zi, _ = T.act_quant(x, left, right, 4, 0.9, kb)
                return T.quant_matmul(qi, si, zi, p, rs, qa, qm, rsum, code.bits, code.step, code.offset, gs,
                                      torch.bfloat16, **options)

            if m > T.GEMV_MAX_M:  # the scratch GEMM on a resident int8 copy: what keeping one would buy
                resident = [T.unpack_weights(p, qa, qm, code.bits, code.step, code.offset, gs)
                            for p, _, qa, qm, _ in layers]
                base = mm(0).float()
                if not torch.allclose(mm(0, scratch=True, unpacked=resident[0]).float(), base, rtol=1e-2,
                                      atol=1e-3 * base.abs().max().item()):
                    raise AssertionError("the scratch GEMM on resident int8 weights differs")
                variants["resident_int8_gemm_us"] = bench(lambda i: mm(i, scratch=True, unpacked=resident[i]), c)
                del resident
            for name in layouts:  # the matmul on the other layouts, equal bit for bit
                if not torch.equal(mm(0, name), mm(0)):
                    raise AssertionError(f"the matmul on the {name} layout differs")
                variants[f"{name}_layout_gemm_us"] = bench(lambda i: mm(i, name), c)
            t_quant = bench(lambda i: T.act_quant(x, left, right, 4, 0.9, kb))
            branch = branch_times(x, layers, branch_ab, left, right, kb, code, gs, c) if a.lowrank else {}
            t_gemm = bench(mm, c)
            t_all = bench(op, c)
            for key, options in flipped_rules(m, kb, group, T.gdc(x.device)):
                if not torch.equal(op_with(0, **options), op(0)):
                    raise AssertionError(f"{key}: the op with {options} differs from the served op")
                variants[key] = bench(lambda i: op_with(i, **options), c)
            if m == 1:  # act_quant in the GEMV's prologue (gemv_quant, KERNEL_NOTES v31): the op in one launch
                variants.update(one_launch_times(x, layers, left, right, kb, code, gs, c, op(0), a.sweep))
            ranges = {"act_blocks": ab, "act_ranges_us": bench(lambda i: op(i, ranges=True), c)} if ab else {}
            t_bf16 = bench(lambda i: x @ w_bf16[i].t(), c16)
            xq = x.to(torch.float8_e4m3fn)
            t_fp8 = bench(lambda i: torch._scaled_mm(xq, w_f8[i].t(), one, one, out_dtype=torch.bfloat16), c8) \
                if m >= 16 else float("nan")
            t_int = bench(lambda i: torch._int_mm(q, w_i8[i].t()), c8) if m > 16 else float("nan")
            if a.sweep and m in SWEEP and ((k, n) == (4096, 14336) or m in (1, 64) or kb > 1):
                base = mm(0)
                for kw in SWEEP[m]:
                    if kb > 1 and kw.get("split", kb) not in (1, kb):  # one split per K-block (tiles.gemm_split)
                        continue
                    try:
                        kw = {"scratch": False, **kw} if "gemv_tile" not in kw else kw
                        ok = torch.allclose(mm(0, **kw).float(), base.float(), rtol=1e-2,
                                            atol=1e-3 * base.float().abs().max().item())
                        us = bench(lambda i: mm(i, **kw), c)
                    except Exception as e:  # noqa: BLE001 - a setting that does not compile is a result too
                        us, ok = float("nan"), False
                        print(f"  {kw}: {type(e).__name__}: {str(e)[:160]}")
                    sweep.append((k, n, m, kw, ok, us))
                    print(f"  sweep {k}->{n} M={m} {kw}: {us:.1f} us{'' if ok else ' NOT EQUAL'}", flush=True)
            floor = nbytes / bw * 1e6 if m <= 64 else 2 * m * n * k / 1.1e15 * 1e6
            rows.append(dict(k=k, n=n, m=m, quant_us=t_quant, gemm_us=t_gemm, twla_us=t_all, bf16_us=t_bf16,
                             fp8_us=None if t_fp8 != t_fp8 else t_fp8, int_mm_us=None if t_int != t_int else t_int,
                             floor_pct=100 * floor / t_all, **variants, **branch, **ranges))
            print(f"{k}->{n} M={m}: twla {t_all:.1f} us (quant {t_quant:.1f}, gemm {t_gemm:.1f}), bf16 {t_bf16:.1f} us",
                  flush=True)
    if sweep:
        print("\n| K->N | M | scratch | tile (BM,BN,BK,warps,stages) or GEMV (BN,BP,warps) | split | equal | µs |")
        print("|---|---|---|---|---|---|---|")
        for k, n, m, kw, ok, us in sweep:
            tile = kw["tile"] if "tile" in kw else f"GEMV {kw['gemv_tile']}"
            print(f"| {k}->{n} | {m} | {kw.get('scratch', False)} | {tile} | "
                  f"{kw.get('split', 'rule')} | {ok} | {us:.1f} |")
    print(f"\n{code.name}, group size {gs}\n| K->N | M | quant µs | gemm µs | twla µs | bf16 µs | fp8 µs | _int_mm µs "
          f"| bf16/twla | floor % |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        extra = (f" + branch {r['branch_us']:.1f} µs (quant {r['quant_branch_us']:.1f}, fused "
                 f"{r['branch_fused_us']:.1f}, unfused {r['branch_unfused_us']:.1f}"
                 + f"; B fp32 {r['branch_b32_us']:.1f}; {r['partials']} partials, pre-sum "
                 f"{'off' if T.lowrank_presum(r['m'], r['partials']) else 'on'} {r['branch_presum_flipped_us']:.1f}"
                 + (f"; GEMM unsplit {r['unsplit_us']:.1f} / + branch {r['branch_unsplit_us']:.1f}"
                    if "unsplit_us" in r else "")
                 + ") |" if "branch_fused_us" in r else "")
        extra += f" + {r['act_blocks']} ranges {r['act_ranges_us']:.1f} µs |" if "act_ranges_us" in r else ""
        on_off = lambda rule: "off" if rule else "on"  # noqa: E731
        extra += f" GEMM on resident int8 {r['resident_int8_gemm_us']:.1f} µs |" if "resident_int8_gemm_us" in r else ""
        extra += "".join(f" gemm on {lay} {r[f'{lay}_layout_gemm_us']:.1f} µs |" for lay in T.LAYOUTS
                         if f"{lay}_layout_gemm_us" in r)
        extra += (f" PDL {on_off(T.use_pdl(r['m'], K_BLOCKS[r['k']]))} {r['pdl_flipped_us']:.1f} µs |"
                  if "pdl_flipped_us" in r else "")
        extra += f" one launch {r['one_launch_us']:.1f} µs |" if "one_launch_us" in r else ""
        extra += (f" late sums {on_off(T.gemv_late_sum(r['m'], r['group_weights']))} {r['late_sum_flipped_us']:.1f}"
                  f" µs |" if "late_sum_flipped_us" in r else "")
        print(f"| {r['k']}->{r['n']} | {r['m']} | {r['quant_us']:.1f} | {r['gemm_us']:.1f} | {r['twla_us']:.1f} | "
              f"{r['bf16_us']:.1f} | {f(r['fp8_us'])} | {f(r['int_mm_us'])} | {r['bf16_us'] / r['twla_us']:.2f}x | "
              f"{r['floor_pct']:.0f}% |{extra}")
    if a.json:
        write_json(a, code, rows)


def write_json(a: argparse.Namespace, code, rows: list[dict]) -> None:
    with open(a.json, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                   "command": "python " + " ".join(sys.argv), "code": code.name, "group_size": a.group_size,
                   "lowrank_rank": a.lowrank, "act_group_size": a.act_group_size, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
