"""BWLA mode: OKT (EM-learned orthogonal Kronecker transform), PSP (proximal SVD low-rank branch), the
`--method bwla` pipeline end to end into real vLLM, TP 2 for binary + low-rank checkpoints, bad binary checkpoints."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from twla_offline import lowrank
from twla_offline.okt import learn_okt
from twla_offline.recipe import preset
from twla_offline.rotate import block_diagonal_orthogonal, orthogonality_error, random_orthogonal
from twla_offline.weights import fit_rtn, gptq_quantize
from twla_vllm import format as fmt
from twla_vllm.reference import rotate_weight

from .test_bad_checkpoints import corrupt
from .test_pipeline import tiny_dense_dir  # noqa: F401  (module fixture: a tiny dense Qwen2 directory)

BINARY = fmt.CODES["binary"]


def binarization_error(w: torch.Tensor, group_size: int = 32) -> float:
    """Weight-space error of the best sign fit α·b + μ per (row, group), relative to ‖W‖²."""
    q = fit_rtn(w, BINARY, group_size, iters=15).dequantize()
    return float((q - w).pow(2).sum() / w.pow(2).sum())


def planted_bimodal(gen: torch.Generator, n: int = 64, n1: int = 8, n2: int = 16, left_blocks: int = 2):
    """Weights that are bimodal per row in a hidden Kronecker basis: R1 W R2 = (±1 + noise) * row scale."""
    signs = torch.randint(0, 2, (n, n1 * n2), generator=gen).float() * 2 - 1
    hidden = (signs + 0.15 * torch.randn(n, n1 * n2, generator=gen)) * (torch.rand(n, 1, generator=gen) + 0.5)
    r1, r2 = block_diagonal_orthogonal(n1, left_blocks, gen), random_orthogonal(n2, gen)
    return (r1.t() @ hidden.reshape(n, n1, n2) @ r2.t()).reshape(n, -1), hidden


def test_okt_em_lowers_its_objective_and_the_binarization_error(rng):
    w, hidden = planted_bimodal(rng)
    left, right, hist = learn_okt(w, 8, 16, 32, left_blocks=2, learn_left=True, iters=60)
    assert orthogonality_error(left) < 1e-5 and orthogonality_error(right) < 1e-5
    assert left[:4, 4:].abs().max() == 0 and left[4:, :4].abs().max() == 0  # block-diagonal: shard-local
    assert len(hist) == 61
    tol = 1e-5 * abs(hist[0])  # float32 rounding once converged
    assert all(b <= a + tol for a, b in zip(hist, hist[1:])), "EM must never raise its objective"
    assert hist[-1] < hist[0] - 0.05
    before, after = binarization_error(w), binarization_error(rotate_weight(w, left, right))
    assert binarization_error(hidden) < 0.05 < before  # the planted basis is bimodal, the given one is not
    assert after < 0.85 * before


def test_okt_right_factor_only(rng):
    w = torch.randn(48, 9 * 64, generator=rng) * 0.02
    left, right, hist = learn_okt(w, 9, 64, 64, learn_left=False, iters=5)
    assert left is None and right.shape == (64, 64) and orthogonality_error(right) < 1e-5
    assert hist[-1] < hist[0]


def test_okt_reads_its_iterations_from_the_recipe(rng):
    w = torch.randn(32, 256, generator=rng)
    *_, hist = learn_okt(w, 16, 16, -1, recipe=dataclasses.replace(preset("bwla"), okt_iters=3))
    assert len(hist) == 4


def _layer(rng, n=96, k=128):
    """A layer like the measured LLM linears: Gaussian weights (no dominant low-rank part) and inputs with a
    few large channels."""
    w = torch.randn(n, k, generator=rng) * 0.02
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=rng)[:6]] = 8.0
    x = torch.randn(2048, k, generator=rng) * scale + 0.3 * torch.randn(k, generator=rng)
    return w, x


def test_psp_lowers_the_output_error_and_beats_svd_and_no_branch(rng):
    w, x = _layer(rng)
    h = x.t() @ x

    def quantize(residual):
        q = gptq_quantize(residual, h, BINARY, 32)
        return q, q.dequantize()

    def output_error(w_hat):
        return float(((w - w_hat) @ x.t()).pow(2).sum() / (w @ x.t()).pow(2).sum())

    qw, a, b, hist = lowrank.psp(w, quantize, rank=8, iters=3, x=x)
    assert len(hist) == 4 and hist[-1] < hist[1] < hist[0]
    assert a.shape == (96, 8) and b.shape == (8, 128)
    assert torch.equal(a, a.half().float()) and torch.equal(b, b.half().float())  # stored in fp16 as fitted
    got = output_error(qw.dequantize() + a @ b)
    assert got == pytest.approx(min(hist), rel=1e-4)  # the best iterate is returned
    q_svd, a_svd, b_svd = lowrank.fit_svd(w, quantize, 8, None)
    assert got < output_error(q_svd.dequantize() + a_svd @ b_svd)
    assert got < output_error(quantize(w)[1])


def test_fit_psp_uses_the_recipe_and_site_inputs(rng):
    w, x = _layer(rng, 64, 64)
    calls = []

    def quantize(residual):
        calls.append(residual)
        q = fit_rtn(residual, BINARY, 32)
        return q, q.dequantize()

    recipe = dataclasses.replace(preset("bwla"), psp_iters=2)
    qw, a, b = lowrank.fit_psp(w, quantize, 4, recipe, site_inputs=lambda: x)
    assert len(calls) == 3  # psp_iters + 1 runs of the weight stage
    assert torch.equal(calls[0], w)  # B = 0: the first binarization sees W itself
    assert a.shape == (64, 4) and qw.codes.shape == (64, 64)


# ------------------------------------------------------------------ end to end -------------------
def _tiny_bwla_recipe():
    return dataclasses.replace(preset("bwla"), nsamples=4, seqlen=64, okt_iters=10, psp_iters=1, amp_seqlen=64,
                               clip_tokens=256, batch_size=2)


@pytest.fixture(scope="module")
def bwla_checkpoint(tiny_dense_dir, tmp_path_factory):  # noqa: F811
    from twla_offline.cli import quantize

    out = str(tmp_path_factory.mktemp("bwla") / "q")
    return quantize(tiny_dense_dir, out, _tiny_bwla_recipe(), evaluate_after=False)


def test_bwla_checkpoint_is_binary_with_a_lowrank_branch(bwla_checkpoint):
    from safetensors.torch import load_file

    ckpt = bwla_checkpoint["checkpoint"]
    cfg = fmt.validate_checkpoint(ckpt)
    assert cfg.weight_code == "binary" and cfg.group_size == 64 and cfg.recipe["method"] == "bwla"
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    want_bits = total = 0
    for name, spec in cfg.layers.items():
        assert spec.act_bits == 6 and spec.lowrank_rank == 16
        assert (spec.rotation is None) == name.endswith("o_proj")  # o_proj's head factor is folded into v_proj
        a, b = tensors[f"{name}.{fmt.LOWRANK_A}"], tensors[f"{name}.{fmt.LOWRANK_B}"]
        n, k = a.shape[0], b.shape[1]
        assert a.dtype == b.dtype == torch.float16 and a.shape[1] == b.shape[0] == 16
        assert tensors[f"{name}.{fmt.WEIGHT_PACKED}"].shape == (n, k // 32)
        assert float(a.float().abs().sum()) > 0  # a fitted branch, not the zero init
        want_bits += fmt.bits_per_weight(n, k, cfg.group_size_of(name), BINARY, spec.rotation, 1, 16) * n * k
        total += n * k
    assert len(cfg.layers) == 14
    assert cfg.bits_per_weight == pytest.approx(want_bits / total, abs=1e-4)  # honest: branch included


@pytest.mark.vllm
def test_bwla_checkpoint_serves_in_vllm_as_simulated(bwla_checkpoint):
    from .helpers import PROMPTS, run_vllm, sim_greedy

    ckpt = bwla_checkpoint["checkpoint"]
    got = run_vllm(model=ckpt, prompts=PROMPTS)
    assert len(got["tokens"]) == len(PROMPTS)
    assert got["tokens"] == sim_greedy(ckpt, got["prompt_tokens"])


@pytest.fixture(scope="module")
def binary_lowrank_dir(tmp_path_factory):
    from twla_offline.synthetic import make_synthetic_checkpoint

    return make_synthetic_checkpoint(str(tmp_path_factory.mktemp("bin") / "ckpt"), arch="llama", seed=5,
                                     code="binary", lowrank_rank=8, group_size=32)


@pytest.mark.vllm
def test_binary_lowrank_tensor_parallel_2_equals_tp_1(binary_lowrank_dir):
    from .helpers import PROMPTS, run_vllm, sim_greedy

    tp1 = run_vllm(model=binary_lowrank_dir, prompts=PROMPTS)
    tp2 = run_vllm(model=binary_lowrank_dir, prompts=PROMPTS, tp=2)
    assert tp1["tokens"] == sim_greedy(binary_lowrank_dir, tp1["prompt_tokens"])
    assert tp2["tokens"] == tp1["tokens"]


# ------------------------------------------------------------------ bad binary checkpoints -------
LAYER = "model.layers.1.mlp.down_proj"


def _set(d, key, value):
    d[key] = value


BAD_BINARY = {
    "lowrank_b_missing": (dict(tensors=lambda d: d.pop(f"{LAYER}.lowrank_b")),
                          rf"tensor '{LAYER}\.lowrank_b' is missing.*lowrank_rank > 0"),
    "lowrank_in_fp32": (dict(tensors=lambda d: _set(d, f"{LAYER}.lowrank_a", d[f"{LAYER}.lowrank_a"].float())),
                        rf"tensor '{LAYER}\.lowrank_a' has dtype torch.float32, expected torch.float16"),
    "lowrank_rank_mismatch": (dict(config=lambda q: q["layers"][LAYER].update(lowrank_rank=4)),
                              rf"tensor '{LAYER}\.lowrank_a' has shape \[128, 8\], expected \[128, 4\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_BINARY))
def test_bad_binary_checkpoint_named_at_validation(case, binary_lowrank_dir, tmp_path):
    kwargs, match = BAD_BINARY[case]
    bad = corrupt(binary_lowrank_dir, str(tmp_path / case), **kwargs)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.validate_checkpoint(bad)


def test_binary_group_scale_off_the_grid_named_at_load(binary_lowrank_dir, tmp_path):
    """a = 120, m = -10: the level -a + m = -130 leaves int8 (the header cannot see values: the loader checks)."""
    from twla_vllm.simulate import load_simulated_model

    def off_grid(d):
        d[f"{LAYER}.weight_group_scale"][3, 1] = 120
        d[f"{LAYER}.weight_group_offset"][3, 1] = -10

    bad = corrupt(binary_lowrank_dir, str(tmp_path / "grid"), tensors=off_grid)
    fmt.validate_checkpoint(bad)  # headers are fine
    with pytest.raises(fmt.FormatError, match=rf"{LAYER}: integer weights a\*v \+ m leave \[-127, 127\].*min -130"):
        load_simulated_model(bad)


def test_binary_group_scale_off_the_grid_named_by_the_vllm_loader(rng):
    from .conftest import vllm_layer_env
    from .test_linear_method import build, load, shard_tensors

    spec = fmt.LayerSpec(act_bits=6, lowrank_rank=8)
    _, tens = shard_tensors(32, 128, 32, None, False, rng, code="binary", rank=8)
    tens[fmt.WEIGHT_GROUP_SCALE][1, 0] = 120
    tens[fmt.WEIGHT_GROUP_OFFSET][1, 0] = -10
    with vllm_layer_env():
        layer, names = build("row", 128, [32], 32, spec, False, code="binary")
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*\[-127, 127\].*min -130"):
            load(layer, "row", names, {names[0]: tens})
