from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.twla.*)
from ..reference import prepare_unit_sums
from .base import LinearSpec, TwlaKernel


class TorchReferenceKernel(TwlaKernel):
    """Plain torch (any device): the CPU serving path and the fallback everywhere.

    Keeps t as fp32 so the integer GEMM runs on BLAS and stays exact (|partial sums| < 2**24).
    """

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        return True, None

    def process_weights(self, layer: torch.nn.Module, t: torch.Tensor, packed: torch.Tensor) -> None:
        tf = t.to(torch.float32)
        layer.register_parameter("twla_t", torch.nn.Parameter(tf, requires_grad=False))
        wsum = prepare_unit_sums(tf, layer.weight_scale, layer.weight_offset, self.spec.k_blocks)
        layer.register_parameter("twla_wsum", torch.nn.Parameter(wsum, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.twla.ternary_linear_ref(
            x2, layer.twla_t, layer.weight_scale, layer.weight_offset, layer.twla_wsum,
            getattr(layer, "input_rot_left", None), getattr(layer, "input_rot_right", None),
            self.spec.act_bits, self.spec.act_clip, self.spec.k_blocks)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
