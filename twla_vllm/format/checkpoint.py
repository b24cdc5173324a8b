"""Tensors a quantized linear must have, honest bits/weight, and whole-checkpoint validation."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from .names import (FORMAT_VERSION, FormatError, LOWRANK_A, LOWRANK_B, LOWRANK_DTYPE, QUANT_TENSOR_SUFFIXES,
                    ROTATION_DTYPE, ROT_LEFT, ROT_RIGHT, WEIGHT_GROUP_OFFSET, WEIGHT_GROUP_SCALE, WEIGHT_OFFSET_V1,
                    WEIGHT_PACKED, WEIGHT_SCALE)
from .codes import WeightCode, num_groups
from .config import CheckpointConfig, LayerSpec


def expected_tensors(spec: LayerSpec, out_features: int, in_features: int, group_size: int,
                     code: WeightCode, version: int = FORMAT_VERSION,
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """suffix -> (shape, dtype) of every tensor a quantized linear must store (bias excluded)."""
    g = num_groups(in_features, group_size)
    n, k = out_features, in_features
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        WEIGHT_PACKED: ((n, k // code.codes_per_word), torch.int32)}
    if version == 1:
        out[WEIGHT_SCALE] = ((n, g), torch.float16)
        out[WEIGHT_OFFSET_V1] = ((n, g), torch.float16)
    else:
        out[WEIGHT_SCALE] = ((n, 1), torch.float16)
        out[WEIGHT_GROUP_SCALE] = ((n, g), torch.int8)
        out[WEIGHT_GROUP_OFFSET] = ((n, g), torch.int8)
    if spec.rotation is not None:
        n1, n2 = spec.rotation
        out[ROT_LEFT] = ((n1, n1), ROTATION_DTYPE)
        out[ROT_RIGHT] = ((n2, n2), ROTATION_DTYPE)
    if spec.lowrank_rank:
        out[LOWRANK_A] = ((n, spec.lowrank_rank), LOWRANK_DTYPE)
        out[LOWRANK_B] = ((spec.lowrank_rank, k), LOWRANK_DTYPE)
    return out


def check_linear_shape(name: str, spec: LayerSpec, in_features: int, group_size: int, code: WeightCode) -> None:
    """K must split into whole words, whole groups, the transform's n1*n2 and the k_blocks."""
    cpw = code.codes_per_word
    if in_features % cpw:
        raise FormatError(f"{name}: in_features K={in_features} is not divisible by the {code.name} pack "
                          f"factor {cpw}")
    if group_size != -1 and (in_features % group_size or group_size % cpw):
        raise FormatError(f"{name}: in_features K={in_features} is not divisible by group_size={group_size} "
                          f"(or the group is not a whole number of {cpw}-code words); use a group size dividing "
                          f"K, or -1 for per-row scales")
    if spec.rotation is not None and spec.rotation[0] * spec.rotation[1] != in_features:
        raise FormatError(f"{name}: rotation {list(spec.rotation)} has n1*n2={math.prod(spec.rotation)} "
                          f"!= in_features {in_features}")
    for key, kb in (("k_blocks", spec.k_blocks), ("act_blocks", spec.act_blocks)):
        if kb > 1:
            block = in_features // kb
            if in_features % kb or block % max(cpw, 16) or (group_size != -1 and block % group_size):
                raise FormatError(f"{name}: {key}={kb} must split K={in_features} into blocks that are whole "
                                  f"multiples of {max(cpw, 16)}"
                                  f"{'' if group_size == -1 else f' and of group_size={group_size}'}")
            if spec.rotation is not None and spec.rotation[0] % kb:
                raise FormatError(f"{name}: {key}={kb} does not divide the rotation's n1={spec.rotation[0]}")


def bits_per_weight(out_features: int, in_features: int, group_size: int, code: WeightCode,
                    rotation: tuple[int, int] | None = None, rotation_shared_by: int = 1,
                    lowrank_rank: int = 0) -> float:
    """Storage bits per weight of one v2 linear: codes, int8 group scale + offset, fp16 row scale, its
    share of the transform factors (fp32) and the fp16 low-rank branch."""
    n, k = out_features, in_features
    bits = code.bits * n * k + 16 * n * num_groups(k, group_size) + 16 * n
    if rotation is not None:
        bits += 32 * (rotation[0] ** 2 + rotation[1] ** 2) / rotation_shared_by
    bits += 16 * lowrank_rank * (n + k)
    return bits / (n * k)


