"""Triton kernels on the CPU: every kernel vs the torch reference under the interpreter (odd shapes), and every
kernel compiled for the H100 (sm_90 PTX + ptxas) without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

from .helpers import REPO
from .triton_check import CPU_CASES
from .triton_compile_check import VARIANTS


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before the kernels are defined: fresh process
    proc = subprocess.run([sys.executable, "-m", "tests.triton_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"{len(CPU_CASES)} passed, 0 failed" in proc.stdout


def test_triton_kernels_compile_for_the_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real code generation
    proc = subprocess.run([sys.executable, "-m", "tests.triton_compile_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert f"{len(VARIANTS)} compiled, 0 failed" in proc.stdout
