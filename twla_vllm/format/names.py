"""Format constants: method name, versions, tensor names and dtypes, fused groups, the error type."""

from __future__ import annotations

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
