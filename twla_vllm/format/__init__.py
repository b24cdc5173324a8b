"""TWLA checkpoint format v2: the one contract between the offline quantizer and the vLLM plugin.

A TWLA checkpoint is a Hugging Face model directory (config.json, tokenizer files, *.safetensors; never
pickle). `config.json["quantization_config"]` holds a `CheckpointConfig` dict, and every quantized
linear `P` (HF module path, e.g. `model.layers.0.self_attn.q_proj`) stores:

    P.weight_packed        int32 [N, K*B/32]  B-bit codes c of the weight code, 32/B per word, K-major
    P.weight_scale         fp16  [N, 1]       s_n, one per output row
    P.weight_group_scale   int8  [N, G]       a (>= 0) per (row, K-group); G = K / group_size, the layer's
                                              own `layers.P.group_size` if set, else `weight.group_size`
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

from .names import (ACT_BITS_ALLOWED, FORMAT_VERSION, FUSED_GROUPS, FormatError, INT_WEIGHT_MAX, LOWRANK_A, LOWRANK_B,
                    LOWRANK_DTYPE, PACKING, PACKING_V1, QUANT_METHOD, QUANT_TENSOR_SUFFIXES, READABLE_VERSIONS,
                    ROTATION_DTYPE, ROT_LEFT, ROT_RIGHT, WEIGHT_GROUP_OFFSET, WEIGHT_GROUP_SCALE, WEIGHT_OFFSET_V1,
                    WEIGHT_PACKED, WEIGHT_SCALE)
from .codes import (CODES, WeightCode, check_int_grid, int_weights, linear_tensors, num_groups, pack_codes, pack_values,
                    unpack_codes, upgrade_v1)
from .config import CheckpointConfig, LayerSpec, parse_layer_spec
from .checkpoint import (bits_per_weight, check_linear_shape, expected_tensors, read_config, read_tensor_index,
                         validate_checkpoint)

__all__ = [
    "ACT_BITS_ALLOWED", "CODES", "CheckpointConfig", "FORMAT_VERSION", "FUSED_GROUPS", "FormatError",
    "INT_WEIGHT_MAX", "LOWRANK_A", "LOWRANK_B", "LOWRANK_DTYPE", "LayerSpec", "PACKING", "PACKING_V1",
    "QUANT_METHOD", "QUANT_TENSOR_SUFFIXES", "READABLE_VERSIONS", "ROTATION_DTYPE", "ROT_LEFT", "ROT_RIGHT",
    "WEIGHT_GROUP_OFFSET", "WEIGHT_GROUP_SCALE", "WEIGHT_OFFSET_V1", "WEIGHT_PACKED", "WEIGHT_SCALE",
    "WeightCode", "bits_per_weight", "check_int_grid", "check_linear_shape", "expected_tensors", "int_weights",
    "linear_tensors", "num_groups", "pack_codes", "pack_values", "parse_layer_spec", "read_config",
    "read_tensor_index", "unpack_codes", "upgrade_v1", "validate_checkpoint",
]
