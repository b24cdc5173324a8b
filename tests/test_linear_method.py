"""TwlaLinearMethod on single vLLM layers: loading (fused shards, TP sharding) and apply() vs math."""

from __future__ import annotations

import pytest
import torch

from twla_offline.rotate import block_diagonal_orthogonal, random_orthogonal
from twla_vllm import format as fmt

from .conftest import vllm_layer_env


def naive_linear(x, t, alpha, mu, left, right, bits, clip, bias, k_blocks=1):
    """Independent float64 definition: dequantized W, fake-quantized rotated x, plain matmul."""
    x = x.double()
    if left is not None:
        n1, n2 = left.shape[0], right.shape[0]
        x = (left.double() @ x.reshape(-1, n1, n2) @ right.double()).reshape(x.shape)
    if bits < 16:
        qmax = 2**bits - 1
        m, k = x.shape
        xb = x.reshape(m, k_blocks, k // k_blocks)
        hi, lo = xb.amax(-1, keepdim=True) * clip, xb.amin(-1, keepdim=True) * clip
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.round(-lo / s)
        x = ((torch.clamp(torch.round(xb / s) + z, 0, qmax) - z) * s).reshape(m, k)
    n, k = t.shape
    g = alpha.shape[1]
    w = (t.double().view(n, g, k // g) * alpha.double()[..., None] + mu.double()[..., None]).view(n, k)
    y = x @ w.t()
    return y if bias is None else y + bias.double()


def random_shard(n, k, gs, gen):
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    g = fmt.num_groups(k, gs)
    alpha = (torch.rand(n, g, generator=gen) * 0.1 + 0.01).half()
    mu = (torch.randn(n, g, generator=gen) * 0.01).half()
    return t, alpha, mu


def rotation_for(k, gen, blocks=1):
    n1, n2 = {128: (8, 16), 256: (16, 16), 384: (16, 24)}[k]
    left = block_diagonal_orthogonal(n1, blocks, gen) if blocks > 1 else random_orthogonal(n1, gen)
    return left, random_orthogonal(n2, gen)


def build(kind, k, n_parts, gs, spec, bias, tp_rank=0, tp_size=1):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from twla_vllm.config import TwlaConfig

    shards = {"qkv": ["q_proj", "k_proj", "v_proj"], "gate_up": ["gate_proj", "up_proj"], "row": ["down_proj"]}[kind]
    qc = fmt.CheckpointConfig(group_size=gs, layers={f"blk.{s}": spec for s in shards})
    cfg = TwlaConfig(qc)
    if kind == "qkv":
        layer = QKVParallelLinear(k, 64, n_parts[0] // 64, n_parts[1] // 64, bias=bias, quant_config=cfg,
                                  prefix="blk.qkv_proj", params_dtype=torch.float32)
    elif kind == "gate_up":
        layer = MergedColumnParallelLinear(k, n_parts, bias=bias, quant_config=cfg, prefix="blk.gate_up_proj",
                                           params_dtype=torch.float32)
    else:
        layer = RowParallelLinear(k, n_parts[0], bias=bias, quant_config=cfg, prefix="blk.down_proj",
                                  params_dtype=torch.float32, reduce_results=tp_size == 1)
    return layer, shards


def load(layer, kind, shard_names, tensors):
    """Feed checkpoint tensors through the layer's own v2 loader, as vLLM's model loader does."""
    ids = {"qkv": ["q", "k", "v"], "gate_up": [0, 1], "row": [None]}[kind]
    params = dict(layer.named_parameters())
    for shard_id, name in zip(ids, shard_names):
        for suffix, value in tensors[name].items():
            param = params[suffix]
            if shard_id is None:
                param.weight_loader(param, value)
            else:
                param.weight_loader(param, value, shard_id)
    layer.quant_method.process_weights_after_loading(layer)


def shard_tensors(n, k, gs, rot, bias, gen):
    t, alpha, mu = random_shard(n, k, gs, gen)
    tens = {fmt.WEIGHT_PACKED: fmt.pack_ternary(t), fmt.WEIGHT_SCALE: alpha, fmt.WEIGHT_OFFSET: mu}
    if rot is not None:
        tens[fmt.ROT_LEFT], tens[fmt.ROT_RIGHT] = rot
    if bias:
        tens["bias"] = torch.randn(n, generator=gen)
    return (t, alpha, mu), tens


@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("gs", [128, -1])
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "row"])
def test_apply_matches_reference(kind, bits, gs, rotated, rng):
    k = 256 if kind != "row" else 384 if gs == -1 else 256
    parts = {"qkv": [128, 64, 64], "gate_up": [96, 96], "row": [80]}[kind]
    bias = kind != "row" or bits == 4  # bias on every kind at least once
    rot = rotation_for(k, rng) if rotated else None
    spec = fmt.LayerSpec(act_bits=bits, act_clip=0.9, rotation=None if rot is None else
                         (rot[0].shape[0], rot[1].shape[0]))
    with vllm_layer_env():
        layer, names = build(kind, k, parts, gs, spec, bias)
        truth, tensors = {}, {}
        for name, n in zip(names, parts):
            truth[name], tensors[name] = shard_tensors(n, k, gs, rot, bias, rng)
        load(layer, kind, names, tensors)
        x = torch.randn(7, k, generator=rng) * 3 + torch.randn(1, k, generator=rng)  # odd M, skewed
        y = layer.quant_method.apply(layer, x, layer.bias if bias else None)
    want = torch.cat([naive_linear(x, *truth[nm], *(rot or (None, None)), bits, 0.9,
                                   tensors[nm].get("bias")) for nm in names], dim=1)
    # fp32 rotation/epilogue vs float64: rounding at ~1e-6 relative; a rounding-boundary activation can
    # flip by one step, so compare relative to the output scale.
    err = (y.double() - want).abs().max() / want.abs().max()
    assert y.shape == (7, sum(parts))
    assert err < 2e-4, f"max rel err {err:.2e}"


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("gs", [32, -1])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_row_parallel_tp_shards_sum_to_full(tp_size, gs, bits, rng):
    """Row-parallel under TP: each rank loads its K-shard (codes, groups, rotation block, activation
    blocks); the sum of rank outputs (what vLLM's all-reduce computes) equals the unsharded layer."""
    k, n = 256, 48
    rot = rotation_for(k, rng, blocks=4)
    spec = fmt.LayerSpec(act_bits=bits, act_clip=0.9, rotation=(rot[0].shape[0], rot[1].shape[0]), k_blocks=4)
    truth, tens = shard_tensors(n, k, gs, rot, False, rng)
    x = torch.randn(5, k, generator=rng)
    with vllm_layer_env():
        full, names = build("row", k, [n], gs, spec, False)
        load(full, "row", names, {names[0]: tens})
        want = full.quant_method.apply(full, x)
    total = torch.zeros_like(want)
    for r in range(tp_size):
        with vllm_layer_env(r, tp_size):
            layer, names = build("row", k, [n], gs, spec, False, r, tp_size)
            load(layer, "row", names, {names[0]: tens})
            kl = k // tp_size
            total += layer.quant_method.apply(layer, x[:, r * kl:(r + 1) * kl])
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4)
    want64 = naive_linear(x, *truth, *rot, bits, 0.9, None, k_blocks=4)
    assert (want.double() - want64).abs().max() / want64.abs().max() < 2e-4


