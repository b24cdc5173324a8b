"""Kernel selection: the first kernel in the priority list whose `can_implement` accepts the layer.

Same shape as vLLM's `model_executor/kernels/linear`: a kernel owns the runtime weight layout
(`process_weights`) and the forward (`apply`); the linear method only loads checkpoint tensors.
"""

from __future__ import annotations

import logging
import os

from .base import LayerWeights, LinearSpec, TwlaKernel
from .torch_ref import TorchReferenceKernel
from .triton_kernel import TritonKernel

logger = logging.getLogger("twla_vllm")

# Highest priority first: Triton on CUDA, the plain-torch reference everywhere else.
KERNELS: list[type[TwlaKernel]] = [TritonKernel, TorchReferenceKernel]
_REPORTED: set[tuple[str, str]] = set()  # (kernel, refusal reasons) already logged in this process


def choose_kernel(spec: LinearSpec) -> TwlaKernel:
    """First kernel of KERNELS that can run `spec`, skipping those named in TWLA_DISABLED_KERNELS
    (comma-separated class names, e.g. TritonKernel), as vLLM's VLLM_DISABLED_KERNELS does. Logs once per
    process and (kernel, reasons) which kernel runs and why faster ones were refused; a CUDA layer falling
    back to the plain-torch reference is a warning."""
    disabled = {n.strip() for n in os.environ.get("TWLA_DISABLED_KERNELS", "").split(",") if n.strip()}
    reasons = []
    for cls in KERNELS:
        if cls.__name__ in disabled:
            reasons.append(f"{cls.__name__}: disabled by TWLA_DISABLED_KERNELS")
            continue
        ok, why = cls.can_implement(spec)
        if ok:
            _report(cls.__name__, spec, reasons)
            return cls(spec)
        reasons.append(f"{cls.__name__}: {why}")
    raise ValueError(f"no TWLA kernel can run layer {spec.name}: " + "; ".join(reasons))


def _report(kernel: str, spec: LinearSpec, refused: list[str]) -> None:
    key = (kernel, "; ".join(refused))
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    why = f" (refused: {key[1]})" if refused else ""
    msg = (f"TWLA: {kernel} runs {spec.code.name} layers like {spec.name} (act_bits {spec.act_bits}, "
           f"K={spec.in_features}, k_blocks={spec.k_blocks}){why}; further layers with this choice are not logged")
    if spec.device_type == "cuda" and kernel == TorchReferenceKernel.__name__:
        logger.warning(msg + " -- the plain-torch reference on a GPU is slow")
    else:
        logger.info(msg)


__all__ = ["KERNELS", "LayerWeights", "LinearSpec", "TwlaKernel", "choose_kernel"]
