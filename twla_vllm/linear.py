"""`TwlaLinearMethod`: creates the checkpoint's parameters on a vLLM linear and runs it.

Loading uses vLLM's weight loader v2 with typed parameters, so merged q/k/v and gate/up modules and
tensor-parallel sharding come from vLLM itself: codes and group scales shard along K for row-parallel layers
and along N for column-parallel ones. Per-shard tensors of fused modules that cannot be concatenated along N
(transform factors, lowrank_b) are stacked, one slot per shard; transform factors are replicated and, for
row-parallel layers, cut to the rank's diagonal block after loading; lowrank_b of a row-parallel layer is cut
along K (the rank's partial low-rank products sum up in vLLM's all-reduce like the main GEMM's).
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
from .kernels import LayerWeights, LinearSpec, choose_kernel


class ShardStackParameter(BasevLLMParameter):
    """[S, ...]: slot i holds fused shard i's tensor. `row_dim`: dimension of the loaded tensor that a
    row-parallel layer shards by TP rank (None: replicated)."""

    def __init__(self, data: torch.Tensor, weight_loader, row_dim: int | None = None):
        super().__init__(data=data, weight_loader=weight_loader)
        self.row_dim = row_dim

    def _load(self, loaded: torch.Tensor, slot: int, row_parallel: bool = False) -> None:
        if row_parallel and self.row_dim is not None:
            size = self.data.shape[1 + self.row_dim]
            loaded = loaded.narrow(self.row_dim, self.tp_rank * size, size)
        if tuple(loaded.shape) != tuple(self.data.shape[1:]):
            raise FormatError(f"tensor of shape {list(loaded.shape)} does not fit parameter slot "
                              f"{list(self.data.shape[1:])}")
        self.data[slot].copy_(loaded)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0, row_parallel=True)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))


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
        ck, spec = self.checkpoint, self.spec
        code, gs = ck.code, ck.spec_group_size(spec)
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        fmt.check_linear_shape(self.prefix, spec, input_size, gs, code)
        tp = input_size // k_local
        if tp > 1 and spec.k_blocks % tp:
            raise FormatError(
                f"{self.prefix}: tensor parallel size {tp} splits this row-parallel layer's input, but the "
                f"checkpoint makes only k_blocks={spec.k_blocks} shard-local blocks (transform and activation "
                f"ranges); use a tensor_parallel_size dividing {spec.k_blocks}, or re-quantize with more "
                f"row-parallel blocks")
        layer.twla_tp = tp
        layer.twla_shard_sizes = tuple(output_partition_sizes)
        shards = len(output_partition_sizes)
        cpw = code.codes_per_word
        layer.register_parameter(fmt.WEIGHT_PACKED, PackedvLLMParameter(
            data=torch.empty(n_local, k_local // cpw, dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=cpw, weight_loader=loader))
        g_local = fmt.num_groups(k_local, gs)

        def group_param(name: str, dtype: torch.dtype, cols: int) -> None:
            data = torch.empty(n_local, cols, dtype=dtype)
            if gs == -1 or cols == 1 and name == fmt.WEIGHT_SCALE and ck.version == 2:
                p = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            else:
                p = GroupQuantScaleParameter(data=data, output_dim=0, input_dim=1, weight_loader=loader)
            layer.register_parameter(name, p)

        if ck.version == 1:
            group_param(fmt.WEIGHT_SCALE, torch.float32, g_local)
            group_param(fmt.WEIGHT_OFFSET_V1, torch.float32, g_local)
        else:
            group_param(fmt.WEIGHT_SCALE, torch.float16, 1)
            group_param(fmt.WEIGHT_GROUP_SCALE, torch.int8, g_local)
            group_param(fmt.WEIGHT_GROUP_OFFSET, torch.int8, g_local)
        if spec.rotation is not None:
            for name, n in ((fmt.ROT_LEFT, spec.rotation[0]), (fmt.ROT_RIGHT, spec.rotation[1])):
                # float32 whatever the model dtype: vLLM sets the default dtype to it while creating weights, and
                # the transform runs in fp32 (a bf16 factor would round every rotated activation twice)
                layer.register_parameter(name, ShardStackParameter(
                    data=torch.empty(shards, n, n, dtype=torch.float32), weight_loader=loader))
        if spec.lowrank_rank:
            r = spec.lowrank_rank
            layer.register_parameter(fmt.LOWRANK_A, ChannelQuantScaleParameter(
                data=torch.empty(n_local, r, dtype=fmt.LOWRANK_DTYPE), output_dim=0, weight_loader=loader))
            layer.register_parameter(fmt.LOWRANK_B, ShardStackParameter(
                data=torch.empty(shards, r, k_local, dtype=fmt.LOWRANK_DTYPE), weight_loader=loader, row_dim=1))
        layer.twla_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        ck, spec = self.checkpoint, self.spec
        code = ck.code
        dummy = _is_dummy_load()
        if dummy:  # load_format="dummy" (benchmarks) leaves random values: make them a valid layer
            _sanitize_dummy(layer, ck)
        packed = layer.weight_packed.data
        names = ", ".join(self._checkpoint_names())
        try:
            codes = fmt.unpack_codes(packed, code, f"{self.prefix}.{fmt.WEIGHT_PACKED} (checkpoint: {names})")
            if ck.version == 1:
                t = code.values(codes)
                codes, row_scale, qa, qm = fmt.upgrade_v1(t, layer.weight_scale.data, layer.weight_offset.data)
                packed = fmt.pack_codes(codes, code).to(packed.device)
                row_scale, qa, qm = row_scale.to(packed.device), qa.to(packed.device), qm.to(packed.device)
            else:
                qa, qm = layer.weight_group_scale.data, layer.weight_group_offset.data
                fmt.check_int_grid(qa, qm, code, f"{self.prefix} (checkpoint: {names})")
                row_scale = layer.weight_scale.data
        except FormatError as e:
            raise FormatError(str(e)) from None
        left = right = None
        per_shard = False
        if spec.rotation is not None:
            left, right = layer.input_rot_left.data, layer.input_rot_right.data
            per_shard = bool(left.shape[0] > 1 and not (torch.equal(left, left[:1].expand_as(left))
                                                        and torch.equal(right, right[:1].expand_as(right))))
            if not per_shard:
                left, right = left[:1], right[:1]
            if spec.k_blocks > 1:
                left = self._check_and_shard_left_factor(left, layer.twla_tp, layer.input_rot_left.tp_rank,
                                                         check=not dummy)
        lowrank_a = lowrank_b = None
        if spec.lowrank_rank:
            lowrank_a = layer.lowrank_a.data
            lowrank_b = layer.lowrank_b.data.reshape(-1, layer.lowrank_b.shape[-1])
        w_int = fmt.int_weights(codes, qa, qm, code)
        for name in list(dict(layer.named_parameters(recurse=False))):
            if name != "bias":
                delattr(layer, name)
        n, k = codes.shape
        self.kernel = choose_kernel(LinearSpec(
            name=self.prefix, out_features=n, in_features=k, code=code, group_size=ck.spec_group_size(spec),
            act_bits=spec.act_bits, act_clip=spec.act_clip, k_blocks=spec.k_blocks // layer.twla_tp,
            act_blocks=spec.act_ranges // layer.twla_tp,
            rotation_rows=0 if spec.rotation is None else spec.rotation[0] // layer.twla_tp,
            lowrank_rank=spec.lowrank_rank,
            shard_sizes=layer.twla_shard_sizes, per_shard_rotation=per_shard, device_type=packed.device.type,
            dtype=layer.twla_params_dtype))
        self.kernel.process_weights(layer, LayerWeights(
            packed=packed.contiguous(), codes=codes, row_scale=row_scale.reshape(-1), group_scale=qa.contiguous(),
            group_offset=qm.contiguous(), w_int=w_int, left=None if left is None else left.contiguous(),
            right=None if right is None else right.contiguous(), lowrank_a=lowrank_a, lowrank_b=lowrank_b))

    def _check_and_shard_left_factor(self, left: torch.Tensor, tp: int, rank: int, check: bool = True) -> torch.Tensor:
        """k_blocks > 1 promises a block-diagonal left factor (rows of x.reshape(n1, n2) never mix across
        K-blocks). Check it; under TP keep this rank's diagonal block. left: [S, n1, n1]."""
        kb, n1 = self.spec.k_blocks, left.shape[1]
        b = n1 // kb
        mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool, device=left.device)] * kb)
        off = left.masked_fill(mask, 0).abs().max().item() if check else 0.0
        if off > 1e-6:
            raise FormatError(
                f"{self.prefix}: tensor '{fmt.ROT_LEFT}' mixes rows across its k_blocks={kb} blocks "
                f"(off-block-diagonal entries up to {off:.3g}), so it cannot run shard-local under tensor "
                f"parallel size {tp}; the checkpoint is inconsistent: re-export it")
        if tp > 1:
            rows = n1 // tp
            left = left[:, rank * rows:(rank + 1) * rows, rank * rows:(rank + 1) * rows]
        return left

    def _checkpoint_names(self) -> list[str]:
        parent, _, leaf = self.prefix.rpartition(".")
        return [f"{parent}.{s}" if parent else s for s in fmt.FUSED_GROUPS.get(leaf, (leaf,))]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)


def _sanitize_dummy(layer: torch.nn.Module, ck: CheckpointConfig) -> None:
    """Random dummy values -> a valid layer: invalid codes to the largest valid one, group scales within the
    integer grid, offsets zero, positive row scales."""
    code = ck.code
    p = layer.weight_packed.data
    if code.name == "ternary":  # code 3 (bits 11) -> 2 (bits 10)
        layer.weight_packed.data = p & ~((p >> 1) & p & 0x55555555)
    if ck.version == 2:
        amax = fmt.INT_WEIGHT_MAX // max(code.vmax, -code.vmin)
        qa = layer.weight_group_scale.data.to(torch.int32).abs() % (amax + 1)
        layer.weight_group_scale.data = qa.to(torch.int8)
        layer.weight_group_offset.data.zero_()
        layer.weight_scale.data = layer.weight_scale.data.abs().clamp(min=1e-4, max=1e-2)


def _is_dummy_load() -> bool:
    try:
        from vllm.config import get_current_vllm_config

        return str(get_current_vllm_config().load_config.load_format) in ("dummy", "LoadFormat.DUMMY")
    except Exception:  # noqa: BLE001 - outside an engine (unit tests): real weights
        return False
