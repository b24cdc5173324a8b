"""TWLA checkpoint format v1: the one contract between the offline quantizer and the vLLM plugin.

A TWLA checkpoint is a Hugging Face model directory (config.json, tokenizer files, *.safetensors; never
pickle). `config.json["quantization_config"]` holds a `TwlaConfig` dict (see `CheckpointConfig`), and
every quantized linear `P` (HF module path, e.g. `model.layers.0.self_attn.q_proj`) stores:

    P.weight_packed  int32  [N, K/16]  ternary codes c = t + 1 in {0,1,2}, 16 per word, K-major
    P.weight_scale   fp16   [N, G]     alpha per (row, K-group); G = K / group_size (1 if per row)
    P.weight_offset  fp16   [N, G]     mu per (row, K-group):  W_hat = alpha * t + mu
    P.input_rot_left  fp32  [n1, n1]   (only if the layer has a rotation) left Kronecker factor C
    P.input_rot_right fp32  [n2, n2]   right factor B, n1 * n2 = K
    P.bias                              unchanged, when the model has one

The activation of a rotated layer is transformed online as x' = vec(C @ x.reshape(n1, n2) @ B); the
weight side of that rotation is already folded into the codes, so W_hat @ x' approximates W @ x.

Packing ("int32-2bit-bytelane"): code k of a row lives in word k // 16; inside the word, with
j = k % 16, lane i = j // 4 and byte b = j % 4, it sits at bit 8*b + 2*i. Then (w >> 2*i) & 0x03030303
yields four consecutive codes as four bytes, which is what GPU kernels decode with one AND.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

QUANT_METHOD = "twla"
FORMAT_VERSION = 1
PACKING = "int32-2bit-bytelane"
CODES_PER_WORD = 16
WEIGHT_CODES_SUPPORTED = ("ternary",)
WEIGHT_CODES_RESERVED = ("binary", "int4")  # sibling modes (BWLA, TwinQuant); not readable by v1
ACT_BITS_ALLOWED = (2, 3, 4, 5, 6, 7, 8, 16)  # 16 = activations left in floating point
SCALE_DTYPE = torch.float16
ROTATION_DTYPE = torch.float32

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_OFFSET = "weight_offset"
ROT_LEFT = "input_rot_left"
ROT_RIGHT = "input_rot_right"
QUANT_TENSOR_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_OFFSET, ROT_LEFT, ROT_RIGHT)

# vLLM runs these HF linears as one fused module: they share one input, so one activation setting
# and one rotation must hold for all shards of a group.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FormatError(ValueError):
    """A TWLA checkpoint or config that violates format v1; the message names file/tensor/key."""


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
# index j (0..15) inside a word -> bit position: j = 4*i + b -> 8*b + 2*i
_BIT_OF_J = torch.tensor([8 * (j % 4) + 2 * (j // 4) for j in range(16)], dtype=torch.int64)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {0,1,2} ([N, K], K % 16 == 0) into int32 [N, K/16] (byte-lane layout)."""
    if codes.dim() != 2 or codes.shape[1] % CODES_PER_WORD:
        raise FormatError(f"pack_codes needs [N, K] with K % 16 == 0, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 2):
        raise FormatError("pack_codes: codes must lie in {0, 1, 2} (ternary t + 1)")
    n, k = c.shape
    words = (c.view(n, k // CODES_PER_WORD, CODES_PER_WORD) << _BIT_OF_J.to(c.device)).sum(-1)
    # values < 2**32; reinterpret the unsigned 32-bit pattern as int32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [N, W] -> uint8 codes [N, 16*W] (values 0..3; 3 is invalid)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> _BIT_OF_J.to(w.device)) & 3
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix t in {-1,0,1} as biased codes t + 1."""
    return pack_codes(t.to(torch.int64) + 1)


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """int32 packed -> int8 t in {-1,0,1}. Raises FormatError if any code is 3."""
    codes = unpack_codes(packed)
    if bool((codes == 3).any()):
        raise FormatError("packed ternary codes contain the invalid code 3 (valid: 0, 1, 2)")
    return codes.to(torch.int8) - 1


def linear_tensors(prefix: str, t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, named and typed as format v1 requires."""
    out = {f"{prefix}.{WEIGHT_PACKED}": pack_ternary(t.cpu()),
           f"{prefix}.{WEIGHT_SCALE}": alpha.detach().cpu().to(SCALE_DTYPE).contiguous(),
           f"{prefix}.{WEIGHT_OFFSET}": mu.detach().cpu().to(SCALE_DTYPE).contiguous()}
    if left is not None:
        out[f"{prefix}.{ROT_LEFT}"] = left.detach().cpu().to(ROTATION_DTYPE).contiguous()
        out[f"{prefix}.{ROT_RIGHT}"] = right.detach().cpu().to(ROTATION_DTYPE).contiguous()
    return out


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


# --------------------------------------------------------------------------------------------
# Config schema
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """Settings of one linear (or one fused group): activation bits/clip and rotation factor sizes."""

    act_bits: int = 4
    act_clip: float = 1.0
    rotation: tuple[int, int] | None = None  # (n1, n2) of the online Kronecker rotation, or None
    # K splits into k_blocks contiguous blocks that never mix: activation ranges are per (token, block)
    # and the rotation's left factor is block-diagonal with k_blocks blocks. A row-parallel layer's
    # input is split across tensor-parallel ranks, so TP size must divide k_blocks; then every rank
    # computes exactly what one GPU would.
    k_blocks: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"act_bits": self.act_bits, "act_clip": self.act_clip,
                "rotation": list(self.rotation) if self.rotation else None, "k_blocks": self.k_blocks}


@dataclass
class CheckpointConfig:
    """`quantization_config` of a TWLA checkpoint, validated."""

    group_size: int = 128
    default: LayerSpec = field(default_factory=LayerSpec)
    layers: dict[str, LayerSpec] = field(default_factory=dict)  # HF module path -> spec
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    weight_code: str = "ternary"
    bits_per_weight: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "weight": {"code": self.weight_code, "packing": PACKING, "group_size": self.group_size,
                       "scale_dtype": "float16", "formula": "W = weight_scale * (code - 1) + weight_offset"},
            "activation": {"scheme": "per-token-asymmetric-dynamic", "bits": self.default.act_bits,
                           "clip": self.default.act_clip},
            "rotation": {"type": "kronecker", "apply": "x' = vec(L @ x.reshape(n1, n2) @ R)",
                         "tensors": [ROT_LEFT, ROT_RIGHT]},
            "layers": {name: spec.to_dict() for name, spec in sorted(self.layers.items())},
            "ignore": list(self.ignore),
            "bits_per_weight": self.bits_per_weight,
            "recipe": self.recipe,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "CheckpointConfig":
        def err(key: str, msg: str) -> FormatError:
            return FormatError(f"{source}: key '{key}': {msg}")

        if not isinstance(d, dict):
            raise FormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if str(d.get("quant_method", "")).lower() != QUANT_METHOD:
            raise err("quant_method", f"expected '{QUANT_METHOD}', got {d.get('quant_method')!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise err("format_version", f"unknown format version {version!r}; this twla_vllm reads "
                      f"version {FORMAT_VERSION} (upgrade twla-vllm or re-export the checkpoint)")
        weight = d.get("weight") or {}
        code = weight.get("code", "ternary")
        if code in WEIGHT_CODES_RESERVED:
            raise err("weight.code", f"'{code}' is reserved for a later mode; v1 reads only 'ternary'")
        if code not in WEIGHT_CODES_SUPPORTED:
            raise err("weight.code", f"unknown weight code {code!r}")
        if weight.get("packing", PACKING) != PACKING:
            raise err("weight.packing", f"unknown packing {weight.get('packing')!r}; expected '{PACKING}'")
        gs = weight.get("group_size", 128)
        if not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % CODES_PER_WORD == 0)):
            raise err("weight.group_size", f"must be -1 (per row) or a positive multiple of 16, got {gs!r}")
        act = d.get("activation") or {}
        default = parse_layer_spec(act, f"{source}: key 'activation'", None)
        layers = {}
        for name, spec in (d.get("layers") or {}).items():
            layers[name] = parse_layer_spec(spec, f"{source}: key 'layers.{name}'", default)
        ignore = d.get("ignore", ["lm_head"])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise err("ignore", "must be a list of module names or 're:' regexes")
        cfg = cls(group_size=gs, default=default, layers=layers, ignore=ignore, weight_code=code,
                  bits_per_weight=d.get("bits_per_weight"), recipe=d.get("recipe") or {})
        cfg.check_fused_groups(source)
        return cfg

    # ---- lookups -----------------------------------------------------------------------------
    def is_ignored(self, name: str) -> bool:
        return any(_matches(pat, name) for pat in self.ignore)

    def spec(self, name: str) -> LayerSpec:
        return self.layers.get(name, self.default)

    def check_fused_groups(self, source: str = "quantization_config") -> None:
        """q/k/v (and gate/up) run as one vLLM module: their settings must agree."""
        for shards in FUSED_GROUPS.values():
            seen: dict[str, list[str]] = {}
            for name in self.layers:
                parent, _, leaf = name.rpartition(".")
                if leaf in shards:
                    seen.setdefault(parent, []).append(name)
            for parent, names in seen.items():
                full = [f"{parent}.{s}" for s in shards]
                specs = {self.spec(n) for n in full}
                if len(specs) > 1:
                    raise FormatError(f"{source}: key 'layers': {', '.join(full)} are fused in vLLM and "
                                      f"must share act_bits/act_clip/rotation, got {sorted(map(str, specs))}")
                ignored = {self.is_ignored(n) for n in full}
                if len(ignored) > 1:
                    raise FormatError(f"{source}: key 'ignore': either all or none of {full} may be ignored")


