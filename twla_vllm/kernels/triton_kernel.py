from __future__ import annotations

import torch

from .. import format as fmt
from .. import ops
from ..reference import prepare_unit_sums
from .base import LinearSpec, TwlaKernel


class TritonKernel(TwlaKernel):
    """CUDA: fused rotate + per-token quantize, then the packed 2-bit × int8 GEMM/GEMV (codes stay
    packed in HBM: 2 bits/weight read per call)."""

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
        wsum = prepare_unit_sums(t, layer.weight_scale, layer.weight_offset, self.spec.k_blocks)
        layer.register_parameter("twla_wsum", torch.nn.Parameter(wsum.contiguous(), requires_grad=False))
        for name in (fmt.WEIGHT_SCALE, fmt.WEIGHT_OFFSET):
            getattr(layer, name).data = getattr(layer, name).data.float().contiguous()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        q, s, z = torch.ops.twla.act_quant(x2, getattr(layer, fmt.ROT_LEFT, None),
                                           getattr(layer, fmt.ROT_RIGHT, None), self.spec.act_bits,
                                           self.spec.act_clip, self.spec.k_blocks)
        y = torch.ops.twla.ternary_gemm(q, s, z, layer.twla_packed, layer.weight_scale, layer.weight_offset,
                                        layer.twla_wsum, x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
