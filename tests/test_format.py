"""Format v1: packing round trips and config validation (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twla_vllm import format as fmt


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 37), words=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n, words, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, words * 16), generator=g, dtype=torch.int8)
    packed = fmt.pack_ternary(t)
    assert packed.dtype == torch.int32 and packed.shape == (n, words)
    assert torch.equal(fmt.unpack_ternary(packed), t)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_byte_lane_layout(seed):
    """(w >> 2i) & 0x03030303 yields codes 4i..4i+3 as bytes 0..3 (what GPU kernels rely on)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (1, 16), generator=g)
    w = int(fmt.pack_codes(codes)[0, 0]) & 0xFFFFFFFF
    for i in range(4):
        lane = (w >> (2 * i)) & 0x03030303
        assert [(lane >> (8 * b)) & 0xFF for b in range(4)] == codes[0, 4 * i:4 * i + 4].tolist()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), words=st.integers(1, 4), pos=st.integers(0, 10**6))
def test_code_three_rejected(n, words, pos):
    codes = torch.ones(n, words * 16, dtype=torch.int64)
    packed = fmt.pack_codes(codes)
    flat = pos % codes.numel()
    r, c = divmod(flat, words * 16)
    word = int(packed[r, c // 16]) & 0xFFFFFFFF
    j = c % 16
    word |= 3 << (8 * (j % 4) + 2 * (j // 4))
    packed[r, c // 16] = word - 2**32 if word >= 2**31 else word
    with pytest.raises(fmt.FormatError, match="invalid code 3"):
        fmt.unpack_ternary(packed)


def test_pack_rejects_bad_input():
    with pytest.raises(fmt.FormatError, match="K % 16"):
        fmt.pack_codes(torch.zeros(2, 17, dtype=torch.int64))
    with pytest.raises(fmt.FormatError, match=r"\{0, 1, 2\}"):
        fmt.pack_codes(torch.full((1, 16), 3))


layer_spec = st.builds(fmt.LayerSpec, act_bits=st.sampled_from(fmt.ACT_BITS_ALLOWED),
                       act_clip=st.floats(0.05, 1.0), rotation=st.none() | st.tuples(st.integers(1, 64),
                                                                                    st.integers(1, 64)),
                       k_blocks=st.integers(1, 8))


@settings(max_examples=60, deadline=None)
@given(gs=st.sampled_from([-1, 16, 64, 128]), default=layer_spec,
       layers=st.dictionaries(st.from_regex(r"model\.layers\.[0-9]\.mlp\.down_proj", fullmatch=True), layer_spec,
                              max_size=3))
def test_config_round_trip(gs, default, layers):
    default = fmt.LayerSpec(default.act_bits, default.act_clip, None, 1)
    cfg = fmt.CheckpointConfig(group_size=gs, default=default, layers=layers, bits_per_weight=2.25)
    again = fmt.CheckpointConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.spec("not.listed") == default


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format_version=2), "format_version.*unknown format version 2"),
    (lambda d: d.update(quant_method="awq"), "quant_method"),
    (lambda d: d["weight"].update(code="binary"), "weight.code.*reserved"),
    (lambda d: d["weight"].update(group_size=100), "group_size"),
    (lambda d: d["weight"].update(packing="base3"), "packing"),
    (lambda d: d["activation"].update(bits=9), "act_bits"),
    (lambda d: d["activation"].update(clip=1.5), "act_clip"),
    (lambda d: d["layers"].update({"m.q_proj": {"act_bits": 4, "rotation": [3]}}), "layers.m.q_proj.*rotation"),
    (lambda d: d["layers"].update({"m.q_proj": {"act_bits": 4}, "m.k_proj": {"act_bits": 8}}), "fused"),
    (lambda d: d.update(ignore="lm_head"), "ignore"),
])
def test_config_errors_name_the_key(mutate, match):
    d = fmt.CheckpointConfig().to_dict()
    mutate(d)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.CheckpointConfig.from_dict(d)


def test_bits_per_weight_counts_scales():
    assert fmt.bits_per_weight(4096, 4096, -1, None) == pytest.approx(2 + 32 / 4096)
    assert fmt.bits_per_weight(4096, 4096, 128, None) == pytest.approx(2.25)
