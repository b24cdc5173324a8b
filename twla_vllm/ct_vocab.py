"""A TWLA checkpoint described in compressed-tensors' vocabulary, next to our own keys.

`describe(cfg)` gives the keys `config_groups` (compressed-tensors `QuantizationScheme`s of `QuantizationArgs`:
the weight code as a B-bit asymmetric int with group (or channel) scales, each activation setting as
B-bit asymmetric dynamic per-token ints), `transform_config` (a `TransformConfig`: each Kronecker transform
applied online at the layer's input, its inverse folded into the weight), `format` and `quantization_status`.
They are descriptive: `quant_method` stays "twla" and twla_vllm.format's own keys stay the contract, because
compressed-tensors cannot express what the kernels need -- the Kronecker factors and their sizes (it has no
Kronecker transform type: hadamard, random-hadamard and random-matrix only), k_blocks and act_blocks (ranges per
token *and* K-block), the activation clip ratio, ternary codes (3 of a 2-bit container's 4 levels), the two-level
integer group scale (int8 a and offset m per group under an fp16 row scale), the 16-bit low-rank branch, and our
packing ("int32-bytelane" is not one of its compression formats).

`validate(cfg, d, source)` checks those keys with compressed-tensors 0.17's own models and that they say what
our keys say; every failure is a FormatError naming the key. Without compressed-tensors installed (it comes
with vLLM) the keys are kept but not checked.
"""

from __future__ import annotations

from typing import Any

from . import format as fmt

CT_KEYS = ("config_groups", "transform_config", "format", "quantization_status")
QUANTIZATION_STATUS = "compressed"  # weights are stored packed, as compressed-tensors calls it
TRANSFORM_TYPE = "kronecker"  # not a compressed-tensors transform factory: its tools refuse it rather than guess
ARG_FIELDS = {"num_bits", "type", "symmetric", "strategy", "dynamic", "group_size"}
DEFAULT_GROUP = "default"  # targets class "Linear": the layers `layers` does not list


def _weight_args(cfg: fmt.CheckpointConfig, group_size: int) -> dict[str, Any]:
    group = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    return {"num_bits": cfg.code.bits, "type": "int", "symmetric": False, "dynamic": False, **group}


def _activation_args(spec: fmt.LayerSpec) -> dict[str, Any] | None:
    if spec.act_bits >= 16:
        return None
    return {"num_bits": spec.act_bits, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}


def _group_name(bits: int, group_size: int, default_group_size: int) -> str:
    name = "float_activations" if bits >= 16 else f"a{bits}"
    return name if group_size == default_group_size else f"{name}_g{group_size}"


def describe(cfg: fmt.CheckpointConfig) -> dict[str, Any]:
    """The compressed-tensors keys for `cfg` (layer names as in `cfg.layers`, HF module paths)."""
    groups: dict[str, dict[str, Any]] = {
        DEFAULT_GROUP: {"targets": ["Linear"], "weights": _weight_args(cfg, cfg.group_size),
                        "input_activations": _activation_args(cfg.default)}}
    for name, spec in sorted(cfg.layers.items()):
        gs = cfg.group_size_of(name)
        group = groups.setdefault(_group_name(spec.act_bits, gs, cfg.group_size), {
            "targets": [], "weights": _weight_args(cfg, gs), "input_activations": _activation_args(spec)})
        group["targets"].append(name)
    transforms: dict[str, dict[str, Any]] = {}
    for name, spec in sorted(cfg.layers.items()):
        if spec.rotation is not None:
            key = f"{TRANSFORM_TYPE}_{spec.rotation[0]}x{spec.rotation[1]}"
            scheme = transforms.setdefault(key, {"type": TRANSFORM_TYPE, "apply": [
                {"targets": [], "location": "input"},
                {"targets": [], "location": "weight_input", "inverse": True}], "precision": "float32"})
            for args in scheme["apply"]:
                args["targets"].append(name)
    out: dict[str, Any] = {"config_groups": groups, "format": fmt.PACKING, "quantization_status": QUANTIZATION_STATUS}
    if transforms:
        out["transform_config"] = {"config_groups": transforms}
    return out


def validate(cfg: fmt.CheckpointConfig, d: dict[str, Any], source: str = "quantization_config") -> None:
    """Check the compressed-tensors keys of config dict `d` (those present) against compressed-tensors' models
    and against `cfg`, the checkpoint's own keys. Raises FormatError naming the key."""
    if not any(k in d for k in CT_KEYS):
        return
    if "format" in d and d["format"] != fmt.PACKING:
        raise _error(source, "format", f"must be '{fmt.PACKING}' (the packing of the codes), got {d['format']!r}")
    try:
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.transform import TransformConfig
    except ImportError:  # descriptive keys; vLLM brings compressed-tensors, an offline-only install may not
        return
    base = {"quant_method": fmt.QUANT_METHOD, "config_groups": {}, "ignore": list(cfg.ignore)}
    if "quantization_status" in d:
        _ct_model(QuantizationConfig, {**base, "quantization_status": d["quantization_status"]}, source,
                  "quantization_status")
    if "config_groups" in d:
        parsed = _ct_model(QuantizationConfig, {**base, "config_groups": d["config_groups"]}, source, "config_groups")
        _check_groups(cfg, parsed.config_groups, source)
    if "transform_config" in d:
        parsed_t = _ct_model(TransformConfig, d["transform_config"], source, "transform_config")
        _check_transforms(cfg, parsed_t, source)


