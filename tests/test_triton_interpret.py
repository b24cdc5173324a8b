"""Triton kernels on the CPU: every kernel vs the torch reference under the interpreter (odd shapes), and every
kernel compiled for the H100 (sm_90 PTX + ptxas) without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from twla_vllm.kernels.triton_ops.act_quant import lowrank_dot_precision
from twla_vllm.kernels.triton_ops.pdl import gdc, launch_options
from twla_vllm.kernels.triton_ops.tiles import (LOWRANK_DOT_MIN_CHUNK, LOWRANK_FMA_PRODUCTS, LOWRANK_MAX_SPLITS,
                                                LOWRANK_MIN_PROGRAMS, MIN_PROGRAMS, lowrank_presum, lowrank_splits,
                                                lowrank_tile, tokens_per_program, use_pdl)

from .helpers import REPO
from .triton_check import CPU_CASES
from .triton_compile_check import VARIANTS


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before the kernels are defined: fresh process
    proc = subprocess.run([sys.executable, "-m", "tests.triton_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # + the launch rules overridden + the TritonKernel layer in every weight layout
    assert f"{len(CPU_CASES) + 2} passed, 0 failed" in proc.stdout


def test_triton_kernels_compile_for_the_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real code generation
    proc = subprocess.run([sys.executable, "-m", "tests.triton_compile_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert f"{len(VARIANTS)} compiled, 0 failed" in proc.stdout


def test_lane_planar_gemm_experiment_is_exact_in_interpreter():
    """benchmarks/gemm_layout_experiment.py (a measured, not served, layout) against exact int64 products."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/gemm_layout_experiment.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 4 and "WRONG" not in proc.stdout


def test_act_quant_tokens_per_program_picks_the_measured_best():
    """The launch rule against the H100 table in RESULTS.md (session 12): down_proj's 112x128 transform in 8
    K-blocks ([16, 128] per block) and a 64x64 transform; the grid never drops below MIN_PROGRAMS programs once
    tokens are stacked."""
    down = {16: 1, 64: 2, 128: 2, 256: 8, 512: 8, 2048: 8, 8192: 8}
    square = {16: 1, 64: 1, 128: 1, 256: 1, 512: 2, 2048: 2, 8192: 2}
    assert {m: tokens_per_program(m, 8, 16, 128, True) for m in down} == down
    assert {m: tokens_per_program(m, 1, 64, 64, True) for m in square} == square
    for m in range(1, 3000, 7):
        bt = tokens_per_program(m, 8, 16, 128, True)
        assert bt == 1 or m * 8 // bt >= MIN_PROGRAMS