def parse_layer_spec(d: Any, where: str, default: LayerSpec | None) -> LayerSpec:
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object, got {d!r}")
    base = default or LayerSpec()
    bits = d.get("act_bits", d.get("bits", base.act_bits))
    clip = d.get("act_clip", d.get("clip", base.act_clip))
    rot = d.get("rotation", base.rotation if default is None else None)
    k_blocks = d.get("k_blocks", 1)
    if not isinstance(k_blocks, int) or k_blocks < 1:
        raise FormatError(f"{where}: k_blocks must be a positive int, got {k_blocks!r}")
    if bits not in ACT_BITS_ALLOWED:
        raise FormatError(f"{where}: act_bits must be one of {ACT_BITS_ALLOWED}, got {bits!r}")
    if not isinstance(clip, (int, float)) or not 0.0 < float(clip) <= 1.0:
        raise FormatError(f"{where}: act_clip must be in (0, 1], got {clip!r}")
    if rot is not None:
        if (not isinstance(rot, (list, tuple)) or len(rot) != 2
                or not all(isinstance(v, int) and v > 0 for v in rot)):
            raise FormatError(f"{where}: rotation must be null or [n1, n2] positive ints, got {rot!r}")
        rot = (int(rot[0]), int(rot[1]))
    return LayerSpec(act_bits=int(bits), act_clip=float(clip), rotation=rot, k_blocks=k_blocks)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


