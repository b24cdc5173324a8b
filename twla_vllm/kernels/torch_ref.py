from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.twla.*)
from ..reference import block_row_sums
from .base import LayerWeights, LinearSpec, TwlaKernel, register


class TorchReferenceKernel(TwlaKernel):
    """Plain torch (any device): the CPU serving path and the fallback everywhere.

    Keeps the integer weights as float32 so the integer GEMM runs on BLAS (exact while partial sums stay
    below 2**24, see `reference`)."""

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        return True, None

    def process_weights(self, layer: torch.nn.Module, w: LayerWeights) -> None:
        register(layer, "twla_w", w.w_int.float())
        register(layer, "twla_row_scale", w.row_scale.float())
        register(layer, "twla_rowsum", block_row_sums(w.w_int, self.spec.act_blocks))
        register(layer, "twla_left", w.left)
        register(layer, "twla_right", w.right)
        register(layer, "twla_lowrank_a", w.lowrank_a)
        register(layer, "twla_lowrank_b", w.lowrank_b)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        s = self.spec
        rank = s.lowrank_rank
        outs = []
        for i, rows in enumerate(self.shard_slices()):
            j = i if s.per_shard_rotation else 0
            left = None if layer.twla_left is None else layer.twla_left[j]
            right = None if layer.twla_right is None else layer.twla_right[j]
            la = None if not rank else layer.twla_lowrank_a[rows]
            lb = None if not rank else layer.twla_lowrank_b[i * rank:(i + 1) * rank]
            outs.append(torch.ops.twla.quant_linear_ref(
                x2, layer.twla_w[rows], layer.twla_row_scale[rows], layer.twla_rowsum[rows], left, right, la, lb,
                None if bias is None else bias[rows], s.act_bits, s.act_clip))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.reshape(*x.shape[:-1], y.shape[-1])
