"""TwlaLinearMethod on single vLLM layers: loading (fused shards, TP sharding) and apply() vs math."""

from __future__ import annotations

import pytest
import torch

from twla_offline.rotate import block_diagonal_orthogonal, random_orthogonal
from twla_vllm import format as fmt
from twla_vllm.simulate import QuantWeight

from .conftest import vllm_layer_env


def naive_linear(x, w, left, right, bits, clip, bias, k_blocks=1, lowrank=None):
    """Independent float64 definition: dequantized W, fake-quantized transformed x, plain matmul."""
    x0 = x = x.double()
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
    y = x @ w.dequantize().double().t()
    if lowrank is not None:
        y = y + (x0 @ lowrank[1].double().t()) @ lowrank[0].double().t()
    return y if bias is None else y + bias.double()


def random_shard(n, k, gs, gen, code="ternary"):
    from twla_offline.weights import fit_rtn

    return fit_rtn(torch.randn(n, k, generator=gen) * 0.05, fmt.CODES[code], gs)


def rotation_for(k, gen, blocks=1):
    n1, n2 = {128: (8, 16), 256: (16, 16), 384: (16, 24)}[k]
    left = block_diagonal_orthogonal(n1, blocks, gen) if blocks > 1 else random_orthogonal(n1, gen)
    return left, random_orthogonal(n2, gen)


def build(kind, k, n_parts, gs, spec, bias, tp_rank=0, tp_size=1, code="ternary", version=2):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from twla_vllm.config import TwlaConfig

    shards = {"qkv": ["q_proj", "k_proj", "v_proj"], "gate_up": ["gate_proj", "up_proj"], "row": ["down_proj"]}[kind]
    qc = fmt.CheckpointConfig(group_size=gs, layers={f"blk.{s}": spec for s in shards}, weight_code=code,
                              version=version)
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


def shard_tensors(n, k, gs, rot, bias, gen, code="ternary", rank=0):
    w = random_shard(n, k, gs, gen, code)
    lowrank = None
    if rank:
        lowrank = ((torch.randn(n, rank, generator=gen) * 0.05).half(), (torch.randn(rank, k, generator=gen) * 0.05).half())
    tens = {name.rpartition(".")[2]: t for name, t in fmt.linear_tensors(
        "p", w.codes, w.code, w.row_scale, w.group_scale, w.group_offset, *(rot or (None, None)),
        *(lowrank or (None, None))).items()}
    if bias:
        tens["bias"] = torch.randn(n, generator=gen)
    return (w, lowrank), tens


@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("gs,code,rank", [(128, "ternary", 0), (-1, "ternary", 0), (64, "binary", 8),
                                          (32, "int4", 4)])
@pytest.mark.parametrize("kind,rotated", [(k, r) for k in ("qkv", "gate_up", "row")
                                          for r in ("none", "shared", "per-linear")
                                          if not (k == "row" and r == "per-linear")])  # one linear, one transform
def test_apply_matches_reference(kind, bits, gs, code, rank, rotated, rng):
    k = 256 if kind != "row" else 384 if gs == -1 else 256
    parts = {"qkv": [128, 64, 64], "gate_up": [96, 96], "row": [80]}[kind]
    bias = kind != "row" or bits == 4  # bias on every kind at least once
    rots = [rotation_for(k, rng) if rotated != "none" else None]
    rots += [rotation_for(k, rng) if rotated == "per-linear" else rots[0] for _ in parts[1:]]
    spec = fmt.LayerSpec(act_bits=bits, act_clip=0.9, rotation=None if rots[0] is None else
                         (rots[0][0].shape[0], rots[0][1].shape[0]), lowrank_rank=rank)
    with vllm_layer_env():
        layer, names = build(kind, k, parts, gs, spec, bias, code=code)
        truth, tensors = {}, {}
        for name, n, rot in zip(names, parts, rots):
            truth[name], tensors[name] = shard_tensors(n, k, gs, rot, bias, rng, code, rank)
        load(layer, kind, names, tensors)
        assert layer.quant_method.kernel.spec.per_shard_rotation == (rotated == "per-linear")
        x = torch.randn(7, k, generator=rng) * 3 + torch.randn(1, k, generator=rng)  # odd M, skewed
        y = layer.quant_method.apply(layer, x, layer.bias if bias else None)
    want = torch.cat([naive_linear(x, truth[nm][0], *(rot or (None, None)), bits, 0.9, tensors[nm].get("bias"),
                                   lowrank=truth[nm][1]) for nm, rot in zip(names, rots)], dim=1)
    # fp32 transform/epilogue vs float64: rounding at ~1e-6 relative. An activation within ~1e-6 of a rounding
    # boundary may land one step away in one of the two, which moves that token's outputs by at most s_x * max|w|:
    # allow it for at most one token (two flips), every other token must agree to rounding.
    assert y.shape == (7, sum(parts))
    flip = max(step_bound(x, rot, bits, 0.9) * truth[nm][0].dequantize().abs().max().item()
               for nm, rot in zip(names, rots)) if bits < 16 else 0.0
    row_err = (y.double() - want).abs().amax(dim=1)
    off = row_err > 2e-4 * want.abs().max()
    assert off.sum() <= 1 and (row_err[off] <= 2 * flip).all(), f"token errors {row_err.tolist()}, flip {flip:.2e}"


