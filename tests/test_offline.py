"""Offline quantizer stages against brute-force and closed-form checks: stage 2, E2M-ATQ, GPTQ, the integer grid,
ILA-AMP's DP, KOTMS rotations and folding (the whole pipeline on a tiny model: test_pipeline.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from twla_offline import allocate
from twla_offline.calibrate import RotatedLinear
from twla_offline.rotate import (cayley, fold_head_rotation, fold_norm_into, learn_kronecker_rotation,
                                 orthogonality_error, trimodal_loss)
from twla_offline.weights import fit_rtn, gptq_quantize, stage2_refit, to_int_grid
from twla_vllm.format import CODES, check_int_grid
from twla_vllm.reference import rotate_weight

from .helpers import tiny_llama

def test_stage2_is_least_squares(rng):
    t = torch.randint(-1, 2, (6, 48), generator=rng).float()
    w = torch.randn(6, 48, generator=rng)
    x = torch.randn(200, 48, generator=rng) * torch.rand(48, generator=rng)
    alpha, mu = stage2_refit(w, t, x.t() @ x)
    for i in range(6):
        design = torch.stack([x @ t[i], x.sum(1)], 1).double()
        sol = torch.linalg.lstsq(design, (x @ w[i]).double()).solution
        torch.testing.assert_close(torch.stack([alpha[i, 0], mu[i, 0]]).double(), sol, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("code", ["ternary", "binary", "int4"])
def test_e2m_atq_beats_rtn_on_output_error(code, gs, rng):
    w = torch.randn(48, 128, generator=rng) * 0.02
    x = torch.randn(1024, 128, generator=rng) * torch.linspace(0.1, 3, 128)
    h = x.t() @ x

    def out_err(q):
        return float(((q.dequantize() - w) @ x.t()).pow(2).mean())

    q = gptq_quantize(w, h, CODES[code], gs)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) < CODES[code].num_codes
    check_int_grid(q.group_scale, q.group_offset, CODES[code], "test")  # raises if off the grid
    assert out_err(q) < out_err(fit_rtn(w, CODES[code], gs))


def test_act_aware_target_is_least_squares_on_quantized_inputs(rng):
    """act_aware_target(W) = argmin_W' ||X Wᵀ - X̃ W'ᵀ|| (X̃: X quantized per token at 3 bits), checked against
    lstsq; GPTQ on (target, X̃ᵀX̃) then serves X̃ better than GPTQ on (W, XᵀX) does. The second claim holds on
    average, by ~2% here, not for every draw (one in ~50 random draws lost by < 0.5%), so it is checked on the sum
    over 8 independent draws (spread of that sum's ratio ~0.3%)."""
    from twla_offline.weights import act_aware_target
    from twla_vllm.reference import fake_quant_per_token

    aware_err = plain_err = 0.0
    for _ in range(8):
        w = torch.randn(24, 64, generator=rng) * 0.02
        x = torch.randn(2048, 64, generator=rng) * torch.linspace(0.2, 2, 64)
        xq = fake_quant_per_token(x, 3, 1.0)
        target = act_aware_target(w, xq.t() @ xq, xq.t() @ x, damp=0.0)
        lstsq = torch.linalg.lstsq(xq.double(), (x @ w.t()).double()).solution.t().float()
        torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-5)
        aware = gptq_quantize(target, xq.t() @ xq, CODES["ternary"], 32)
        plain = gptq_quantize(w, x.t() @ x, CODES["ternary"], 32)
        aware_err += float((xq @ aware.dequantize().t() - x @ w.t()).pow(2).mean())
        plain_err += float((xq @ plain.dequantize().t() - x @ w.t()).pow(2).mean())
    assert aware_err < plain_err


