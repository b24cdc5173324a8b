"""`TwlaLinearMethod`: creates the checkpoint's parameters on a vLLM linear and runs it.

Loading uses vLLM's weight loader v2 with typed parameters, so merged q/k/v and gate/up modules and
tensor-parallel sharding come from vLLM itself: codes and group scales shard along K for row-parallel
layers and along N for column-parallel ones; rotation factors are replicated and, for row-parallel
layers, cut to the rank's diagonal block after loading.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from . import format as fmt
from .format import CheckpointConfig, FormatError, LayerSpec
from .kernels import LinearSpec, choose_kernel


@register_weight_loader_v2_supported_method
class TwlaLinearMethod(LinearMethodBase):
    def __init__(self, checkpoint: CheckpointConfig, spec: LayerSpec, prefix: str):
        self.checkpoint = checkpoint
        self.spec = spec
        self.prefix = prefix
        self.kernel = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        loader = extra_weight_attrs["weight_loader"]
        gs = self.checkpoint.group_size
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        fmt.check_linear_shape(self.prefix, self.spec, input_size, gs)
        tp = input_size // k_local
        if tp > 1 and self.spec.k_blocks % tp:
            raise FormatError(
                f"{self.prefix}: tensor parallel size {tp} splits this row-parallel layer's input, but the "
                f"checkpoint makes only k_blocks={self.spec.k_blocks} shard-local blocks (rotation and "
                f"activation ranges); use a tensor_parallel_size dividing {self.spec.k_blocks}, or re-quantize "
                f"with more row-parallel blocks")
        layer.twla_tp = tp

        weight_packed = PackedvLLMParameter(
            data=torch.empty(n_local, k_local // fmt.CODES_PER_WORD, dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=fmt.CODES_PER_WORD, weight_loader=loader)
        layer.register_parameter(fmt.WEIGHT_PACKED, weight_packed)

        g_local = fmt.num_groups(k_local, gs)
        for name in (fmt.WEIGHT_SCALE, fmt.WEIGHT_OFFSET):
            data = torch.empty(n_local, g_local, dtype=torch.float32)
            if gs == -1:
                p = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            else:
                p = GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=loader)
            layer.register_parameter(name, p)

        if self.spec.rotation is not None:
            for name, n in ((fmt.ROT_LEFT, self.spec.rotation[0]), (fmt.ROT_RIGHT, self.spec.rotation[1])):
                p = BasevLLMParameter(data=torch.empty(n, n, dtype=torch.float32), weight_loader=loader)
                layer.register_parameter(name, p)
        layer.twla_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        packed = layer.weight_packed.data
        dummy = _is_dummy_load()
        if dummy:  # load_format="dummy" (benchmarks) leaves int32 codes random: map code 3 to 2
            packed = packed & ~((packed >> 1) & packed & 0x55555555)
            layer.weight_packed.data = packed
        try:
            t = fmt.unpack_ternary(packed)
        except FormatError:
            shards = ", ".join(self._checkpoint_names())
            raise FormatError(f"{self.prefix}: tensor '{fmt.WEIGHT_PACKED}' (checkpoint: {shards}) holds the "
                              f"invalid code 3; valid codes are 0, 1, 2 (ternary t + 1)") from None
        if self.spec.rotation is not None and self.spec.k_blocks > 1:
            self._check_and_shard_left_factor(layer, check=not dummy)
        for name in (fmt.WEIGHT_SCALE, fmt.WEIGHT_OFFSET, fmt.ROT_LEFT, fmt.ROT_RIGHT):
            if hasattr(layer, name):  # drop the loader-typed wrappers: plain tensors from here on
                data = getattr(layer, name).data
                delattr(layer, name)
                layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
        del layer.weight_packed
        self.kernel = choose_kernel(LinearSpec(
            name=self.prefix, out_features=t.shape[0], in_features=t.shape[1],
            group_size=self.checkpoint.group_size, act_bits=self.spec.act_bits, act_clip=self.spec.act_clip,
            k_blocks=self.spec.k_blocks // layer.twla_tp,
            has_rotation=self.spec.rotation is not None, device_type=packed.device.type,
            dtype=layer.twla_params_dtype))
        self.kernel.process_weights(layer, t, packed)

    def _check_and_shard_left_factor(self, layer: torch.nn.Module, check: bool = True) -> None:
        """k_blocks > 1 promises a block-diagonal left factor (rows of x.reshape(n1, n2) never mix
        across K-blocks). Check it; under TP keep this rank's diagonal block."""
        left = layer.input_rot_left.data
        kb, n1, tp = self.spec.k_blocks, left.shape[0], layer.twla_tp
        b = n1 // kb
        mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool, device=left.device)] * kb)
        off = left.masked_fill(mask, 0).abs().max().item() if check else 0.0
        if off > 1e-6:
            raise FormatError(
                f"{self.prefix}: tensor '{fmt.ROT_LEFT}' mixes rows across its k_blocks={kb} blocks "
                f"(off-block-diagonal entries up to {off:.3g}), so it cannot run shard-local under tensor "
                f"parallel size {tp}; the checkpoint is inconsistent: re-export it")
        if tp > 1:
            r, rows = layer.tp_rank, n1 // tp
            layer.input_rot_left.data = left[r * rows:(r + 1) * rows, r * rows:(r + 1) * rows].contiguous()

    def _checkpoint_names(self) -> list[str]:
        parent, _, leaf = self.prefix.rpartition(".")
        return [f"{parent}.{s}.{fmt.WEIGHT_PACKED}" for s in fmt.FUSED_GROUPS.get(leaf, (leaf,))]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)


def _is_dummy_load() -> bool:
    try:
        from vllm.config import get_current_vllm_config

        return str(get_current_vllm_config().load_config.load_format) in ("dummy", "LoadFormat.DUMMY")
    except Exception:  # noqa: BLE001 - outside an engine (unit tests): real weights
        return False