def step_bound(x, rot, bits, clip):
    """The largest activation step s of any token (transformed as the layer does)."""
    x = x.double()
    if rot is not None:
        n1, n2 = rot[0].shape[0], rot[1].shape[0]
        x = (rot[0].double() @ x.reshape(-1, n1, n2) @ rot[1].double()).reshape(x.shape)
    return ((x.amax(-1) - x.amin(-1)) * clip / (2**bits - 1)).max().item()


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
    want64 = naive_linear(x, truth[0], *rot, bits, 0.9, None, k_blocks=4)
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


@pytest.mark.parametrize("tp_size", [1, 2])
def test_activation_ranges_finer_than_transform_blocks(tp_size, rng):
    """act_blocks = 8 ranges over k_blocks = 2 transform blocks: each rank transforms its block and quantizes it
    in 4 ranges of 32 channels; the ranks' outputs sum to the float64 definition with 8 ranges per token."""
    k, n, gs = 256, 48, 32
    rot = rotation_for(k, rng, blocks=2)
    spec = fmt.LayerSpec(act_bits=4, act_clip=0.9, rotation=(rot[0].shape[0], rot[1].shape[0]), k_blocks=2,
                         act_blocks=8)
    fmt.check_linear_shape("blk.down_proj", spec, k, gs, fmt.CODES["ternary"])
    truth, tens = shard_tensors(n, k, gs, rot, False, rng)
    x = torch.randn(5, k, generator=rng) * 2 + torch.randn(1, k, generator=rng)
    total = torch.zeros(5, n, dtype=torch.float64)
    for r in range(tp_size):
        with vllm_layer_env(r, tp_size):
            layer, names = build("row", k, [n], gs, spec, False, r, tp_size)
            load(layer, "row", names, {names[0]: tens})
            assert layer.quant_method.kernel.spec.act_blocks == 8 // tp_size
            kl = k // tp_size
            total += layer.quant_method.apply(layer, x[:, r * kl:(r + 1) * kl]).double()
    want = naive_linear(x, truth[0], *rot, 4, 0.9, None, k_blocks=8)
    coarse = naive_linear(x, truth[0], *rot, 4, 0.9, None, k_blocks=2)
    err = (total - want).abs().max() / want.abs().max()
    assert err < 2e-4, err
    assert (coarse - want).abs().max() / want.abs().max() > 1e-2  # the ranges matter: 2 would not pass


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


def test_integer_grid_violation_named(rng):
    spec = fmt.LayerSpec(act_bits=8)
    _, tens = shard_tensors(32, 128, 64, None, False, rng)
    tens[fmt.WEIGHT_GROUP_SCALE][1, 0] = 100
    tens[fmt.WEIGHT_GROUP_OFFSET][1, 0] = 100  # a + m > 127
    with vllm_layer_env():
        layer, names = build("row", 128, [32], 64, spec, False)
        with pytest.raises(fmt.FormatError, match=r"blk\.down_proj.*\[-127, 127\]"):
            load(layer, "row", names, {names[0]: tens})


