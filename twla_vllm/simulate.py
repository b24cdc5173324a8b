"""Simulated-quant Hugging Face model: each quantized nn.Linear replaced by `SimTwlaLinear`, which runs
`reference.quant_linear` (the same function the vLLM CPU path runs).

Used by the offline tool for evaluation and by tests as the oracle for served tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from . import format as fmt
from .reference import abs_range_sum, block_row_sums, quant_linear


@dataclass
class QuantWeight:
    """One linear's quantized weight as stored (format v2): codes [N, K] of `code`, fp16-representable row
    scale [N], int8 group scale/offset [N, G]. Floating-point group scale/offset (row scale 1) are format v1's
    fp16 alpha/mu: simulation only, for measuring what the integer grid costs; not exportable."""

    codes: torch.Tensor
    code: fmt.WeightCode
    row_scale: torch.Tensor
    group_scale: torch.Tensor
    group_offset: torch.Tensor

    def int_weights(self) -> torch.Tensor:
        if self.group_scale.is_floating_point():  # fp alpha/mu: a*v + m without the integer grid
            n, k = self.codes.shape
            g = self.group_scale.shape[1]
            v = self.code.values(self.codes).float().view(n, g, k // g)
            return (v * self.group_scale.float()[..., None] + self.group_offset.float()[..., None]).view(n, k)
        return fmt.int_weights(self.codes, self.group_scale, self.group_offset, self.code)

    def dequantize(self) -> torch.Tensor:
        return self.int_weights().float() * self.row_scale.float().reshape(-1, 1)


class SimTwlaLinear(torch.nn.Module):
    """nn.Linear stand-in: transform -> per-token fake-quant -> integer GEMM -> epilogue (+ low-rank, bias).
    Only the activation ranges per token (`LayerSpec.act_ranges`) matter here: the transform needs no k-blocks in
    simulation, the quantizer's ranges and the zero-point row sums do."""

    def __init__(self, weight: QuantWeight, left: torch.Tensor | None, right: torch.Tensor | None,
                 act_bits: int, act_clip: float, act_ranges: int = 1, bias: torch.Tensor | None = None,
                 lowrank_a: torch.Tensor | None = None, lowrank_b: torch.Tensor | None = None):
        super().__init__()
        self.code = weight.code
        self.out_features, self.in_features = weight.codes.shape
        self.act_bits, self.act_clip = act_bits, act_clip
        self.register_buffer("codes", weight.codes.to(torch.uint8))
        self.register_buffer("row_scale", weight.row_scale.reshape(-1).to(torch.float16).float())
        fp = weight.group_scale.is_floating_point()
        self.register_buffer("group_scale", weight.group_scale if fp else weight.group_scale.to(torch.int8))
        self.register_buffer("group_offset", weight.group_offset if fp else weight.group_offset.to(torch.int8))
        self.register_buffer("w_int", weight.int_weights().float())  # exact float32 integers (BLAS GEMM)
        self.set_act_ranges(act_ranges)
        self.register_buffer("left", None if left is None else left.float())
        self.register_buffer("right", None if right is None else right.float())
        self.register_buffer("lowrank_a", None if lowrank_a is None else lowrank_a.to(fmt.LOWRANK_DTYPE).float())
        self.register_buffer("lowrank_b", None if lowrank_b is None else lowrank_b.to(fmt.LOWRANK_DTYPE).float())
        self.register_buffer("bias", bias)

    def set_act_ranges(self, act_ranges: int) -> None:
        """Quantize activations in this many ranges per token; the zero-point term z * rowsum needs one row sum
        per range: exact int32 sums on the integer grid; fp alpha/mu weights are not integers, so their sums stay
        real (truncating them broke every fp-scale layer below 16 activation bits)."""
        n, k = self.w_int.shape
        self.act_ranges = act_ranges
        self.register_buffer("rowsum", self.w_int.double().view(n, act_ranges, k // act_ranges).sum(-1)
                             if self.group_scale.is_floating_point()
                             else block_row_sums(self.w_int, act_ranges))
        self.w_abs = abs_range_sum(self.w_int, act_ranges)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.codes.to(torch.int32), self.code, self.row_scale, self.group_scale,
                           self.group_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.w_int, self.row_scale, self.rowsum, self.left, self.right, self.act_bits,
                            self.act_clip, self.lowrank_a, self.lowrank_b,
                            None if self.bias is None else self.bias, self.w_abs)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's checkpoint tensors (format v2)."""
        w = self.weight
        return fmt.linear_tensors(prefix, w.codes, self.code, w.row_scale, w.group_scale, w.group_offset,
                                  self.left, self.right, self.lowrank_a, self.lowrank_b)

    def extra_repr(self) -> str:
        rot = None if self.left is None else (self.left.shape[0], self.right.shape[0])
        rank = 0 if self.lowrank_a is None else self.lowrank_a.shape[1]
        return (f"in={self.in_features}, out={self.out_features}, code={self.code.name}, "
                f"act_bits={self.act_bits}, clip={self.act_clip:.3f}, act_ranges={self.act_ranges}, "
                f"rotation={rot}, lowrank_rank={rank}")


