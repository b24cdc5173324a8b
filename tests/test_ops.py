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


@pytest.mark.parametrize("bits,k,kb,wmax,fast", [(2, 512, 1, 127, True), (4, 1536, 2, 127, True),
                                                 (6, 256, 1, 127, True), (8, 4096, 1, 127, False),
                                                 (8, 1536, 1, 10, True), (4, 512, 1, 127, True)])
def test_float32_epilogue_equals_float64(bits, k, kb, wmax, fast, monkeypatch, rng):
    """The CPU epilogue's float32 shortcut (acc - z * rowsum in place) gives bit-for-bit what the float64 form
    gives wherever it is taken, including extreme integer weights (|W_int| = wmax) and an all-positive token (large
    zero point); the bound uses the weights' actual |W_int| sums (`abs_range_sum`); where it fails (8-bit,
    K = 4096, |W_int| up to 127) the float64 form runs."""
    from twla_vllm import reference

    n = 64
    w_int = torch.randint(-wmax, wmax + 1, (n, k), generator=rng).float()
    w_int[:4] = float(wmax)
    x = torch.randn(6, k, generator=rng)
    x[0] = 5.0 + 3.0 * torch.rand(k, generator=rng)  # all positive, range ~3: z far from 0 (and bounded)
    w_abs = reference.abs_range_sum(w_int, kb)
    args = (x, w_int, torch.rand(n, generator=rng) + 0.1, block_row_sums(w_int, kb), None, None, bits, 0.9)
    q, s, z = reference.quantize_per_token(x, bits, 0.9, kb)
    assert reference._float32_is_exact(x, z, args[3], bits, w_abs) is fast
    got = reference.quant_linear(*args, w_abs=w_abs)
    monkeypatch.setattr(reference, "_float32_is_exact", lambda *a: False)
    assert torch.equal(got, reference.quant_linear(*args))