def test_integer_grid_search_is_the_best_neighbour(rng):
    """to_int_grid returns, per row, the (a, m) minimising the output error over the 3x3 integer neighbours."""
    code = CODES["ternary"]
    w = torch.randn(16, 32, generator=rng) * 0.02
    v = torch.randint(-1, 2, (16, 32), generator=rng).float()
    x = torch.randn(256, 32, generator=rng)
    h = x.t() @ x
    alpha, mu = stage2_refit(w, v, h)
    s = torch.full((16, 1), float(alpha.abs().max() + mu.abs().max()) / 127 * 1.3)
    a, m = to_int_grid(w, v, alpha.abs(), mu, s, code, h)
    for i in range(16):
        def err(ai, mi):
            r = w[i] - s[i] * (ai * v[i] + mi)
            return float(r @ h @ r)
        a0, m0 = round(float(alpha[i].abs() / s[i])), round(float(mu[i] / s[i]))
        best = min(((ai, mi) for ai in (a0 - 1, a0, a0 + 1) for mi in (m0 - 1, m0, m0 + 1)
                    if 0 <= ai and ai + abs(mi) <= 127), key=lambda p: err(*p))
        assert err(int(a[i]), int(m[i])) <= err(*best) * (1 + 1e-6)


def test_block_errors_solve_gptq_column_recursion(rng):
    """block_errors' triangular solve gives GPTQ's column-by-column recursion with the block's quantized values
    fixed (the loop it replaced, kept here as the oracle). In float64, so that the two summation orders agree to
    1e-9 whatever the random seed (in float32 they differ by ~1e-5 relative, conditioning-dependent)."""
    from twla_offline.weights import block_errors, gptq_setup

    x = torch.randn(512, 32, generator=rng)
    w, _, hinv = gptq_setup(torch.randn(48, 32, generator=rng), x.t() @ x, 0.1)
    w, hinv = w.double(), hinv.double()
    q = torch.round(w * 8) / 8
    want, w1 = torch.zeros_like(w), w.clone()
    for i in range(w1.shape[1]):
        e = (w1[:, i] - q[:, i]) / hinv[i, i]
        w1[:, i:] -= e.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        want[:, i] = e
    torch.testing.assert_close(block_errors(w, q, hinv), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_dp_equals_exhaustive_search(rng):
    bit_set = (2, 4, 6, 8)
    for trial in range(5):
        n = 5
        single = [{b: float(torch.rand(1, generator=rng)) * (8 - b) for b in bit_set if b != 8} for _ in range(n)]
        pair = [{}] + [{(bp, b): float(torch.randn(1, generator=rng)) * 0.3
                        for bp in (2, 4, 6) for b in (2, 4, 6)} for _ in range(n - 1)]
        table = allocate.SensitivityTable(1.0, bit_set, single, pair)
        avg = [3.0, 4.0, 5.2][trial % 3]
        got = allocate.allocate_bits(table, bit_set, avg, beta=0.5)
        best = min((c for c in itertools.product(bit_set, repeat=n) if sum(c) <= round(avg * n)),
                   key=lambda c: allocate.chain_cost(table, list(c), 0.5))
        assert sum(got) <= round(avg * n)
        assert allocate.chain_cost(table, got, 0.5) == pytest.approx(allocate.chain_cost(table, list(best), 0.5))


def test_rotations_stay_orthogonal_and_kotms_lowers_the_loss(rng):
    assert orthogonality_error(cayley(torch.randn(16, 16, generator=rng))) < 1e-5
    w = torch.randn(64, 256, generator=rng) * 0.02
    c, b, hist = learn_kronecker_rotation(w, 16, 16, 64, iters=60, left_blocks=2)
    assert orthogonality_error(c) < 1e-5 and orthogonality_error(b) < 1e-5
    assert c[:8, 8:].abs().max() == 0  # block-diagonal: shard-local under TP
    wr = rotate_weight(w, c, b)
    assert trimodal_loss(wr, 64) < trimodal_loss(w, 64)
    assert hist[-1] < hist[0]

def test_folding_keeps_the_fp_model(rng):
    from twla_offline.rotate import random_orthogonal

    model, _ = tiny_llama(rng)
    ids = torch.randint(3, 98, (2, 20), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        layer = model.model.layers[0]
        a = layer.self_attn
        fold_norm_into([a.q_proj, a.k_proj, a.v_proj], layer.input_layernorm)
        fold_norm_into([layer.mlp.gate_proj, layer.mlp.up_proj], layer.post_attention_layernorm)
        fold_head_rotation(a.v_proj, a.o_proj, random_orthogonal(64, rng), 64)
        c, b = random_orthogonal(8, rng), random_orthogonal(16, rng)
        layer.mlp.gate_proj = RotatedLinear(rotate_weight(layer.mlp.gate_proj.weight.data, c, b), None, c, b)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
