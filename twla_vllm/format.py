"""TWLA checkpoint format v2: the one contract between the offline quantizer and the vLLM plugin.

A TWLA checkpoint is a Hugging Face model directory (config.json, tokenizer files, *.safetensors; never
pickle). `config.json["quantization_config"]` holds a `CheckpointConfig` dict, and every quantized
linear `P` (HF module path, e.g. `model.layers.0.self_attn.q_proj`) stores:

    P.weight_packed        int32 [N, K*B/32]  B-bit codes c of the weight code, 32/B per word, K-major
    P.weight_scale         fp16  [N, 1]       s_n, one per output row
    P.weight_group_scale   int8  [N, G]       a (>= 0) per (row, K-group); G = K / group_size
    P.weight_group_offset  int8  [N, G]       m per (row, K-group)
    P.input_rot_left       fp32  [n1, n1]     (if the layer has an online transform) left Kronecker factor
    P.input_rot_right      fp32  [n2, n2]     right factor, n1 * n2 = K
    P.lowrank_a            fp16  [N, r]       (if the layer has a low-rank branch) ...
    P.lowrank_b            fp16  [r, K]       ... y += lowrank_a @ (lowrank_b @ x), x = the layer's input
    P.bias                                    unchanged, when the model has one

    W_hat[n, k] = s_n * (a[n, g] * v(c[n, k]) + m[n, g]),   g = k // group_size

v(c) is the code's value: ternary c - 1 in {-1, 0, 1} (B = 2), binary 2c - 1 in {-1, 1} (B = 1), int4 c - 8
in [-8, 7] (B = 4). Every integer weight a*v + m lies in [-127, 127], so a kernel builds an int8 weight tile
with one multiply-add per code and runs plain int8 x int8 -> int32 dots over all of K; s_n and the activation
scale go to the epilogue. The activation of a transformed layer is x' = vec(L @ x.reshape(n1, n2) @ R) online
(the weight side is folded into the codes); the low-rank branch reads the untransformed x.

Packing ("int32-bytelane", any B in {1, 2, 4}): code j of a word sits at bit 8*(j % 4) + B*(j // 4), so
(w >> B*i) & ((2**B - 1) * 0x01010101) yields codes 4i..4i+3 as the four bytes of an int32.

Format v1 (fp16 alpha/mu per group, ternary only) still loads: `upgrade_v1` projects it onto v2's integer
grid, identically in simulation and serving.
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
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PACKING = "int32-bytelane"
PACKING_V1 = "int32-2bit-bytelane"
ACT_BITS_ALLOWED = (2, 3, 4, 5, 6, 7, 8, 16)  # 16 = activations left in floating point
INT_WEIGHT_MAX = 127  # |a*v + m| bound: int8 tiles, and a +128 bias keeps every byte in [1, 255]
LOWRANK_DTYPE = torch.float16
ROTATION_DTYPE = torch.float32

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"  # v2: fp16 [N, 1] row scale; v1: fp16 [N, G] alpha
WEIGHT_GROUP_SCALE = "weight_group_scale"
WEIGHT_GROUP_OFFSET = "weight_group_offset"
WEIGHT_OFFSET_V1 = "weight_offset"
ROT_LEFT = "input_rot_left"
ROT_RIGHT = "input_rot_right"
LOWRANK_A = "lowrank_a"
LOWRANK_B = "lowrank_b"
QUANT_TENSOR_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_GROUP_SCALE, WEIGHT_GROUP_OFFSET, WEIGHT_OFFSET_V1,
                         ROT_LEFT, ROT_RIGHT, LOWRANK_A, LOWRANK_B)

# vLLM runs these HF linears as one fused module: they share one input, so activation bits, transform sizes
# and low-rank rank must agree across a group (transform values may differ: per-linear transforms).
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FormatError(ValueError):
    """A TWLA checkpoint or config that violates the format; the message names file/tensor/key."""


# --------------------------------------------------------------------------------------------
# Weight codes and packing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightCode:
    """A stored code c in [0, num_codes) stands for the value v(c) = step * c - offset."""

    name: str
    bits: int
    step: int
    offset: int
    num_codes: int

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def lane_mask(self) -> int:
        return (2**self.bits - 1) * 0x01010101

    @property
    def vmin(self) -> int:
        return -self.offset

    @property
    def vmax(self) -> int:
        return self.step * (self.num_codes - 1) - self.offset

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int32) * self.step - self.offset

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.to(torch.int32) + self.offset) // self.step).to(torch.int32)


CODES: dict[str, WeightCode] = {
    "ternary": WeightCode("ternary", bits=2, step=1, offset=1, num_codes=3),  # TWLA
    "binary": WeightCode("binary", bits=1, step=2, offset=1, num_codes=2),  # BWLA
    "int4": WeightCode("int4", bits=4, step=1, offset=8, num_codes=16),  # TwinQuant residual
}


def _bit_positions(code: WeightCode) -> torch.Tensor:
    j = torch.arange(code.codes_per_word, dtype=torch.int64)
    return 8 * (j % 4) + code.bits * (j // 4)


def pack_codes(codes: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """Codes in [0, num_codes) ([N, K], K % codes_per_word == 0) -> int32 [N, K / codes_per_word]."""
    cpw = code.codes_per_word
    if codes.dim() != 2 or codes.shape[1] % cpw:
        raise FormatError(f"pack_codes: {code.name} needs [N, K] with K % {cpw} == 0, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= code.num_codes):
        raise FormatError(f"pack_codes: {code.name} codes must lie in [0, {code.num_codes - 1}]")
    n, k = c.shape
    words = (c.view(n, k // cpw, cpw) << _bit_positions(code).to(c.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # unsigned 32-bit pattern as int32
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, code: WeightCode, name: str = "weight_packed") -> torch.Tensor:
    """Inverse of `pack_codes` -> int32 codes [N, K]; raises FormatError on a code >= num_codes."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> _bit_positions(code).to(w.device)) & (2**code.bits - 1)
    codes = codes.reshape(packed.shape[0], -1).to(torch.int32)
    if code.num_codes < 2**code.bits and bool((codes >= code.num_codes).any()):
        raise FormatError(f"{name}: packed {code.name} codes contain the invalid code "
                          f"{int(codes.max())} (valid: 0..{code.num_codes - 1})")
    return codes


