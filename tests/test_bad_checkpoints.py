"""Bad checkpoints fail with a clear error naming the file, tensor or key (never inside a kernel)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from twla_vllm import format as fmt

from .helpers import run_vllm

LAYER = "model.layers.0.mlp.down_proj"


def corrupt(src: str, dst: str, tensors=None, config=None, extra_file=None) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    if tensors:
        d = load_file(path)
        tensors(d)
        save_file(d, path)
    if config:
        cpath = os.path.join(dst, "config.json")
        with open(cpath) as f:
            c = json.load(f)
        config(c["quantization_config"])
        with open(cpath, "w") as f:
            json.dump(c, f)
    if extra_file:
        torch.save({"x": torch.zeros(1)}, os.path.join(dst, extra_file))
    return dst


CASES = {
    "missing_tensor": (dict(tensors=lambda d: d.pop(f"{LAYER}.weight_scale")),
                       rf"tensor '{LAYER}\.weight_scale' is missing"),
    "extra_tensor": (dict(tensors=lambda d: d.update({f"{LAYER}.weight_zero": torch.zeros(3)})),
                     rf"model\.safetensors: unexpected tensor '{LAYER}\.weight_zero'"),
    "wrong_shape": (dict(tensors=lambda d: d.update({f"{LAYER}.weight_group_scale": torch.zeros(128, 5,
                                                                                                 dtype=torch.int8)})),
                    rf"model\.safetensors: tensor '{LAYER}\.weight_group_scale' has shape \[128, 5\], "
                    rf"expected \[128, 4\]"),
    "wrong_dtype": (dict(tensors=lambda d: d.update({f"{LAYER}.weight_group_offset":
                                                     d[f"{LAYER}.weight_group_offset"].float()})),
                    rf"tensor '{LAYER}\.weight_group_offset' has dtype torch.float32, expected torch.int8"),
    "v1_tensor_in_v2": (dict(tensors=lambda d: d.update({f"{LAYER}.weight_offset": torch.zeros(128, 4).half()})),
                        rf"unexpected tensor '{LAYER}\.weight_offset'.*format v2"),
    "unknown_config_key": (dict(config=lambda q: q.update(grop_size=32)),
                           r"quantization_config: unknown key\(s\) 'grop_size'"),
    "unknown_weight_key": (dict(config=lambda q: q["weight"].update(gruop_size=32)),
                           r"unknown key\(s\) 'weight\.gruop_size'"),
    "unknown_layer_key": (dict(config=lambda q: q["layers"][LAYER].update(act_bit=4)),
                          rf"layers\.{LAYER}': unknown key\(s\) \['act_bit'\]"),
    "lowrank_missing": (dict(config=lambda q: q["layers"][LAYER].update(lowrank_rank=8)),
                        rf"tensor '{LAYER}\.lowrank_a' is missing.*lowrank_rank > 0"),
    "unknown_version": (dict(config=lambda q: q.update(format_version=7)),
                        r"config\.json: quantization_config: key 'format_version': unknown format version 7"),
    "group_not_dividing_k": (dict(config=lambda q: q["weight"].update(group_size=48)),
                             r"K=\d+ is not divisible by group_size=48"),
    "unknown_layer_in_config": (dict(config=lambda q: q["layers"].update(
        {"model.layers.9.mlp.down_proj": {"act_bits": 4}})),
        r"config\.json: quantization_config\.layers names 'model\.layers\.9\.mlp\.down_proj'"),
    "pickle_bin": (dict(extra_file="pytorch_model.bin"), r"pytorch_model\.bin: pickle weight files are not allowed"),
    "rotation_size_mismatch": (dict(config=lambda q: q["layers"][LAYER].update(rotation=[8, 16])),
                               rf"{LAYER}: rotation \[8, 16\] has n1\*n2=128"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_checkpoint_names_the_problem(case, synthetic_dirs, tmp_path):
    kwargs, match = CASES[case]
    bad = corrupt(synthetic_dirs["llama"], str(tmp_path / case), **kwargs)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.validate_checkpoint(bad)


def test_k_not_divisible_by_pack_factor():
    with pytest.raises(fmt.FormatError, match="m.q_proj: in_features K=100 is not divisible by the ternary pack"):
        fmt.check_linear_shape("m.q_proj", fmt.LayerSpec(), 100, -1, fmt.CODES["ternary"])
    with pytest.raises(fmt.FormatError, match="m.q_proj: in_features K=48 is not divisible by the binary pack"):
        fmt.check_linear_shape("m.q_proj", fmt.LayerSpec(), 48, -1, fmt.CODES["binary"])


@pytest.mark.vllm
def test_codes_outside_range_found_at_load(synthetic_dirs, tmp_path):
    """Header validation cannot see code values: the loader checks them, in the real engine."""
    def poison(d):
        d[f"{LAYER}.weight_packed"][5, 1] = -1  # all bits set = code 3 everywhere in the word
    bad = corrupt(synthetic_dirs["llama"], str(tmp_path / "codes"), tensors=poison)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_packed.*invalid code 3"):
        run_vllm(model=bad, prompts=["x"], enforce_eager=True)


@pytest.mark.vllm
@pytest.mark.parametrize("case", ["missing_tensor", "unknown_version", "pickle_bin"])
def test_real_vllm_reports_the_problem(case, synthetic_dirs, tmp_path):
    kwargs, match = CASES[case]
    bad = corrupt(synthetic_dirs["llama"], str(tmp_path / case), **kwargs)
    with pytest.raises(RuntimeError, match=match):
        run_vllm(model=bad, prompts=["x"], enforce_eager=True)
