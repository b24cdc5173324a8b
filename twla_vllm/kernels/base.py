from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..format import WeightCode


@dataclass(frozen=True)
class LinearSpec:
    """What a kernel needs to know about one (rank-local) TWLA linear."""

    name: str
    out_features: int  # N on this rank
    in_features: int  # K on this rank
    code: WeightCode
    group_size: int  # -1 = per row
    act_bits: int
    act_clip: float
    k_blocks: int  # transform blocks on this rank (the left factor is block-diagonal over them)
    act_blocks: int  # activation ranges per (token, contiguous K-block) on this rank: a multiple of k_blocks
    rotation_rows: int  # n1 of the online transform's [n1, n2] token view on this rank (0 = no transform)
    lowrank_rank: int
    shard_sizes: tuple[int, ...]  # output rows of each fused shard on this rank (one entry if not fused)
    per_shard_rotation: bool  # the shards of a fused module carry different transforms
    device_type: str
    dtype: torch.dtype

    @property
    def has_rotation(self) -> bool:
        return self.rotation_rows > 0


@dataclass
class LayerWeights:
    """A loaded layer in the form every kernel starts from (rank-local, on the layer's device)."""

    packed: torch.Tensor  # int32 [N, K*B/32] codes as stored
    codes: torch.Tensor  # int32 [N, K]
    row_scale: torch.Tensor  # fp16 [N]
    group_scale: torch.Tensor  # int8 [N, G]
    group_offset: torch.Tensor  # int8 [N, G]
    w_int: torch.Tensor  # int8 [N, K] = a * v(c) + m
    left: torch.Tensor | None  # [S, n1, n1] (S = 1 unless per-shard transforms)
    right: torch.Tensor | None  # [S, n2, n2]
    lowrank_a: torch.Tensor | None  # fp16 [N, R]
    lowrank_b: torch.Tensor | None  # fp16 [S*R, K]


class TwlaKernel(ABC):
    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        ...

    @abstractmethod
    def process_weights(self, layer: torch.nn.Module, w: LayerWeights) -> None:
        """Register this kernel's runtime tensors on `layer` (the checkpoint parameters are gone by now)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ...

    def shard_slices(self) -> list[slice]:
        bounds, start = [], 0
        for size in self.spec.shard_sizes:
            bounds.append(slice(start, start + size))
            start += size
        return bounds


def register(layer: torch.nn.Module, name: str, t: torch.Tensor | None, keep_strides: bool = False) -> None:
    """t as a frozen parameter, made contiguous unless keep_strides (a kernel's layout, e.g. an N-major view)."""
    if t is not None and not keep_strides:
        t = t.contiguous()
    layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
