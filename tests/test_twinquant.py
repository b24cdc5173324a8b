"""TwinQuant mode: learned Kronecker transforms (orthogonal x SPD), the learned low-rank branch, and a
twinquant checkpoint end to end (validated, served by real vLLM with the simulated model's tokens, TP 2 = TP 1)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from twla_offline import twinquant as tq
from twla_offline.calibrate import RotatedLinear
from twla_offline.lowrank import OutputMetric, fit_svd
from twla_offline.recipe import preset
from twla_offline.rotate import fold_weight, orthogonality_error, random_orthogonal, unfold_weight
from twla_offline.weights import fit_rtn
from twla_vllm.format import CODES
from twla_vllm.reference import kron_rotate

from .test_pipeline import tiny_dense_dir  # noqa: F401  (module-scoped fixture: a tiny dense Qwen2)

GS = 32


def _site(gen: torch.Generator, n: int = 96, k: int = 64, t: int = 1024):
    """Weights with a few large low-rank directions and inputs with outlier channels (what 4-bit W and A fail on)."""
    w = torch.randn(n, k, generator=gen) * 0.02
    w += 0.3 * torch.randn(n, 2, generator=gen) @ torch.randn(2, k, generator=gen) / k**0.5
    x = torch.randn(t, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:3]] *= 20.0
    return w, x


def _recipe(**kw):
    return dataclasses.replace(preset("twinquant"), **{"group_size": GS, "twinquant_iters": 60, **kw})


def test_learned_factors_are_invertible_block_diagonal_and_bounded(rng):
    w, x = _site(rng)
    left, right, hist = tq.learn_transform(w, 8, 8, GS, 2, True, _recipe(), lambda: x)
    assert left[:4, 4:].abs().max() == 0 and left[4:, :4].abs().max() == 0  # shard-local under TP
    cond = torch.linalg.cond(left.double()) * torch.linalg.cond(right.double())
    assert 1.0 < cond <= tq.MAX_COND**2 * (1 + 1e-4)
    assert orthogonality_error(right) > 1e-3  # the SPD (general linear) part was used, not only a rotation
    # the parts: O orthogonal (Stiefel), S symmetric positive definite with eigenvalues in the bound, S⁻¹ exact
    f = tq._Factor(torch.stack([random_orthogonal(4, rng), random_orthogonal(4, rng)]), invertible=True)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_(0, 1.0, generator=rng)
        o, s, s_inv = (m.double() for m in f.parts())
    assert max(orthogonality_error(b) for b in o) < 1e-5
    torch.testing.assert_close(s, s.transpose(-1, -2), rtol=1e-6, atol=1e-6)
    ev = torch.linalg.eigvalsh(s)
    assert ev.min() >= tq.MAX_COND**-0.5 * (1 - 1e-4) and ev.max() <= tq.MAX_COND**0.5 * (1 + 1e-4)
    # S and S⁻¹ are fp32 products V·E^±1·Vᵀ: their rounding (~m·eps32) is amplified up to cond(S) <= MAX_COND (one
    # draw in ~100 passed 1e-5 by 2%); a wrong inverse would miss by O(1)
    tol = tq.MAX_COND * 4 * 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(s @ s_inv, torch.eye(4, dtype=torch.float64).expand_as(s), atol=tol, rtol=0)


def test_orthogonal_only_for_the_head_factor_and_without_data(rng):
    w, x = _site(rng)
    left, right, _ = tq.learn_transform(w, 8, 8, GS, 1, False, _recipe(), lambda: x)
    assert left is None and orthogonality_error(right) < 1e-5  # folded into v_proj as a rotation
    left, right, hist = tq.learn_transform(w, 8, 8, GS, 1, True, _recipe(), None)
    assert orthogonality_error(left) < 1e-5 and orthogonality_error(right) < 1e-5
    assert hist[-1] <= hist[0]


def test_folding_is_exact_in_floating_point(rng):
    w, x = _site(rng)
    bias = torch.randn(w.shape[0], generator=rng)
    left, right, _ = tq.learn_transform(w, 8, 8, GS, 2, True, _recipe(), lambda: x)
    folded = fold_weight(w, left, right)
    layer = RotatedLinear(folded, bias, left, right)  # transform online, weight folded: the pipeline's layer
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unfold_weight(folded, left, right), w, rtol=1e-4, atol=1e-6)
    # in float64 the same algebra is exact to rounding: W' P x = W x
    l64, r64, w64, x64 = left.double(), right.double(), w.double(), x.double()
    w_f = torch.linalg.inv(l64).t() @ w64.reshape(-1, 8, 8) @ torch.linalg.inv(r64).t()
    got = kron_rotate(x64, l64, r64) @ w_f.reshape(w.shape).t()
    assert (got - x64 @ w64.t()).abs().max() < 1e-10 * (x64 @ w64.t()).abs().max()


def test_learning_lowers_the_quantized_output_error(rng):
    w, x = _site(rng)
    r = _recipe()
    left, right, hist = tq.learn_transform(w, 8, 8, GS, 1, True, r, lambda: x)
    resid = tq._residual(w, r)
    err = {name: tq.quantized_output_error(resid, x, lf, rf, GS, 4)
           for name, (lf, rf) in {"none": (None, None), "learned": (left, right),
                                  "random": (random_orthogonal(8, rng), random_orthogonal(8, rng))}.items()}
    assert err["learned"] < err["random"] and err["learned"] < err["none"], err
    assert hist[-1] < hist[0]  # judged on the fixed evaluation subset: init loss first, final last


@pytest.mark.parametrize("lr", [1e-2, 50.0])  # 50: steps that make J worse, so the init must come back
def test_reported_objective_belongs_to_the_returned_factors(lr, rng):
    w, x = _site(rng)  # 96 rows, 1024 tokens: the evaluation subset is all of them
    r = _recipe(twinquant_lr=lr, twinquant_iters=20)
    left, right, hist = tq.learn_transform(w, 8, 8, GS, 1, True, r, lambda: x)
    assert hist[-1] <= hist[0]
    # the same J up to the fold's rounding (~1e-6), or one 4-bit code flipped by it (~1e-3, one draw in ~20: the
    # learning folds with S⁻¹, quantized_output_error with fold_weight); other factors' J differs by ~3x
    assert tq.quantized_output_error(tq._residual(w, r), x, left, right, GS, 4) == pytest.approx(hist[-1], rel=1e-2)


def test_learned_lowrank_beats_svd_init_and_no_branch(rng):
    w, x = _site(rng)
    left, right = random_orthogonal(8, rng) @ torch.diag(torch.linspace(0.5, 2, 8)), random_orthogonal(8, rng)

    def quantize(residual):  # the pipeline's: through the (invertible) transform and the int4 weight stage
        qw = fit_rtn(fold_weight(residual, left, right), CODES["int4"], GS)
        return qw, unfold_weight(qw.dequantize(), left, right)

    metric = OutputMetric(x, w.shape[1], 0.1)

    def err(qw, a=None, b=None):  # E = ‖X (W − A·B − R̂)ᵀ‖²
        return metric.error(w - (0 if a is None else a @ b) - unfold_weight(qw.dequantize(), left, right))

    qw, a, b = tq.fit_lowrank(w, quantize, 4, _recipe(), lambda: x)
    errs = {"none": err(quantize(w)[0]), "svd": err(*fit_svd(w, quantize, 4, None)), "learned": err(qw, a, b)}
    assert errs["learned"] < errs["svd"] < errs["none"], errs
    assert a.shape == (w.shape[0], 4) and b.shape == (4, w.shape[1])
    assert torch.equal(a, a.half().float()) and torch.equal(b, b.half().float())  # stored as fp16, residual of these


# ------------------------------------------------------------------------------ end to end -------------------
@pytest.fixture(scope="module")
def twinquant_ckpt(tiny_dense_dir, tmp_path_factory):  # noqa: F811
    from twla_offline.cli import quantize

    recipe = dataclasses.replace(preset("twinquant"), nsamples=4, seqlen=64, twinquant_iters=20, twinquant_rounds=2,
                                 clip_tokens=256, amp_seqlen=64, batch_size=2)
    out = str(tmp_path_factory.mktemp("tq") / "tiny-twinquant")
    return quantize(tiny_dense_dir, out, recipe, evaluate_after=False)["checkpoint"]


def test_twinquant_checkpoint_validates(twinquant_ckpt):
    from safetensors.torch import load_file

    from twla_vllm import format as fmt

    qcfg = fmt.validate_checkpoint(twinquant_ckpt)
    cfg = json.load(open(os.path.join(twinquant_ckpt, "config.json")))["quantization_config"]
    assert cfg["weight"]["code"] == "int4" and qcfg.code.name == "int4"
    assert cfg["recipe"]["method"] == "twinquant" and cfg["recipe"]["lowrank"] == "learned"
    tensors = load_file(os.path.join(twinquant_ckpt, "model.safetensors"))
    prefixes = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(fmt.WEIGHT_PACKED)})
    assert len(prefixes) == 14  # 2 blocks x 7 linears
    for p in prefixes:
        assert tensors[f"{p}.{fmt.LOWRANK_A}"].dtype == torch.float16
        assert tensors[f"{p}.{fmt.LOWRANK_A}"].shape[1] == tensors[f"{p}.{fmt.LOWRANK_B}"].shape[0] == 32
        assert qcfg.spec(p).act_bits == 4
    rights = [tensors[k] for k in tensors if k.endswith(fmt.ROT_RIGHT)]
    assert rights and any(orthogonality_error(r) > 1e-3 for r in rights)  # invertible, not only orthogonal
    # honest bits: every stored bit of the quantized linears (int4 codes, scales, factors, fp16 branch) per weight
    bits = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
               if k.rpartition(".")[2] in fmt.QUANT_TENSOR_SUFFIXES)
    weights = sum(tensors[f"{p}.{fmt.WEIGHT_PACKED}"].numel() * 8 for p in prefixes)  # 8 int4 codes per int32
    branch = sum(tensors[f"{p}.{s}"].numel() * 16 for p in prefixes for s in (fmt.LOWRANK_A, fmt.LOWRANK_B))
    assert cfg["bits_per_weight"] == pytest.approx(bits / weights, abs=1e-3)
    assert cfg["bits_per_weight"] > 4 + branch / weights


@pytest.mark.vllm
def test_twinquant_checkpoint_serves_in_vllm_with_the_simulated_tokens(twinquant_ckpt):
    from .helpers import PROMPTS, run_vllm, sim_greedy

    got = run_vllm(model=twinquant_ckpt, prompts=PROMPTS)
    assert got["tokens"] == sim_greedy(twinquant_ckpt, got["prompt_tokens"])


@pytest.mark.vllm
def test_int4_lowrank_tensor_parallel_2_equals_tp_1(tmp_path):
    from twla_offline.synthetic import make_synthetic_checkpoint

    from .helpers import PROMPTS, run_vllm, sim_greedy

    ckpt = make_synthetic_checkpoint(str(tmp_path / "int4-lr"), code="int4", lowrank_rank=8, group_size=32, seed=5)
    tp1 = run_vllm(model=ckpt, prompts=PROMPTS)
    tp2 = run_vllm(model=ckpt, prompts=PROMPTS, tp=2)
    assert tp1["tokens"] == sim_greedy(ckpt, tp1["prompt_tokens"])
    assert tp2["tokens"] == tp1["tokens"]