def _error(source: str, key: str, msg: str) -> fmt.FormatError:
    return fmt.FormatError(f"{source}: key '{key}': {msg}")


def _ct_model(model: Any, value: Any, source: str, key: str) -> Any:
    try:
        return model.model_validate(value)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, or a validator's own error type
        first = " ".join(str(e).split())[:300]
        raise _error(source, key, f"compressed-tensors rejects it ({type(e).__name__}: {first})") from None


def _check_groups(cfg: fmt.CheckpointConfig, groups: dict[str, Any], source: str) -> None:
    """Every layer's scheme (by exact name, else the class target "Linear") must state our weight code, that
    layer's group size and its activation bits."""
    by_name: dict[str, tuple[str, Any]] = {}
    default = None
    for gname, scheme in groups.items():
        if isinstance(scheme, list):
            raise _error(source, "config_groups", f"group '{gname}' is a bare target list; a TWLA checkpoint "
                                                        f"states weights and input_activations per group")
        for target in scheme.targets:
            if target == "Linear":
                default = (gname, scheme)
            elif target in by_name:
                raise _error(source, "config_groups", f"'{target}' is a target of both '{by_name[target][0]}' "
                                                            f"and '{gname}'")
            else:
                by_name[target] = (gname, scheme)
    unknown = sorted(set(by_name) - set(cfg.layers))
    if unknown:
        raise _error(source, "config_groups", f"targets {unknown[:3]} are not in key 'layers'")
    if default is None:
        raise _error(source, "config_groups", "no group targets 'Linear' (the layers 'layers' does not list)")
    for name, spec in [("Linear", cfg.default), *sorted(cfg.layers.items())]:
        gname, scheme = by_name.get(name, default)
        want_w = _weight_args(cfg, cfg.spec_group_size(spec))
        for part, want in (("weights", want_w), ("input_activations", _activation_args(spec))):
            got = getattr(scheme, part)
            got = None if got is None else {f: v for f, v in got.model_dump(mode="json").items()
                                            if f in ARG_FIELDS and (v is not None or f in want)}
            if got != want:
                ours = ("key 'weight'" + ("" if name == "Linear" else " and its group_size in key 'layers'")
                        if part == "weights" else
                        f"act_bits {spec.act_bits} ({'key activation' if name == 'Linear' else 'key layers'})")
                raise _error(source, "config_groups", f"group '{gname}' says {part} {got} for {name}, but "
                                                            f"{ours} means {want}")


def _check_transforms(cfg: fmt.CheckpointConfig, tc: Any, source: str) -> None:
    """The layers the transform schemes name, online at the input and folded (inverse) into the weight, must be
    exactly the layers with a rotation, each under the scheme of its own n1 x n2."""
    seen: dict[str, str] = {}
    for sname, scheme in tc.config_groups.items():
        if scheme.type != TRANSFORM_TYPE:
            raise _error(source, "transform_config", f"scheme '{sname}' has type {scheme.type!r}; TWLA's "
                                                           f"transforms are '{TRANSFORM_TYPE}'")
        online = {t for a in scheme.apply if a.location == "input" and not a.inverse for t in a.targets}
        folded = {t for a in scheme.apply if a.location == "weight_input" and a.inverse for t in a.targets}
        if online != folded or len(scheme.apply) != 2:
            raise _error(source, "transform_config", f"scheme '{sname}' must apply to the same targets online "
                                                           f"at 'input' and inverted at 'weight_input'")
        for t in online:
            spec = cfg.layers.get(t)
            if spec is None or spec.rotation is None:
                raise _error(source, "transform_config", f"scheme '{sname}' targets {t}, which key 'layers' "
                                                               f"gives no rotation")
            if sname != f"{TRANSFORM_TYPE}_{spec.rotation[0]}x{spec.rotation[1]}" or t in seen:
                raise _error(source, "transform_config", f"{t} is under scheme '{sname}'"
                                   + (f" and '{seen[t]}'" if t in seen else "")
                                   + f"; its rotation is {list(spec.rotation)}")
            seen[t] = sname
    missing = sorted(n for n, s in cfg.layers.items() if s.rotation is not None and n not in seen)
    if missing:
        raise _error(source, "transform_config", f"no scheme for {missing[:3]}, which key 'layers' gives a "
                                                       f"rotation")
