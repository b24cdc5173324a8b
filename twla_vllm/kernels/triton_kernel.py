from __future__ import annotations

import logging

import torch

from .. import ops
from ..reference import block_row_sums
from .base import LayerWeights, LinearSpec, TwlaKernel, register

logger = logging.getLogger("twla_vllm")
MIN_CAPABILITY = (8, 0)  # int8 x int8 -> int32 tensor-core MMA (Ampere and later)
TESTED_CAPABILITIES = {(9, 0)}  # H100: where the kernels were verified against the reference
_WARNED: set[tuple[int, int]] = set()  # capabilities already warned about in this process


class TritonKernel(TwlaKernel):
    """CUDA: fused transform + per-token quantize, then the packed-code int8 GEMV / tensor-core GEMM with the
    low-rank branch and bias in its epilogue. Resident per weight: the B-bit codes, int8 group scale and offset
    (laid out as `triton_ops.layout.SERVED_LAYOUT` says), fp16 row scale and int32 row sums per K-block."""

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, "needs a CUDA device"
        if ops.triton_ops is None:
            return False, "Triton is not installed"
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < MIN_CAPABILITY:
            need = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
            return False, f"needs compute capability >= {need} (int8 tensor-core MMA), this GPU is sm_{major}{minor}"
        if (major, minor) not in TESTED_CAPABILITIES and (major, minor) not in _WARNED:
            _WARNED.add((major, minor))
            logger.warning("TWLA: TritonKernel is verified on sm_90 (H100) only; this GPU is sm_%d%d: it should "
                           "work (int8 MMA, dp4a) but is untested here -- compare with TWLA_DISABLED_KERNELS="
                           "TritonKernel (the torch reference) before relying on it", major, minor)
        if spec.act_bits > 8:
            return False, "float activations (act_bits 16) run on the reference kernel"
        if (spec.in_features // spec.act_blocks) % 32:
            return False, (f"activation range of {spec.in_features // spec.act_blocks} channels is not a multiple of "
                           f"32 (int8 MMA K)")
        if not ops.triton_ops.act_ranges_supported(spec.in_features, spec.k_blocks, spec.act_blocks,
                                                   spec.rotation_rows):
            return False, (f"{spec.act_blocks} activation ranges over {spec.k_blocks} transform block(s) are not "
                           f"a power of two of whole rows each")
        if len(spec.shard_sizes) > 3:
            return False, "more than three fused shards"
        return True, None

    def process_weights(self, layer: torch.nn.Module, w: LayerWeights) -> None:
        # the kernels' layout of words and scales (`triton_ops.layout`, SERVED_LAYOUT); row chunks need every shard
        # to start and end on a chunk (shards are sliced by rows at run time)
        chunk = ops.triton_ops.ROW_CHUNK
        if any(sl.start % chunk or sl.stop % chunk for sl in self.shard_slices()):
            chunk = 1
        packed, qa, qm = ops.triton_ops.resident(w.packed, w.group_scale, w.group_offset, self.spec.code.bits,
                                                 self.spec.group_size, chunk=chunk)
        register(layer, "twla_packed", packed, keep_strides=True)
        register(layer, "twla_row_scale", w.row_scale.half())
        register(layer, "twla_qa", qa, keep_strides=True)
        register(layer, "twla_qm", qm, keep_strides=True)
        register(layer, "twla_rowsum", block_row_sums(w.w_int, self.spec.act_blocks))
        register(layer, "twla_left", w.left)
        register(layer, "twla_right", w.right)
        register(layer, "twla_lowrank_a", w.lowrank_a)
        # B stays fp16 as stored: act_quant converts it in registers, its products with 16-bit x are fp32-exact in
        # one TF32 pass (`lowrank_dot_precision`), and half the bytes of an fp32 copy are read per call
        register(layer, "twla_lowrank_b", w.lowrank_b)
        ends = [sl.stop for sl in self.shard_slices()] + [self.spec.out_features] * 2
        self.shard_ends = (ends[0], ends[1])

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        s = self.spec
        if not s.per_shard_rotation:
            y = self._call(layer, x2, slice(None), 0, bias, self.shard_ends, layer.twla_lowrank_b)
        else:  # one transform per shard: each shard quantizes its own copy of x
            rank = s.lowrank_rank
            n = s.out_features
            y = torch.cat([self._call(layer, x2, rows, i, None if bias is None else bias[rows], (n, n),
                                      None if not rank else layer.twla_lowrank_b[i * rank:(i + 1) * rank])
                           for i, rows in enumerate(self.shard_slices())], dim=-1)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _call(self, layer, x2, rows, j, bias, ends, lowrank_b):
        s = self.spec
        left = None if layer.twla_left is None else layer.twla_left[j]
        right = None if layer.twla_right is None else layer.twla_right[j]
        la = None if not s.lowrank_rank else layer.twla_lowrank_a[rows]
        return torch.ops.twla.quant_linear(
            x2, ops.triton_ops.chunk_rows(layer.twla_packed, rows), layer.twla_row_scale[rows],
            layer.twla_qa[rows], layer.twla_qm[rows], layer.twla_rowsum[rows], left, right, la,
            lowrank_b, bias, s.code.bits, s.code.step, s.code.offset, s.group_size, s.act_bits, s.act_clip,
            s.k_blocks, s.act_blocks, *ends)
