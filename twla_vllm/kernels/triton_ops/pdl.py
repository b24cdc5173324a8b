"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
in the stream still runs, so its prologue (weights are constants) overlaps that kernel; `gdc_wait` then blocks until
the earlier kernel is done and its writes are visible. Every kernel here issues the wait before its first read of
another kernel's output, and act_quant / the matmuls signal `gdc_launch_dependents` early so the next one can start.
The instructions are no-ops for kernels launched without the attribute, so they are compiled in wherever the GPU
has them; the launch attribute is set where it measured faster (`tiles.use_pdl`: decode sizes and GEMMs with one
activation K-block; KERNEL_NOTES v20, v22), and never with TWLA_PDL=0 in the environment (read at import): a switch
for a CUDA graph capture that rejects it."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

try:
    from triton.backends.nvidia.compiler import CUDAOptions

    _TRITON_HAS_PDL = hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # a Triton without the NVIDIA backend
    _TRITON_HAS_PDL = False


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def gdc(device: torch.device) -> bool:
    """Whether kernels on this device compile in the grid-dependency instructions (CUDA, sm_90+, Triton with PDL)."""
    return device.type == "cuda" and _TRITON_HAS_PDL and _sm90(device.index or 0)


_PDL_OFF = os.environ.get("TWLA_PDL") == "0"


def launch_options(device: torch.device, pdl: bool) -> dict:
    """Launch keywords of a kernel that waits on the one before it: {"launch_pdl": True} where it may overlap it
    (`pdl`, `gdc(device)` and not TWLA_PDL=0), else none."""
    return {"launch_pdl": True} if pdl and not _PDL_OFF and gdc(device) else {}