_SAFETENSORS_DTYPES = {"I32": torch.int32, "F16": torch.float16, "F32": torch.float32,
                       "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64}


def read_config(model_dir: str) -> CheckpointConfig:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing (a TWLA checkpoint is a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if "quantization_config" not in cfg:
        raise FormatError(f"{path}: no 'quantization_config' key; not a TWLA checkpoint")
    return CheckpointConfig.from_dict(cfg["quantization_config"], source=f"{path}: quantization_config")


def read_tensor_index(model_dir: str) -> dict[str, tuple[str, tuple[int, ...], torch.dtype | str]]:
    """name -> (file, shape, dtype) for every tensor in the directory's safetensors files."""
    import struct

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    pickles = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if not files:
        hint = f" (found pickle file(s) {pickles}; TWLA checkpoints are safetensors only)" if pickles else ""
        raise FormatError(f"{model_dir}: no *.safetensors file{hint}")
    if pickles:
        raise FormatError(f"{os.path.join(model_dir, pickles[0])}: pickle weight files are not allowed in a "
                          "TWLA checkpoint (unsafe to load, and vLLM could pick them up); remove them")
    index: dict[str, tuple[str, tuple[int, ...], torch.dtype | str]] = {}
    for fname in files:
        path = os.path.join(model_dir, fname)
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
                raise FormatError(f"{path}: not a valid safetensors file ({e})") from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(meta["dtype"], meta["dtype"])
            index[name] = (fname, tuple(meta["shape"]), dtype)
    return index


def validate_checkpoint(model_dir: str, config: CheckpointConfig | None = None) -> CheckpointConfig:
    """Check a checkpoint directory against its format version from the safetensors headers alone.

    Catches: missing/unknown/mis-shaped/mis-typed tensors of quantized layers, K not divisible by the
    pack factor or group size, transform sizes that do not match K, per-layer settings for layers that
    are not in the checkpoint, pickle weight files. Code values and the integer grid are checked when
    the weights load.
    """
    config = config or read_config(model_dir)
    index = read_tensor_index(model_dir)
    code = config.code
    layers: dict[str, dict[str, tuple[str, tuple[int, ...], Any]]] = {}
    for name in index:
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANT_TENSOR_SUFFIXES:
            layers[prefix] = {}
    for name, meta in index.items():  # every tensor of a quantized layer, known or not
        prefix, _, suffix = name.rpartition(".")
        if prefix in layers and suffix != "bias":
            layers[prefix][suffix] = meta
    for prefix, tensors in sorted(layers.items()):
        if WEIGHT_PACKED not in tensors:
            some = next(iter(tensors))
            raise FormatError(f"{os.path.join(model_dir, tensors[some][0])}: tensor '{prefix}.{WEIGHT_PACKED}' "
                              f"is missing (found '{prefix}.{some}')")
        fname, shape, _ = tensors[WEIGHT_PACKED]
        if len(shape) != 2:
            raise FormatError(f"{os.path.join(model_dir, fname)}: tensor '{prefix}.{WEIGHT_PACKED}' must be 2-D "
                              f"[N, K/{code.codes_per_word}], got shape {list(shape)}")
        n, k = shape[0], shape[1] * code.codes_per_word
        spec = config.spec(prefix)
        check_linear_shape(prefix, spec, k, config.group_size_of(prefix), code)
        if config.is_ignored(prefix):
            raise FormatError(f"{model_dir}: layer '{prefix}' is in quantization_config.ignore but stores "
                              f"quantized tensors")
        want = expected_tensors(spec, n, k, config.group_size_of(prefix), code, config.version)
        for suffix, (wshape, wdtype) in want.items():
            if suffix not in tensors:
                why = {ROT_LEFT: " because the layer has a rotation", ROT_RIGHT: " because the layer has a rotation",
                       LOWRANK_A: " because lowrank_rank > 0", LOWRANK_B: " because lowrank_rank > 0"}.get(suffix, "")
                raise FormatError(f"{model_dir}: tensor '{prefix}.{suffix}' is missing (required by format "
                                  f"v{config.version}{why})")
            fname, shape, dtype = tensors[suffix]
            where = f"{os.path.join(model_dir, fname)}: tensor '{prefix}.{suffix}'"
            if shape != wshape:
                raise FormatError(f"{where} has shape {list(shape)}, expected {list(wshape)}")
            if dtype != wdtype:
                raise FormatError(f"{where} has dtype {dtype}, expected {wdtype}")
        if "weight" in tensors:
            raise FormatError(f"{os.path.join(model_dir, tensors['weight'][0])}: layer '{prefix}' stores "
                              f"both a dense '.weight' and quantized tensors")
        for suffix in tensors:
            if suffix not in want:
                raise FormatError(f"{os.path.join(model_dir, tensors[suffix][0])}: unexpected tensor "
                                  f"'{prefix}.{suffix}' (layer config: rotation={spec.rotation}, "
                                  f"lowrank_rank={spec.lowrank_rank}, format v{config.version})")
    for name in config.layers:
        if name not in layers:
            raise FormatError(f"{model_dir}/config.json: quantization_config.layers names '{name}', but the "
                              f"checkpoint has no quantized layer with that name")
    if not layers:
        raise FormatError(f"{model_dir}: no quantized layer found (no '*.{WEIGHT_PACKED}' tensors)")
    from ..ct_vocab import validate as validate_ct_keys  # the same checkpoint in compressed-tensors' words

    validate_ct_keys(config, config.extra, f"{model_dir}/config.json: quantization_config")
    return config