def replace_linear(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def layer_weight(tensors: dict[str, torch.Tensor], prefix: str, qcfg: fmt.CheckpointConfig) -> QuantWeight:
    """Pop one linear's weight tensors (v1 layers are projected onto the v2 grid, as served)."""
    packed = tensors.pop(f"{prefix}.{fmt.WEIGHT_PACKED}")
    codes = fmt.unpack_codes(packed, qcfg.code, f"{prefix}.{fmt.WEIGHT_PACKED}")
    if qcfg.version == 1:
        t = qcfg.code.values(codes)
        codes, s, qa, qm = fmt.upgrade_v1(t, tensors.pop(f"{prefix}.{fmt.WEIGHT_SCALE}"),
                                          tensors.pop(f"{prefix}.{fmt.WEIGHT_OFFSET_V1}"))
        return QuantWeight(codes, qcfg.code, s.reshape(-1), qa, qm)
    qa = tensors.pop(f"{prefix}.{fmt.WEIGHT_GROUP_SCALE}")
    qm = tensors.pop(f"{prefix}.{fmt.WEIGHT_GROUP_OFFSET}")
    fmt.check_int_grid(qa, qm, qcfg.code, prefix)
    return QuantWeight(codes, qcfg.code, tensors.pop(f"{prefix}.{fmt.WEIGHT_SCALE}").reshape(-1), qa, qm)


def simulated_layer(tensors: dict[str, torch.Tensor], prefix: str, qcfg: fmt.CheckpointConfig) -> SimTwlaLinear:
    """Pop one quantized linear's tensors (weight, transforms, bias, low-rank branch) into its simulation."""
    spec = qcfg.spec(prefix)
    weight = layer_weight(tensors, prefix, qcfg)  # checks codes and the integer grid
    return SimTwlaLinear(weight, tensors.pop(f"{prefix}.{fmt.ROT_LEFT}", None),
                         tensors.pop(f"{prefix}.{fmt.ROT_RIGHT}", None), spec.act_bits, spec.act_clip, spec.act_ranges,
                         tensors.pop(f"{prefix}.bias", None), tensors.pop(f"{prefix}.{fmt.LOWRANK_A}", None),
                         tensors.pop(f"{prefix}.{fmt.LOWRANK_B}", None))


def load_simulated_model(model_dir: str, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the HF model of a TWLA checkpoint with `SimTwlaLinear` layers (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = fmt.validate_checkpoint(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg_dict = json.load(f)
    cfg_dict.pop("quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(model_dir, fname), framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    quantized = sorted({k.rpartition(".")[0] for k in tensors if k.endswith("." + fmt.WEIGHT_PACKED)})
    for prefix in quantized:
        replace_linear(model, prefix, simulated_layer(tensors, prefix, qcfg))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise fmt.FormatError(f"{model_dir}: tensors {unexpected[:5]} match no module of "
                              f"{type(model).__name__}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if not _is_sim_buffer(model, m)]
    if missing:
        raise fmt.FormatError(f"{model_dir}: missing tensors {missing[:5]}")
    return model.to(device).eval()


def _is_sim_buffer(model: torch.nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), SimTwlaLinear) if owner else False
