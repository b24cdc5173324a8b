"""Kernel selection: the first kernel in the priority list whose `can_implement` accepts the layer.

Same shape as vLLM's `model_executor/kernels/linear`: a kernel owns the runtime weight layout
(`process_weights`) and the forward (`apply`); the linear method only loads checkpoint tensors.
"""

from __future__ import annotations

import os

from .base import LinearSpec, TwlaKernel
from .torch_ref import TorchReferenceKernel
from .triton_kernel import TritonKernel

# Highest priority first: Triton on CUDA, the plain-torch reference everywhere else.
KERNELS: list[type[TwlaKernel]] = [TritonKernel, TorchReferenceKernel]


def choose_kernel(spec: LinearSpec) -> TwlaKernel:
    """First kernel of KERNELS that can run `spec`, skipping those named in TWLA_DISABLED_KERNELS
    (comma-separated class names, e.g. TritonKernel), as vLLM's VLLM_DISABLED_KERNELS does."""
    disabled = {n.strip() for n in os.environ.get("TWLA_DISABLED_KERNELS", "").split(",") if n.strip()}
    reasons = []
    for cls in KERNELS:
        if cls.__name__ in disabled:
            reasons.append(f"{cls.__name__}: disabled by TWLA_DISABLED_KERNELS")
            continue
        ok, why = cls.can_implement(spec)
        if ok:
            return cls(spec)
        reasons.append(f"{cls.__name__}: {why}")
    raise ValueError(f"no TWLA kernel can run layer {spec.name}: " + "; ".join(reasons))


__all__ = ["KERNELS", "LinearSpec", "TwlaKernel", "choose_kernel"]
