from __future__ import annotations

import torch

from .. import format as fmt
from .. import ops
from ..reference import unit_code_sums
from .base import LinearSpec, TwlaKernel


class TritonKernel(TwlaKernel):
    """CUDA: fused rotate + per-token quantize, then the packed 2-bit × int8 GEMM/GEMV. Resident per
    weight: 2-bit codes, fp16 α/μ per group (as stored) and int16 code sums per unit, i.e.
    0.25 + 6/group bytes (0.297 B/param at group 128)."""

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, "needs a CUDA device"
        if ops.triton_ops is None:
            return False, "Triton is not installed"
        if spec.act_bits > 8:
            return False, "float activations (act_bits 16) run on the reference kernel"
        return True, None

    def process_weights(self, layer: torch.nn.Module, t: torch.Tensor, packed: torch.Tensor) -> None:
        layer.register_parameter("twla_packed", torch.nn.Parameter(packed.contiguous(), requires_grad=False))
        self.units = max(layer.weight_scale.shape[1], self.spec.k_blocks)
        tsum = unit_code_sums(t, self.units)
        layer.register_parameter("twla_tsum", torch.nn.Parameter(tsum.contiguous(), requires_grad=False))
        for name in (fmt.WEIGHT_SCALE, fmt.WEIGHT_OFFSET):  # fp16 in the checkpoint: exact round trip
            getattr(layer, name).data = getattr(layer, name).data.half().contiguous()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        q, s, z, sx = torch.ops.twla.act_quant(x2, getattr(layer, fmt.ROT_LEFT, None),
                                               getattr(layer, fmt.ROT_RIGHT, None), self.spec.act_bits,
                                               self.spec.act_clip, self.spec.k_blocks, self.units)
        y = torch.ops.twla.ternary_gemm(q, s, z, sx, layer.twla_packed, layer.weight_scale,
                                        layer.weight_offset, layer.twla_tsum, x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
