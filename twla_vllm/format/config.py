"""quantization_config schema: LayerSpec per linear, CheckpointConfig for a model, strict parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .names import (ACT_BITS_ALLOWED, FORMAT_VERSION, FUSED_GROUPS, FormatError, LOWRANK_A, LOWRANK_B, PACKING,
                    PACKING_V1, QUANT_METHOD, READABLE_VERSIONS, ROT_LEFT, ROT_RIGHT)
from .codes import CODES, WeightCode


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
    # activation ranges per (token, contiguous K-block) when finer than k_blocks: a multiple of k_blocks, each
    # range whole rows of the transform's [n1, n2] view (0 = one range per k-block). Runtime only: no stored bits
    act_blocks: int = 0
    # this linear's weight group along K when it differs from the checkpoint's weight.group_size (0 = that one):
    # a coarser group on the least sensitive linears keeps the whole model inside a bits/weight budget
    group_size: int = 0

    @property
    def act_ranges(self) -> int:
        """Activation ranges per token over K (what the row sums and the per-token steps are split by)."""
        return self.act_blocks or self.k_blocks

    def to_dict(self) -> dict[str, Any]:
        d = {"act_bits": self.act_bits, "act_clip": self.act_clip,
             "rotation": list(self.rotation) if self.rotation else None, "k_blocks": self.k_blocks,
             "lowrank_rank": self.lowrank_rank}
        if self.act_blocks:
            d["act_blocks"] = self.act_blocks
        if self.group_size:
            d["group_size"] = self.group_size
        return d


_TOP_KEYS = {"quant_method", "format_version", "weight", "activation", "rotation", "lowrank", "layers", "ignore",
             "bits_per_weight", "recipe", "config_groups", "transform_config", "format", "quantization_status"}
_WEIGHT_KEYS = {"code", "packing", "group_size", "scales", "formula", "scale_dtype"}
_SPEC_KEYS = {"act_bits", "act_clip", "rotation", "k_blocks", "act_blocks", "lowrank_rank", "group_size", "bits",
              "clip", "scheme"}


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
        if not _valid_group_size(gs):
            raise err("weight.group_size", f"must be -1 (per row) or a positive multiple of 16, got {gs!r}")
        act = d.get("activation") or {}
        if isinstance(act, dict) and "group_size" in act:
            raise err("activation.group_size", "a weight setting: the default is weight.group_size, a linear's own "
                      "goes in layers.<name>.group_size")
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

    def group_size_of(self, name: str) -> int:
        """The weight group along K of linear `name` (its own, else the checkpoint's)."""
        return self.spec_group_size(self.spec(name))

    def spec_group_size(self, spec: LayerSpec) -> int:
        """The weight group along K of a linear with settings `spec` (for vLLM's fused modules, named by no key)."""
        return spec.group_size or self.group_size

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
                                      f"share act_bits/act_clip/rotation sizes/k_blocks/act_blocks/lowrank_rank/"
                                      f"group_size, got "
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
    act_blocks = d.get("act_blocks", 0)
    group_size = d.get("group_size", 0)
    if group_size != 0 and not _valid_group_size(group_size):
        raise FormatError(f"{where}: group_size must be -1 (per row) or a positive multiple of 16 (absent: the "
                          f"checkpoint's weight.group_size), got {group_size!r}")
    for key, v in (("k_blocks", k_blocks), ("lowrank_rank", rank), ("act_blocks", act_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "k_blocks" else 0):
            raise FormatError(f"{where}: {key} must be an int >= {1 if key == 'k_blocks' else 0}, got {v!r}")
    if act_blocks % k_blocks:
        raise FormatError(f"{where}: act_blocks={act_blocks} must be a multiple of k_blocks={k_blocks} (activation "
                          f"ranges subdivide the transform's blocks)")
    if isinstance(bits, bool) or bits not in ACT_BITS_ALLOWED:
        raise FormatError(f"{where}: act_bits must be one of {ACT_BITS_ALLOWED}, got {bits!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < float(clip) <= 1.0:
        raise FormatError(f"{where}: act_clip must be in (0, 1], got {clip!r}")
    if rot is not None:
        if (not isinstance(rot, (list, tuple)) or len(rot) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rot)):
            raise FormatError(f"{where}: rotation must be null or [n1, n2] positive ints, got {rot!r}")
        rot = (int(rot[0]), int(rot[1]))
    return LayerSpec(act_bits=int(bits), act_clip=float(clip), rotation=rot, k_blocks=k_blocks, lowrank_rank=rank,
                     act_blocks=act_blocks, group_size=group_size)


def _valid_group_size(gs: Any) -> bool:
    return not isinstance(gs, bool) and isinstance(gs, int) and (gs == -1 or (gs > 0 and gs % 16 == 0))


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)
