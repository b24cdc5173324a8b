"""Triton kernels (run on CPU under TRITON_INTERPRET=1): a NaN / inf / huge token in a batch leaves every other
token's output bit-identical to the same batch with a clean token in its place.

    TRITON_INTERPRET=1 python -m tests.triton_nonfinite      (prints one line per case, exits 1 on a leak)
"""

from __future__ import annotations

import sys

import torch

from twla_offline.rotate import random_orthogonal
from twla_offline.weights import fit_rtn
from twla_vllm import format as fmt
from twla_vllm.kernels import triton_ops as T
from twla_vllm.reference import block_row_sums

BAD_VALUES = (float("nan"), float("inf"), -float("inf"), 3e38)


def run_layer(x, layer, bits):
    q, s, z, _ = T.act_quant(x, layer["left"], layer["right"], bits, 0.9, 1)
    code = fmt.CODES["ternary"]
    return T.quant_matmul(q, s, z, layer["packed"], layer["row_scale"], layer["qa"], layer["qm"], layer["rowsum"],
                          code.bits, code.step, code.offset, 64, x.dtype, bias=layer["bias"])


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 128
    w = fit_rtn(torch.randn(n, k, generator=gen) * 0.05, fmt.CODES["ternary"], 64)
    w_int = fmt.int_weights(w.codes, w.group_scale, w.group_offset, w.code)
    layer = {"packed": fmt.pack_codes(w.codes, w.code), "row_scale": w.row_scale.half(), "qa": w.group_scale,
             "qm": w.group_offset, "rowsum": block_row_sums(w_int, 1), "left": random_orthogonal(8, gen),
             "right": random_orthogonal(16, gen), "bias": torch.randn(n, generator=gen)}
    failed = 0
    for m in (3, 12):  # the GEMV (M <= 8) and the tensor-core GEMM paths
        x = torch.randn(m, k, generator=gen)
        for bits in (4, 8):
            clean = run_layer(x, layer, bits)
            for bad in BAD_VALUES:
                xb = x.clone()
                xb[1, 5] = bad
                y = run_layer(xb, layer, bits)
                others = [i for i in range(m) if i != 1]
                ok = torch.equal(y[others], clean[others])
                failed += not ok
                print(f"{'ok  ' if ok else 'LEAK'} m={m} a{bits} bad={bad}")
    print(f"{failed} leaked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
