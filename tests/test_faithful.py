"""Paper-faithful mode (simulation only): the reference's grouped order-2 ternary structure."""

import pytest
import torch

from twla_offline.faithful import PLANE_BITS, SCALE_BITS, SCALES_PER_ROW, _basis, _joint_stage2, fit_faithful, \
    quantize_block


def _layer(seed: int, n: int = 64, k: int = 256, t: int = 1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.linspace(0.2, 3, k)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::29] *= 6  # a few salient columns
    return w, x


def _out_err(w, wh, x):
    return float(((x @ (w - wh).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_structure_beats_one_group_per_row_and_bits_are_counted(seed):
    from twla_offline.weights import gptq_quantize
    from twla_vllm.format import CODES

    w, x = _layer(seed)
    h = x.t() @ x
    f = fit_faithful(w, h)
    ours = gptq_quantize(w, h, CODES["ternary"], 128).dequantize()
    assert _out_err(w, f.weight, x) < 0.7 * _out_err(w, ours, x)
    n, k = w.shape
    salient_cols = round(f.salient_fraction * k)
    blocks = k // 128
    expected = (n * k * (PLANE_BITS + 1) + n * salient_cols * PLANE_BITS + blocks * n * SCALES_PER_ROW * SCALE_BITS
                + k) / (n * k)
    assert f.bits == pytest.approx(expected)
    assert 0 < f.salient_fraction < 0.5


def test_joint_stage2_never_loses_to_stage1():
    w, x = _layer(2, k=128)
    s = x.t() @ x
    sal = torch.zeros(128, dtype=torch.bool)
    sal[:8] = True
    sal = sal.expand_as(w)
    groups = [(sal & (w.abs() > 0.1), 2), (sal & (w.abs() <= 0.1), 2), (~sal & (w.abs() > 0.05), 1),
              (~sal & (w.abs() <= 0.05), 1)]
    basis, stage1 = _basis(w, groups)
    assert len(basis) == 2 * 3 + 2 * 2  # ten scales per row
    joint = _joint_stage2(w, basis, s)

    def err(wh):
        return float((((w - wh) @ s) * (w - wh)).sum())

    assert err(joint) <= err(stage1) * (1 + 1e-6)
    q, k = quantize_block(w, torch.ones(128), s)
    assert 1 <= k < 128 and err(q) <= err(stage1) * 1.5


def test_faithful_quantizer_runs_the_pipeline_and_writes_no_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.faithful import faithful_quantizer, faithful_recipe
    from twla_offline.recipe import Recipe
    from twla_offline.synthetic import char_tokenizer, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config("llama", 98)),
                                             dtype=torch.float32).eval()
    r = faithful_recipe(Recipe(nsamples=2, seqlen=64, kotms_iters=3, allocation="uniform", clip_search=False,
                               batch_size=2))
    q = faithful_quantizer(model, char_tokenizer(), r, str(tmp_path / "work"), salient_counts=(1, 4),
                           percentiles=(0.3, 0.7))
    q.quantize_weights()
    layers = q.sim_layers()
    assert len(layers) == 14  # 2 blocks x 7 linears, each with its own transform
    assert all(m.left is not None and m.right is not None for m in layers.values())
    assert 3.0 < q.bits_per_weight() < 8.0
    q.allocate()
    ids = torch.randint(3, 98, (1, 32))
    assert torch.isfinite(q.model(ids).logits).all()
    with pytest.raises(RuntimeError, match="simulation only"):
        q.export(str(tmp_path / "ckpt"), {}, torch.float16)


def test_second_plane_reduces_error_and_counts_its_bits():
    from twla_offline.faithful import fit_second_plane
    from twla_offline.weights import gptq_quantize
    from twla_vllm.format import CODES

    w, x = _layer(3)
    h = x.t() @ x
    plain = gptq_quantize(w, h, CODES["ternary"], 32).dequantize()
    two = fit_second_plane(w, h, 32, fraction=0.0625)
    assert _out_err(w, two.weight, x) < 0.95 * _out_err(w, plain, x)
    n, k = w.shape
    n_sal = round(0.0625 * k)
    # at most every group holds a salient column: bits between "no group" and "all groups" pay for beta
    base = 2 + 2 * n_sal / k + 16 / 32 + 16 / k + 1 / n
    assert base <= two.bits <= base + 8 / 32 + 1e-9