@pytest.mark.parametrize("kind", ["qkv", "row"])
def test_v1_checkpoint_layers_load_on_the_v2_grid(kind, rng):
    """Format v1 (fp16 alpha/mu per group) loads through `format.upgrade_v1`, as the simulation does."""
    k, gs = 256, 64
    parts = {"qkv": [128, 64, 64], "row": [80]}[kind]
    spec = fmt.LayerSpec(act_bits=4, act_clip=0.9)
    v1, truth = {}, {}
    with vllm_layer_env():
        layer, names = build(kind, k, parts, gs, spec, False, version=1)
        for name, n in zip(names, parts):
            t = torch.randint(-1, 2, (n, k), generator=rng)
            alpha = ((torch.rand(n, k // gs, generator=rng) - 0.2) * 0.1).half()  # some negative: codes flip
            mu = (torch.randn(n, k // gs, generator=rng) * 0.01).half()
            v1[name] = {fmt.WEIGHT_PACKED: fmt.pack_values(t, fmt.CODES["ternary"]), fmt.WEIGHT_SCALE: alpha,
                        fmt.WEIGHT_OFFSET_V1: mu}
            codes, s, qa, qm = fmt.upgrade_v1(t, alpha, mu)
            truth[name] = QuantWeight(codes, fmt.CODES["ternary"], s.reshape(-1), qa, qm)
            exact = (t.double().view(n, -1, gs) * alpha.double()[..., None] + mu.double()[..., None]).view(n, k)
            lvl = (alpha.double().abs() + mu.double().abs()).amax(1, keepdim=True)
            assert ((truth[name].dequantize().double() - exact).abs() <= 2 * lvl / 127 * 1.001).all()  # 2 grid steps
        load(layer, kind, names, v1)
        x = torch.randn(5, k, generator=rng)
        y = layer.quant_method.apply(layer, x)
    want = torch.cat([naive_linear(x, truth[nm], None, None, 4, 0.9, None) for nm in names], dim=1)
    assert (y.double() - want).abs().max() / want.abs().max() < 2e-4


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


def test_transform_factors_stay_float32_in_a_bf16_model(rng):
    """vLLM creates weights under the model dtype as torch's default dtype: the transform factors must still be
    allocated (and kept) in float32, bit-equal to the checkpoint (a bf16 factor rounds every rotated activation,
    and the CUDA transform kernel refused mixed fp32/bf16 operands: found serving a bf16 model on the H100)."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    k, parts = 256, [96, 96]
    rot = rotation_for(k, rng)
    spec = fmt.LayerSpec(act_bits=4, act_clip=0.9, rotation=(rot[0].shape[0], rot[1].shape[0]))
    with vllm_layer_env(), set_default_torch_dtype(torch.bfloat16):
        layer, names = build("gate_up", k, parts, 32, spec, False)
        assert layer.input_rot_left.dtype == layer.input_rot_right.dtype == torch.float32
        tensors = {name: shard_tensors(n, k, 32, rot, False, rng)[1] for name, n in zip(names, parts)}
        load(layer, "gate_up", names, tensors)
    assert layer.twla_left.dtype == torch.float32
    assert torch.equal(layer.twla_left.reshape(-1, *rot[0].shape)[0], rot[0].float())
    assert torch.equal(layer.twla_right.reshape(-1, *rot[1].shape)[0], rot[1].float())


@pytest.mark.parametrize("k_blocks", [1, 2])
def test_simulated_fp_group_scales_below_16_bits(k_blocks, rng):
    """Format v1's fp16 alpha/mu (simulation only, the groups ladder's comparison) through SimTwlaLinear at A4
    equals the float64 definition: the zero-point term must use the real row sums of non-integer weights."""
    from twla_vllm.simulate import QuantWeight, SimTwlaLinear

    w = random_shard(48, 256, 32, rng)
    s = w.row_scale.float().reshape(-1, 1)
    fp = QuantWeight(w.codes, w.code, torch.ones(48), w.group_scale.float() * s, w.group_offset.float() * s)
    x = torch.randn(5, 256, generator=rng) * 2 + 0.5
    y = SimTwlaLinear(fp, None, None, 4, 0.9, act_ranges=k_blocks)(x)
    want = naive_linear(x, fp, None, None, 4, 0.9, None, k_blocks=k_blocks)
    assert (y.double() - want).abs().max() <= 1e-4 * want.abs().max()