def test_lowrank_branch_launch_rules_follow_the_h100_table():
    """x·Bᵀ's launch (KERNEL_NOTES v12): at the H100 sweep's shapes (binary g128 rank 16) the rules pick the
    sweep's fastest (K-chunks, K step) or one within 0.1 µs of it; elsewhere whole chunks of at least one K step
    (tensor-core path: LOWRANK_DOT_MIN_CHUNK), at most LOWRANK_MAX_SPLITS per K-block, split only while the branch
    has fewer than LOWRANK_MIN_PROGRAMS programs, and multiply-add tiles of <= LOWRANK_FMA_PRODUCTS."""
    swept = {(1, 4096, 1): (8, 512), (1, 14336, 8): (2, 512), (8, 4096, 1): (32, 128), (8, 14336, 8): (8, 128)}
    assert {key: (lowrank_splits(*key, 16), lowrank_tile(key[0], 16)[2]) for key in swept} == swept
    assert lowrank_splits(2048, 4096, 1, 16) == 4
    for m in (1, 3, 8, 9, 64, 300, 2048):
        for k, kb in ((576, 1), (4096, 1), (4096, 8), (14336, 1), (14336, 8), (8960, 8)):
            for sr in (16, 48, 96):
                ks = lowrank_splits(m, k, kb, sr)
                btl, jb, bkl, dot = lowrank_tile(m, sr)
                chunk = k // kb // ks
                assert (k // kb) % ks == 0 and 1 <= ks <= LOWRANK_MAX_SPLITS
                assert ks == 1 or chunk >= (LOWRANK_DOT_MIN_CHUNK if dot else bkl)
                assert dot or btl * jb * bkl <= LOWRANK_FMA_PRODUCTS
                programs = -(-m // btl) * -(-sr // jb) * kb
                assert ks == 1 or programs * ks // 2 < LOWRANK_MIN_PROGRAMS  # never split past the target


def test_one_tf32_pass_is_exact_for_16bit_branch_operands():
    """The branch's x·Bᵀ runs one TF32 pass where x and B are 16-bit (`lowrank_dot_precision`): TF32 keeps 10 of
    fp32's 23 mantissa bits, so a value is exact in it iff its low 13 bits are zero, which holds for every fp16 and
    bf16 value (subnormals and the largest included), and their products (<= 22 significant bits) are exact in
    fp32."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        v = bits.view(dtype).float()
        v = v[torch.isfinite(v)]
        assert not (v.view(torch.int32) & 0x1FFF).any(), dtype
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=gen) * 30).to(torch.bfloat16).double()
    b = (torch.randn(4096, generator=gen) * 0.05).half().double()
    assert torch.equal((x * b).float().double(), x * b)  # every product exact in fp32
    assert lowrank_dot_precision(torch.bfloat16, torch.float16, cuda=True) == "tf32"
    assert lowrank_dot_precision(torch.float16, torch.float16, cuda=True) == "tf32"
    assert lowrank_dot_precision(torch.float32, torch.float16, cuda=True) == "tf32x3"  # fp32 x needs three passes
    assert lowrank_dot_precision(torch.bfloat16, torch.float16, cuda=False) == "ieee"


def test_pdl_and_presum_rules_follow_the_h100_tables():
    """`use_pdl`: GEMV sizes, and GEMMs of 9..255 tokens with one activation K-block (off with 8 blocks and on the
    scratch path); `lowrank_presum`: the tensor-core paths (M > 8), or from 64 partials (KERNEL_NOTES v22-v23)."""
    assert use_pdl(1, 8) and use_pdl(8, 1) and use_pdl(64, 1) and use_pdl(255, 1)
    assert not use_pdl(64, 8) and not use_pdl(16, 2) and not use_pdl(2048, 1)
    assert lowrank_presum(2048, 4) and lowrank_presum(8, 128) and lowrank_presum(256, 2) and lowrank_presum(64, 16)
    assert lowrank_presum(9, 2) and not lowrank_presum(1, 16) and not lowrank_presum(8, 32)
    assert not lowrank_presum(2048, 1)


def test_programmatic_dependent_launch_never_reaches_cpu_tensors():
    """The interpreter has no grid-dependency instructions: CPU launches get neither them nor the launch flag, even
    with pdl=True (pdl.py)."""
    cpu = torch.device("cpu")
    assert not gdc(cpu)
    assert launch_options(cpu, pdl=True) == {} and launch_options(cpu, pdl=False) == {}


@pytest.mark.parametrize("variable, attribute", [("TWLA_ACT_LEFT_FIRST", "ACT_LEFT_FIRST"),
                                                  ("TWLA_FUSED_GEMV", "FUSED_GEMV_ON")])
def test_kernel_switches_are_off_unless_the_environment_says(variable, attribute):
    """TWLA_ACT_LEFT_FIRST=1 (act_quant's left factor first, serve.py's "+lf", KERNEL_NOTES v30) and
    TWLA_FUSED_GEMV=1 (one token in one launch, "+fq", v31), read at import, turn the switch on; any other value or
    none keeps the served path."""
    code = f"from twla_vllm.kernels.triton_ops import tiles; print(tiles.{attribute})"
    seen = {}
    for value in ("1", "0", None):
        env = {k: v for k, v in os.environ.items() if k != variable}
        if value is not None:
            env[variable] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
        seen[value] = out.stdout.strip()
    assert seen == {"1": "True", "0": "False", None: "False"}, seen


def test_one_launch_only_for_one_token_without_a_branch(monkeypatch):
    """`fuse_act_quant`: gemv_quant takes M = 1 without a low-rank branch, and only with the switch on;
    `fused_programs_per_sm` keeps its persistent grid to one wave."""
    from twla_vllm.kernels.triton_ops import tiles

    monkeypatch.setattr(tiles, "FUSED_GEMV_ON", True)
    assert tiles.fuse_act_quant(1, False)
    assert not tiles.fuse_act_quant(2, False) and not tiles.fuse_act_quant(1, True)
    monkeypatch.setattr(tiles, "FUSED_GEMV_ON", False)
    assert not tiles.fuse_act_quant(1, False)
    # one wave of programs: 4 an SM at the 64x64 transform (96 registers), 2 with down_proj's 128x128 right
    # factor (180 registers), 4 without a transform
    assert tiles.fused_programs_per_sm(64, 64, True) == 4 and tiles.fused_programs_per_sm(16, 128, True) == 2
    assert tiles.fused_programs_per_sm(16, 256, False) == 4
