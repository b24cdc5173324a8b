"""Where the model lives while it is quantized: whole on the device, or in CPU memory with one decoder block at
a time on the device (sequential onloading, as llm-compressor does), so a model larger than the GPU still
quantizes on it. Everything outside the decoder blocks (embeddings, final norm, head, rotary tables) and the
cached hidden states stay on the device; a block is moved over for its own quantization and, during the
whole-model passes (bit allocation, clip search, evaluation), for its own forward. The passes that only compare
or descend (bit allocation, clip search, scale tuning's gradient steps) may run their float32 matmuls on CUDA in
TF32 (`cuda_matmul_precision`); GPTQ and the rotations' folds stay in full float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODES = ("auto", "on", "off")
# offload when the float32 model would take more than this share of the device's memory: quantizing a block
# needs room for its float32 copy, its Hessians and the calibration activations besides the model itself
AUTO_SHARE = 0.35


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * 4 for t in model.parameters())  # as float32, the dtype the quantizer works in


def wants_offload(mode: str, device: str, model: torch.nn.Module) -> bool:
    """Whether `model` should stay in CPU memory: `mode` on/off, or auto (only for a CUDA device it would crowd)."""
    if mode not in MODES:
        raise ValueError(f"offload must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if not str(device).startswith("cuda"):
        return False
    return model_bytes(model) > AUTO_SHARE * torch.cuda.get_device_properties(torch.device(device)).total_memory


class Placement:
    """The device the quantizer computes on and whether decoder blocks live elsewhere (`offload`)."""

    def __init__(self, device: str = "cpu", offload: bool = False, store: str = "cpu"):
        self.device, self.offload, self.store = torch.device(device), offload, torch.device(store)

    def place(self, model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
        """Put `model` where it lives: all on the device, or its blocks in `store` and the rest on the device."""
        if not self.offload:
            model.to(self.device)
            return
        model.to(self.store)
        in_blocks = {id(m) for layer in layers for m in layer.modules()}
        for mod in model.modules():
            if id(mod) in in_blocks:
                continue
            for _, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None:  # shared tensors (tied embeddings) move once and stay shared
                    t.data = t.data.to(self.device)

    @contextlib.contextmanager
    def block(self, layer: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`layer` on the device for the duration (a no-op when nothing is offloaded)."""
        if self.offload:
            layer.to(self.device)
        try:
            yield layer
        finally:
            if self.offload:
                layer.to(self.store)

    def home(self) -> torch.device:
        """Where decoder blocks rest between uses."""
        return self.store if self.offload else self.device

    @contextlib.contextmanager
    def streaming(self, layers: torch.nn.ModuleList) -> Iterator[None]:
        """For whole-model passes: a block moves to the device (with its input hidden states) when its forward
        starts and stays until another block's starts, so mini-batches through one block move it once and at
        most one block is on the device."""
        if not self.offload:
            yield
            return
        resident: list[torch.nn.Module] = []

        def onload(mod, args, kwargs):
            if not resident or resident[0] is not mod:
                if resident:
                    resident.pop().to(self.store)
                mod.to(self.device)
                resident.append(mod)
            if "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].to(self.device)}
            return tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args), kwargs

        handles = [layer.register_forward_pre_hook(onload, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in resident:
                layer.to(self.store)


@contextlib.contextmanager
def placed(model: torch.nn.Module, device: str, mode: str = "auto") -> Iterator[torch.nn.Module]:
    """`model` set up on `device` for whole-model passes (evaluation): whole, or streamed a block at a time."""
    layers = model.model.layers
    place = Placement(device, wants_offload(mode, device, model))
    place.place(model, layers)
    with torch.device(place.device), place.streaming(layers):
        yield model


@contextlib.contextmanager
def cuda_matmul_precision(precision: str) -> Iterator[None]:
    """Float32 matmuls on CUDA at `precision` ("tf32" or "ieee") inside the block; CPU matmuls are untouched."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
