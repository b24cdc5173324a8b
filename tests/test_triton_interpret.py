"""Triton kernels under the interpreter (CPU): every kernel vs the torch reference, odd shapes."""

from __future__ import annotations

import os
import subprocess
import sys

from .helpers import REPO
from .triton_check import CPU_CASES


def test_triton_kernels_match_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before the kernels are defined: fresh process
    proc = subprocess.run([sys.executable, "-m", "tests.triton_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"{len(CPU_CASES)} passed, 0 failed" in proc.stdout
