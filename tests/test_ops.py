"""The registered op: schema/fake-impl checks and torch.compile (what vLLM does with it)."""

from __future__ import annotations

import pytest
import torch

import twla_vllm.ops  # noqa: F401
from twla_offline.rotate import random_orthogonal
from twla_vllm.reference import prepare_unit_sums


def op_args(m, n, k, g, bits, kb, rotated, gen):
    t = torch.randint(-1, 2, (n, k), generator=gen).float()
    alpha = torch.rand(n, g, generator=gen) + 0.1
    mu = torch.randn(n, g, generator=gen) * 0.01
    wsum = prepare_unit_sums(t, alpha, mu, kb)
    left = random_orthogonal(8, gen) if rotated else None
    right = random_orthogonal(k // 8, gen) if rotated else None
    return (torch.randn(m, k, generator=gen), t, alpha, mu, wsum, left, right, bits, 0.9, kb)


@pytest.mark.parametrize("bits,g,kb,rotated", [(4, 1, 1, True), (2, 4, 2, False), (8, 2, 4, True), (16, 1, 1, False)])
def test_opcheck(bits, g, kb, rotated, rng):
    args = op_args(5, 24, 128, g, bits, kb, rotated, rng)
    torch.library.opcheck(torch.ops.twla.ternary_linear_ref.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_dynamic(rng):
    args = op_args(7, 24, 128, 2, 4, 2, True, rng)

    def f(x, *rest):
        return torch.ops.twla.ternary_linear_ref(x, *rest) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(*args), f(*args))
    args2 = (torch.randn(3, 128, generator=rng),) + args[1:]  # another batch size, same graph
    torch.testing.assert_close(compiled(*args2), f(*args2))
