"""Kernel selection: the first kernel in the priority list whose `can_implement` accepts the layer.

Same shape as vLLM's `model_executor/kernels/linear`: a kernel owns the runtime weight layout
(`process_weights`) and the forward (`apply`); the linear method only loads checkpoint tensors.
"""

from __future__ import annotations

from .base import LinearSpec, TwlaKernel
from .torch_ref import TorchReferenceKernel
from .triton_kernel import TritonKernel

# Highest priority first: Triton on CUDA, the plain-torch reference everywhere else.
KERNELS: list[type[TwlaKernel]] = [TritonKernel, TorchReferenceKernel]


def choose_kernel(spec: LinearSpec) -> TwlaKernel:
    reasons = []
    for cls in KERNELS:
        ok, why = cls.can_implement(spec)
        if ok:
            return cls(spec)
        reasons.append(f"{cls.__name__}: {why}")
    raise ValueError(f"no TWLA kernel can run layer {spec.name}: " + "; ".join(reasons))


__all__ = ["KERNELS", "LinearSpec", "TwlaKernel", "choose_kernel"]
