"""The registered reference op: schema/fake-impl checks and torch.compile (what vLLM does with it)."""

from __future__ import annotations

import pytest
import torch

import twla_vllm.ops  # noqa: F401
from twla_offline.rotate import random_orthogonal
from twla_offline.weights import fit_rtn
from twla_vllm.format import CODES
from twla_vllm.reference import block_row_sums


def op_args(m, n, k, gs, bits, kb, rotated, rank, gen, code="ternary"):
    q = fit_rtn(torch.randn(n, k, generator=gen), CODES[code], gs)
    w_int = q.int_weights()
    left = random_orthogonal(8, gen) if rotated else None
    right = random_orthogonal(k // 8, gen) if rotated else None
    la = torch.randn(n, rank, generator=gen) if rank else None
    lb = torch.randn(rank, k, generator=gen) if rank else None
    return (torch.randn(m, k, generator=gen), w_int.float(), q.row_scale.float(), block_row_sums(w_int, kb), left,
            right, la, lb, torch.randn(n, generator=gen), bits, 0.9)


@pytest.mark.parametrize("bits,gs,kb,rotated,rank,code", [(4, -1, 1, True, 0, "ternary"), (2, 32, 2, False, 4, "int4"),
                                                          (8, 64, 4, True, 2, "binary"), (16, 128, 1, False, 0, "ternary")])
def test_opcheck(bits, gs, kb, rotated, rank, code, rng):
    args = op_args(5, 24, 128, gs, bits, kb, rotated, rank, rng, code)
    torch.library.opcheck(torch.ops.twla.quant_linear_ref.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_dynamic(rng):
    args = op_args(7, 24, 128, 64, 4, 2, True, 4, rng)

    def f(x, *rest):
        return torch.ops.twla.quant_linear_ref(x, *rest) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(*args), f(*args))
    args2 = (torch.randn(3, 128, generator=rng),) + args[1:]  # another batch size, same graph
    torch.testing.assert_close(compiled(*args2), f(*args2))
