"""Format v2: packing round trips for every weight code, the integer grid, config validation (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twla_vllm import format as fmt

codes = st.sampled_from(sorted(fmt.CODES))


@settings(max_examples=60, deadline=None)
@given(name=codes, n=st.integers(1, 37), words=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(name, n, words, seed):
    code = fmt.CODES[name]
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, code.num_codes, (n, words * code.codes_per_word), generator=g, dtype=torch.int32)
    packed = fmt.pack_codes(c, code)
    assert packed.dtype == torch.int32 and packed.shape == (n, words)
    assert torch.equal(fmt.unpack_codes(packed, code), c)
    assert torch.equal(fmt.pack_values(code.values(c), code), packed)


@settings(max_examples=30, deadline=None)
@given(name=codes, seed=st.integers(0, 2**31 - 1))
def test_byte_lane_layout(name, seed):
    """(w >> B*i) & mask yields codes 4i..4i+3 as bytes 0..3 (what GPU kernels rely on)."""
    code = fmt.CODES[name]
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, code.num_codes, (1, code.codes_per_word), generator=g)
    w = int(fmt.pack_codes(c, code)[0, 0]) & 0xFFFFFFFF
    for i in range(8 // code.bits):
        lane = (w >> (code.bits * i)) & code.lane_mask
        assert [(lane >> (8 * b)) & 0xFF for b in range(4)] == c[0, 4 * i:4 * i + 4].tolist()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), words=st.integers(1, 4), pos=st.integers(0, 10**6))
def test_ternary_code_three_rejected(n, words, pos):
    code = fmt.CODES["ternary"]
    packed = fmt.pack_codes(torch.ones(n, words * 16, dtype=torch.int64), code)
    flat = pos % (n * words * 16)
    r, c = divmod(flat, words * 16)
    word = int(packed[r, c // 16]) & 0xFFFFFFFF
    j = c % 16
    word |= 3 << (8 * (j % 4) + 2 * (j // 4))
    packed[r, c // 16] = word - 2**32 if word >= 2**31 else word
    with pytest.raises(fmt.FormatError, match="invalid code 3"):
        fmt.unpack_codes(packed, code)


def test_pack_rejects_bad_input():
    with pytest.raises(fmt.FormatError, match="K % 16"):
        fmt.pack_codes(torch.zeros(2, 17, dtype=torch.int64), fmt.CODES["ternary"])
    with pytest.raises(fmt.FormatError, match=r"\[0, 2\]"):
        fmt.pack_codes(torch.full((1, 16), 3), fmt.CODES["ternary"])
    with pytest.raises(fmt.FormatError, match="K % 32"):
        fmt.pack_codes(torch.zeros(2, 16, dtype=torch.int64), fmt.CODES["binary"])


@settings(max_examples=60, deadline=None)
@given(name=codes, seed=st.integers(0, 2**31 - 1))
def test_int_grid_check(name, seed):
    """check_int_grid accepts exactly the (a, m) whose every level a*v + m lies in [-127, 127], a >= 0."""
    code = fmt.CODES[name]
    g = torch.Generator().manual_seed(seed)
    qa = torch.randint(-3, 128, (4, 3), generator=g, dtype=torch.int32)
    qm = torch.randint(-127, 128, (4, 3), generator=g, dtype=torch.int32)
    values = code.values(torch.arange(code.num_codes))
    levels = qa.unsqueeze(-1) * values + qm.unsqueeze(-1)
    ok = bool((qa >= 0).all() and levels.abs().max() <= 127)
    if ok:
        fmt.check_int_grid(qa.to(torch.int8), qm.to(torch.int8), code, "x")
    else:
        with pytest.raises(fmt.FormatError, match="x: "):
            fmt.check_int_grid(qa.clamp(-128, 127).to(torch.int8), qm.to(torch.int8), code, "x")


def test_int_weights_dequantize():
    code = fmt.CODES["int4"]
    c = torch.arange(16).repeat(2, 2)  # [2, 32]
    qa = torch.tensor([[3, 1], [2, 0]], dtype=torch.int8)
    qm = torch.tensor([[5, -7], [0, 9]], dtype=torch.int8)
    w = fmt.int_weights(c, qa, qm, code)
    assert w[0, 0] == 3 * (0 - 8) + 5 and w[0, 31] == 1 * (15 - 8) - 7 and w[1, 20] == 9


layer_spec = st.builds(lambda ranges, **kw: fmt.LayerSpec(act_blocks=kw["k_blocks"] * ranges, **kw),
                       act_bits=st.sampled_from(fmt.ACT_BITS_ALLOWED),
                       act_clip=st.floats(0.05, 1.0), rotation=st.none() | st.tuples(st.integers(1, 64),
                                                                                    st.integers(1, 64)),
                       k_blocks=st.integers(1, 8), lowrank_rank=st.integers(0, 64), ranges=st.sampled_from([0, 2, 4]),
                       group_size=st.sampled_from([0, -1, 32, 64]))


@settings(max_examples=60, deadline=None)
@given(gs=st.sampled_from([-1, 16, 64, 128]), default=layer_spec, name=codes,
       layers=st.dictionaries(st.from_regex(r"model\.layers\.[0-9]\.mlp\.down_proj", fullmatch=True), layer_spec,
                              max_size=3))
def test_config_round_trip(gs, default, name, layers):
    default = fmt.LayerSpec(default.act_bits, default.act_clip, None, 1)
    cfg = fmt.CheckpointConfig(group_size=gs, default=default, layers=layers, bits_per_weight=2.25, weight_code=name)
    again = fmt.CheckpointConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.spec("not.listed") == default


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format_version=3), "format_version.*unknown format version 3"),
    (lambda d: d.update(quant_method="awq"), "quant_method"),
    (lambda d: d["weight"].update(code="nf4"), "weight.code.*unknown weight code 'nf4'"),
    (lambda d: d.update(format_version=1) or d["weight"].update(code="binary", packing=fmt.PACKING_V1),
     "weight.code.*'binary' for format version 1"),
    (lambda d: d["weight"].update(group_size=100), "group_size"),
    (lambda d: d["weight"].update(group_size=True), "group_size"),
    (lambda d: d["weight"].update(packing="base3"), "packing"),
    (lambda d: d["activation"].update(bits=9), "act_bits"),
    (lambda d: d["activation"].update(clip=1.5), "act_clip"),
    (lambda d: d["layers"].update({"m.q_proj": {"act_bits": 4, "rotation": [3]}}), "layers.m.q_proj.*rotation"),
    (lambda d: d["layers"].update({"m.q_proj": {"act_bits": 4, "lowrank_rank": -1}}), "lowrank_rank"),
    (lambda d: d["layers"].update({"m.q_proj": {"act_bits": 4}, "m.k_proj": {"act_bits": 8}}), "fused"),
    (lambda d: d["layers"].update({"m.q_proj": {"lowrank_rank": 4}}), "fused"),
    (lambda d: d["layers"].update({"m.gate_proj": {"group_size": 64}}), "fused.*group_size"),
    (lambda d: d["layers"].update({"m.o_proj": {"group_size": 24}}), r"layers.m.o_proj.*group_size must be -1"),
    (lambda d: d["activation"].update(group_size=64), r"activation.group_size.*weight setting"),
    (lambda d: d["layers"].update({"m.o_proj": {"k_blocks": 2, "act_blocks": 3}}),
     r"layers.m.o_proj.*act_blocks=3 must be a multiple of k_blocks=2"),
    (lambda d: d["layers"].update({"m.o_proj": {"act_blocks": -2}}), r"layers.m.o_proj.*act_blocks must be an int"),
    (lambda d: d.update(ignore="lm_head"), "ignore"),
    (lambda d: d.update(groupsize=32), "unknown key.*'groupsize'"),
    (lambda d: d["layers"].update({"m.o_proj": {"actbits": 4}}), r"layers.m.o_proj.*unknown key.*actbits"),
])
def test_config_errors_name_the_key(mutate, match):
    d = fmt.CheckpointConfig().to_dict()
    mutate(d)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.CheckpointConfig.from_dict(d)


def test_bits_per_weight_counts_everything():
    t = fmt.CODES["ternary"]
    assert fmt.bits_per_weight(4096, 4096, -1, t) == pytest.approx(2 + 16 / 4096 + 16 / 4096)
    assert fmt.bits_per_weight(4096, 4096, 32, t) == pytest.approx(2.5 + 16 / 4096)
    assert fmt.bits_per_weight(4096, 4096, 128, fmt.CODES["binary"], lowrank_rank=16) == pytest.approx(
        1 + 16 / 128 + 16 / 4096 + 16 * 16 * 8192 / 4096**2)