def test_row_parallel_refuses_mixing_rotation(rng):
    k, n, gs = 256, 16, 64
    rot = rotation_for(k, rng, blocks=1)  # dense left factor: mixes across shards
    spec = fmt.LayerSpec(act_bits=8, act_clip=1.0, rotation=(16, 16), k_blocks=2)
    _, tens = shard_tensors(n, k, gs, rot, False, rng)
    with vllm_layer_env(0, 2):
        layer, names = build("row", k, [n], gs, spec, False, 0, 2)
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*input_rot_left.*k_blocks=2"):
            load(layer, "row", names, {names[0]: tens})


def test_tp_must_divide_k_blocks():
    spec = fmt.LayerSpec(act_bits=8, act_clip=1.0, k_blocks=1)
    with vllm_layer_env(0, 2):
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*tensor parallel size 2.*k_blocks=1"):
            build("row", 256, [16], 64, spec, False, 0, 2)


def test_invalid_code_named(rng):
    spec = fmt.LayerSpec(act_bits=8)
    _, tens = shard_tensors(32, 128, 64, None, False, rng)
    tens[fmt.WEIGHT_PACKED][3, 2] = -1  # all-ones bits: sixteen codes of 3
    with vllm_layer_env():
        layer, names = build("row", 128, [32], 64, spec, False)
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*weight_packed.*invalid code 3"):
            load(layer, "row", names, {names[0]: tens})


def test_k_not_divisible_by_group_named():
    spec = fmt.LayerSpec()
    with vllm_layer_env():
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*K=192.*group_size=128"):
            build("row", 192, [32], 128, spec, False)


def test_fused_shards_must_agree():
    from twla_vllm.config import TwlaConfig

    qc = fmt.CheckpointConfig(layers={"a.q_proj": fmt.LayerSpec(act_bits=4), "a.k_proj": fmt.LayerSpec(act_bits=8),
                                      "a.v_proj": fmt.LayerSpec(act_bits=4)})
    with pytest.raises(fmt.FormatError, match="a.q_proj.*fused"):
        TwlaConfig(qc).layer_spec("a.qkv_proj")


def test_ignored_layer_is_unquantized():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    with vllm_layer_env():
        from vllm.model_executor.layers.linear import RowParallelLinear

        from twla_vllm.config import TwlaConfig

        cfg = TwlaConfig(fmt.CheckpointConfig(ignore=["lm_head", "re:.*layers\\.0\\.mlp\\.down_proj"]))
        layer = RowParallelLinear(128, 64, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
        assert isinstance(layer.quant_method, UnquantizedLinearMethod)
        layer = RowParallelLinear(128, 64, quant_config=cfg, prefix="model.layers.1.mlp.down_proj")
        assert not isinstance(layer.quant_method, UnquantizedLinearMethod)