# --------------------------------------------------------------------------------------------
# Expected tensors of one quantized linear
# --------------------------------------------------------------------------------------------
def expected_tensors(spec: LayerSpec, out_features: int, in_features: int,
                     group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """suffix -> (shape, dtype) of every tensor a quantized linear must store (bias excluded)."""
    g = num_groups(in_features, group_size)
    out = {
        WEIGHT_PACKED: ((out_features, in_features // CODES_PER_WORD), torch.int32),
        WEIGHT_SCALE: ((out_features, g), SCALE_DTYPE),
        WEIGHT_OFFSET: ((out_features, g), SCALE_DTYPE),
    }
    if spec.rotation is not None:
        n1, n2 = spec.rotation
        out[ROT_LEFT] = ((n1, n1), ROTATION_DTYPE)
        out[ROT_RIGHT] = ((n2, n2), ROTATION_DTYPE)
    return out


def check_linear_shape(name: str, spec: LayerSpec, in_features: int, group_size: int) -> None:
    """K must split into whole words, whole groups and the rotation's n1*n2."""
    if in_features % CODES_PER_WORD:
        raise FormatError(f"{name}: in_features K={in_features} is not divisible by the pack factor 16")
    if group_size != -1 and in_features % group_size:
        raise FormatError(f"{name}: in_features K={in_features} is not divisible by group_size={group_size} "
                          f"(use a group size dividing K, or -1 for per-row scales)")
    if spec.rotation is not None and spec.rotation[0] * spec.rotation[1] != in_features:
        raise FormatError(f"{name}: rotation {list(spec.rotation)} has n1*n2={math.prod(spec.rotation)} "
                          f"!= in_features {in_features}")
    kb = spec.k_blocks
    if kb > 1:
        block = in_features // kb
        if in_features % kb or block % CODES_PER_WORD or (group_size != -1 and block % group_size):
            raise FormatError(f"{name}: k_blocks={kb} must split K={in_features} into blocks that are whole "
                              f"multiples of 16{'' if group_size == -1 else f' and of group_size={group_size}'}")
        if spec.rotation is not None and spec.rotation[0] % kb:
            raise FormatError(f"{name}: k_blocks={kb} does not divide the rotation's n1={spec.rotation[0]}")


def bits_per_weight(out_features: int, in_features: int, group_size: int,
                    rotation: tuple[int, int] | None, rotation_shared_by: int = 1) -> float:
    """Storage bits per weight including scales/offsets and this layer's share of its rotation."""
    g = num_groups(in_features, group_size)
    bits = 2 * out_features * in_features + 2 * 16 * out_features * g
    if rotation is not None:
        bits += 32 * (rotation[0] ** 2 + rotation[1] ** 2) / rotation_shared_by
    return bits / (out_features * in_features)


# --------------------------------------------------------------------------------------------
# Whole-checkpoint validation (header-only: no tensor data is read)
# --------------------------------------------------------------------------------------------
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
    """Check a checkpoint directory against format v1 from the safetensors headers alone.

    Catches: missing/unknown/mis-shaped/mis-typed tensors of quantized layers, K not divisible by the
    pack factor or group size, rotation sizes that do not match K, per-layer settings for layers that
    are not in the checkpoint, pickle weight files. Code values are checked when the weights load.
    """
    config = config or read_config(model_dir)
    index = read_tensor_index(model_dir)
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
                              f"[N, K/16], got shape {list(shape)}")
        n, k = shape[0], shape[1] * CODES_PER_WORD
        spec = config.spec(prefix)
        check_linear_shape(prefix, spec, k, config.group_size)
        if config.is_ignored(prefix):
            raise FormatError(f"{model_dir}: layer '{prefix}' is in quantization_config.ignore but stores "
                              f"quantized tensors")
        want = expected_tensors(spec, n, k, config.group_size)
        for suffix, (wshape, wdtype) in want.items():
            if suffix not in tensors:
                raise FormatError(f"{model_dir}: tensor '{prefix}.{suffix}' is missing (required by format v1"
                                  f"{' because the layer has a rotation' if suffix.startswith('input_rot') else ''})")
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
                                  f"'{prefix}.{suffix}' (layer config has rotation={spec.rotation})")
    for name in config.layers:
        if name not in layers:
            raise FormatError(f"{model_dir}/config.json: quantization_config.layers names '{name}', but the "
                              f"checkpoint has no quantized layer with that name")
    if not layers:
        raise FormatError(f"{model_dir}: no quantized layer found (no '*.{WEIGHT_PACKED}' tensors)")
    return config