def pack_values(v: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """Pack integer values v(c) (e.g. a ternary matrix in {-1, 0, 1})."""
    return pack_codes(code.codes(v), code)


# --------------------------------------------------------------------------------------------
# Integer group scales
# --------------------------------------------------------------------------------------------
def check_int_grid(qa: torch.Tensor, qm: torch.Tensor, code: WeightCode, name: str) -> None:
    """a >= 0 and a*v + m in [-127, 127] for every code value (kernels rely on both)."""
    a, m = qa.to(torch.int32), qm.to(torch.int32)
    if bool((a < 0).any()):
        raise FormatError(f"{name}: '{WEIGHT_GROUP_SCALE}' has negative entries (must be >= 0)")
    hi, lo = a * code.vmax + m, a * code.vmin + m
    if bool((hi > INT_WEIGHT_MAX).any() or (lo < -INT_WEIGHT_MAX).any()):
        raise FormatError(f"{name}: integer weights a*v + m leave [-127, 127] (max {int(hi.max())}, "
                          f"min {int(lo.min())}); '{WEIGHT_GROUP_SCALE}'/'{WEIGHT_GROUP_OFFSET}' out of range")


def int_weights(codes: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """W_int [N, K] = a * v(c) + m per (row, group), as int8."""
    n, k = codes.shape
    g = qa.shape[1]
    v = code.values(codes).view(n, g, k // g)
    w = v * qa.to(torch.int32).unsqueeze(-1) + qm.to(torch.int32).unsqueeze(-1)
    return w.view(n, k).to(torch.int8)


def upgrade_v1(t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A v1 layer (ternary t [N, K], fp alpha/mu [N, G]) on v2's grid: (codes, s [N, 1], a, m).

    s_n = max_g(|alpha| + |mu|) / 127; a group with alpha < 0 flips its codes (t -> -t) so a >= 0. Rounding
    moves alpha and mu by at most s_n / 2 each, mu by one step more where both rounded up past 127: every
    weight moves by at most 2 s_n (1.6% of the row's largest level)."""
    alpha, mu = alpha.float(), mu.float()
    n, k = t.shape
    g = alpha.shape[1]
    flip = alpha < 0
    tt = torch.where(flip.repeat_interleave(k // g, dim=1), -t.to(torch.int32), t.to(torch.int32))
    s = (alpha.abs() + mu.abs()).amax(dim=1, keepdim=True) / INT_WEIGHT_MAX
    s = torch.where(s > 0, s, torch.ones_like(s)).half().float()  # stored in fp16: divide by what is stored
    qa = torch.round(alpha.abs() / s).clamp(0, INT_WEIGHT_MAX)
    qm = torch.round(mu / s)
    qm = torch.minimum(torch.maximum(qm, qa - INT_WEIGHT_MAX), INT_WEIGHT_MAX - qa)
    return CODES["ternary"].codes(tt), s.half(), qa.to(torch.int8), qm.to(torch.int8)


def linear_tensors(prefix: str, codes: torch.Tensor, code: WeightCode, row_scale: torch.Tensor,
                   qa: torch.Tensor, qm: torch.Tensor, left: torch.Tensor | None = None,
                   right: torch.Tensor | None = None, lowrank_a: torch.Tensor | None = None,
                   lowrank_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, named and typed as format v2 requires."""
    check_int_grid(qa, qm, code, prefix)
    out = {f"{prefix}.{WEIGHT_PACKED}": pack_codes(codes.cpu(), code),
           f"{prefix}.{WEIGHT_SCALE}": row_scale.detach().cpu().reshape(-1, 1).to(torch.float16).contiguous(),
           f"{prefix}.{WEIGHT_GROUP_SCALE}": qa.detach().cpu().to(torch.int8).contiguous(),
           f"{prefix}.{WEIGHT_GROUP_OFFSET}": qm.detach().cpu().to(torch.int8).contiguous()}
    if left is not None:
        out[f"{prefix}.{ROT_LEFT}"] = left.detach().cpu().to(ROTATION_DTYPE).contiguous()
        out[f"{prefix}.{ROT_RIGHT}"] = right.detach().cpu().to(ROTATION_DTYPE).contiguous()
    if lowrank_a is not None:
        out[f"{prefix}.{LOWRANK_A}"] = lowrank_a.detach().cpu().to(LOWRANK_DTYPE).contiguous()
        out[f"{prefix}.{LOWRANK_B}"] = lowrank_b.detach().cpu().to(LOWRANK_DTYPE).contiguous()
    return out


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


# --------------------------------------------------------------------------------------------
# Config schema
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """Settings of one linear (or one fused group)."""

    act_bits: int = 4
    act_clip: float = 1.0
    rotation: tuple[int, int] | None = None  # (n1, n2) of the online Kronecker transform, or None
    # K splits into k_blocks contiguous blocks that never mix: activation ranges are per (token, block)
    # and the transform's left factor is block-diagonal with k_blocks blocks. A row-parallel layer's
    # input is split across tensor-parallel ranks, so TP size must divide k_blocks; then every rank
    # computes exactly what one GPU would.
    k_blocks: int = 1
    lowrank_rank: int = 0  # r of the 16-bit low-rank branch (0 = none)

    def to_dict(self) -> dict[str, Any]:
        return {"act_bits": self.act_bits, "act_clip": self.act_clip,
                "rotation": list(self.rotation) if self.rotation else None, "k_blocks": self.k_blocks,
                "lowrank_rank": self.lowrank_rank}


_TOP_KEYS = {"quant_method", "format_version", "weight", "activation", "rotation", "lowrank", "layers", "ignore",
             "bits_per_weight", "recipe", "config_groups", "transform_config", "format", "quantization_status"}
_WEIGHT_KEYS = {"code", "packing", "group_size", "scales", "formula", "scale_dtype"}
_SPEC_KEYS = {"act_bits", "act_clip", "rotation", "k_blocks", "lowrank_rank", "bits", "clip", "scheme"}


@dataclass
class CheckpointConfig:
    """`quantization_config` of a TWLA checkpoint, validated."""

    group_size: int = 32
    default: LayerSpec = field(default_factory=LayerSpec)
    layers: dict[str, LayerSpec] = field(default_factory=dict)  # HF module path -> spec
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    weight_code: str = "ternary"
    bits_per_weight: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # descriptive keys for other tools (kept as written)

    @property
    def code(self) -> WeightCode:
        return CODES[self.weight_code]

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        formula = "W = weight_scale * (weight_group_scale * v(code) + weight_group_offset)"
        d = {
            "quant_method": QUANT_METHOD,
            "format_version": self.version,
            "weight": {"code": self.weight_code, "packing": PACKING, "group_size": self.group_size,
                       "scales": "fp16 per row x int8 per group", "formula": formula},
            "activation": {"scheme": "per-token-asymmetric-dynamic", "bits": self.default.act_bits,
                           "clip": self.default.act_clip},
            "rotation": {"type": "kronecker", "apply": "x' = vec(L @ x.reshape(n1, n2) @ R)",
                         "tensors": [ROT_LEFT, ROT_RIGHT]},
            "lowrank": {"apply": "y += lowrank_a @ (lowrank_b @ x)", "dtype": "float16",
                        "tensors": [LOWRANK_A, LOWRANK_B]},
            "layers": {name: spec.to_dict() for name, spec in sorted(self.layers.items())},
            "ignore": list(self.ignore),
            "bits_per_weight": self.bits_per_weight,
            "recipe": self.recipe,
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "CheckpointConfig":
        def err(key: str, msg: str) -> FormatError:
            return FormatError(f"{source}: key '{key}': {msg}")

        if not isinstance(d, dict):
            raise FormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if str(d.get("quant_method", "")).lower() != QUANT_METHOD:
            raise err("quant_method", f"expected '{QUANT_METHOD}', got {d.get('quant_method')!r}")
        _reject_unknown(d, _TOP_KEYS, source, "")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise err("format_version", f"unknown format version {version!r}; this twla_vllm reads versions "
                      f"{list(READABLE_VERSIONS)} (upgrade twla-vllm or re-export the checkpoint)")
        weight = d.get("weight") or {}
        if not isinstance(weight, dict):
            raise err("weight", f"expected an object, got {weight!r}")
        _reject_unknown(weight, _WEIGHT_KEYS, source, "weight.")
        code = weight.get("code", "ternary")
        if not isinstance(code, str) or code not in CODES or (version == 1 and code != "ternary"):
            allowed = ["ternary"] if version == 1 else sorted(CODES)
            raise err("weight.code", f"unknown weight code {code!r} for format version {version} (allowed: {allowed})")
        packing = weight.get("packing", PACKING if version == 2 else PACKING_V1)
        if packing != (PACKING if version == 2 else PACKING_V1):
            raise err("weight.packing", f"unknown packing {packing!r}; version {version} uses "
                      f"'{PACKING if version == 2 else PACKING_V1}'")
        gs = weight.get("group_size", 128)
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % 16 == 0)):
            raise err("weight.group_size", f"must be -1 (per row) or a positive multiple of 16, got {gs!r}")
        act = d.get("activation") or {}
        default = parse_layer_spec(act, f"{source}: key 'activation'", None)
        layers_d = d.get("layers") or {}
        if not isinstance(layers_d, dict):
            raise err("layers", f"expected an object of module path -> settings, got {type(layers_d).__name__}")
        layers = {name: parse_layer_spec(spec, f"{source}: key 'layers.{name}'", default)
                  for name, spec in layers_d.items()}
        ignore = d.get("ignore", ["lm_head"])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise err("ignore", "must be a list of module names or 're:' regexes")
        for pattern in (p for p in ignore if p.startswith("re:")):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise err("ignore", f"{pattern!r} is not a valid regular expression ({e})") from None
        bpw = d.get("bits_per_weight")
        if bpw is not None and (isinstance(bpw, bool) or not isinstance(bpw, (int, float))):
            raise err("bits_per_weight", f"must be a number or null, got {bpw!r}")
        recipe = d.get("recipe") or {}
        if not isinstance(recipe, dict):
            raise err("recipe", f"must be an object, got {recipe!r}")
        extra = {k: d[k] for k in ("config_groups", "transform_config", "format", "quantization_status") if k in d}
        cfg = cls(group_size=gs, default=default, layers=layers, ignore=ignore, weight_code=code,
                  bits_per_weight=bpw, recipe=recipe, version=version, extra=extra)
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
                    raise FormatError(f"{source}: key 'layers': {', '.join(full)} are fused in vLLM and must "
                                      f"share act_bits/act_clip/rotation sizes/k_blocks/lowrank_rank, got "
                                      f"{sorted(map(str, specs))}")
                ignored = {self.is_ignored(n) for n in full}
                if len(ignored) > 1:
                    raise FormatError(f"{source}: key 'ignore': either all or none of {full} may be ignored")


def _reject_unknown(d: dict[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise FormatError(f"{source}: unknown key(s) {', '.join(repr(where + k) for k in unknown)} "
                          f"(a typo? allowed: {sorted(allowed)})")


def parse_layer_spec(d: Any, where: str, default: LayerSpec | None) -> LayerSpec:
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object, got {d!r}")
    unknown = sorted(set(d) - _SPEC_KEYS)
    if unknown:
        raise FormatError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(_SPEC_KEYS - {'scheme'})})")
    base = default or LayerSpec()
    bits = d.get("act_bits", d.get("bits", base.act_bits))
    clip = d.get("act_clip", d.get("clip", base.act_clip))
    rot = d.get("rotation", base.rotation if default is None else None)
    k_blocks = d.get("k_blocks", 1)
    rank = d.get("lowrank_rank", 0)
    for key, v in (("k_blocks", k_blocks), ("lowrank_rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "k_blocks" else 0):
            raise FormatError(f"{where}: {key} must be an int >= {1 if key == 'k_blocks' else 0}, got {v!r}")
    if isinstance(bits, bool) or bits not in ACT_BITS_ALLOWED:
        raise FormatError(f"{where}: act_bits must be one of {ACT_BITS_ALLOWED}, got {bits!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < float(clip) <= 1.0:
        raise FormatError(f"{where}: act_clip must be in (0, 1], got {clip!r}")
    if rot is not None:
        if (not isinstance(rot, (list, tuple)) or len(rot) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rot)):
            raise FormatError(f"{where}: rotation must be null or [n1, n2] positive ints, got {rot!r}")
        rot = (int(rot[0]), int(rot[1]))
    return LayerSpec(act_bits=int(bits), act_clip=float(clip), rotation=rot, k_blocks=k_blocks, lowrank_rank=rank)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


# --------------------------------------------------------------------------------------------
# Expected tensors of one quantized linear
# --------------------------------------------------------------------------------------------
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
    kb = spec.k_blocks
    if kb > 1:
        block = in_features // kb
        if in_features % kb or block % max(cpw, 16) or (group_size != -1 and block % group_size):
            raise FormatError(f"{name}: k_blocks={kb} must split K={in_features} into blocks that are whole "
                              f"multiples of {max(cpw, 16)}{'' if group_size == -1 else f' and of group_size={group_size}'}")
        if spec.rotation is not None and spec.rotation[0] % kb:
            raise FormatError(f"{name}: k_blocks={kb} does not divide the rotation's n1={spec.rotation[0]}")


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
        check_linear_shape(prefix, spec, k, config.group_size, code)
        if config.is_ignored(prefix):
            raise FormatError(f"{model_dir}: layer '{prefix}' is in quantization_config.ignore but stores "
                              f"quantized tensors")
        want = expected_tensors(spec, n, k, config.group_size, code, config.version)
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
    from .ct_vocab import validate as validate_ct_keys  # the same checkpoint in compressed-tensors' words

    validate_ct_keys(config, config.extra, f"{model_dir}/config.json: quantization_config")
    return config
