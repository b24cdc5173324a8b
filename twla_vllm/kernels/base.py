from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel needs to know about one (rank-local) TWLA linear."""

    name: str
    out_features: int  # N on this rank
    in_features: int  # K on this rank
    group_size: int  # -1 = per row
    act_bits: int
    act_clip: float
    k_blocks: int  # activation ranges per (token, contiguous K-block) on this rank
    has_rotation: bool
    device_type: str
    dtype: torch.dtype


class TwlaKernel(ABC):
    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        ...

    @abstractmethod
    def process_weights(self, layer: torch.nn.Module, t: torch.Tensor, packed: torch.Tensor) -> None:
        """Turn the loaded layer (alpha, mu, rotation as float32; t = int8 ternary [N, K], `packed` =
        the same codes as stored, int32 [N, K/16]) into this kernel's runtime layout."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ...
