"""`TwlaConfig`: vLLM's view of a TWLA checkpoint's `quantization_config`."""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from .architectures import check_architecture
from .format import FUSED_GROUPS, CheckpointConfig, FormatError, LayerSpec, validate_checkpoint


class TwlaConfig(QuantizationConfig):
    def __init__(self, checkpoint: CheckpointConfig | None = None):
        super().__init__()
        if checkpoint is None:
            # vLLM calls the class with no arguments when config.json has no quantization_config.
            raise FormatError("quantization='twla' needs a TWLA checkpoint (config.json must contain a "
                              "quantization_config with quant_method 'twla'); create one with twla-quantize")
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        c = self.checkpoint
        return (f"TwlaConfig(group_size={c.group_size}, default={c.default}, layers={len(c.layers)}, "
                f"ignore={c.ignore})")

    @classmethod
    def get_name(cls) -> str:
        return "twla"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the torch reference runs anywhere; Triton kernels check their own needs

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TwlaConfig":
        return cls(CheckpointConfig.from_dict(config, source="config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None):
        # Runs once in the front-end process before any worker starts: refuse an architecture TWLA does not
        # serve and check every tensor header here, so bad checkpoints fail with a message naming the
        # architecture, file or tensor, not deep in a loader.
        if hf_config is not None:
            check_architecture(getattr(hf_config, "architectures", None), getattr(hf_config, "model_type", None),
                               f"{model_name}: config.json")
        if os.path.isdir(model_name) and _has_weight_files(model_name):  # none: load_format="dummy"
            validate_checkpoint(model_name, self.checkpoint)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        c = self.checkpoint
        c.layers = hf_to_vllm_mapper.apply_dict(c.layers)
        c.ignore = [p if p.startswith("re:") else m
                    for p, m in zip(c.ignore, hf_to_vllm_mapper.apply_list(list(c.ignore)))]

    def _shards(self, prefix: str) -> list[str]:
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf) or FUSED_GROUPS.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in shards]

    def layer_spec(self, prefix: str) -> tuple[bool, LayerSpec]:
        """(ignored, spec) for a vLLM module prefix; fused modules resolve through their shards."""
        names = self._shards(prefix)
        ignored = {self.checkpoint.is_ignored(n) for n in names} | {self.checkpoint.is_ignored(prefix)}
        if len(ignored) > 1:
            raise FormatError(f"quantization_config.ignore: {prefix} is fused from {names}; ignore all or none")
        specs = {self.checkpoint.spec(n) for n in names}
        if len(specs) > 1:
            raise FormatError(f"quantization_config.layers: {names} are fused into {prefix} and must share "
                              f"one activation setting and rotation, got {specs}")
        return ignored.pop(), specs.pop()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        ignored, spec = self.layer_spec(prefix)
        if ignored:
            return UnquantizedLinearMethod()
        from .linear import TwlaLinearMethod

        return TwlaLinearMethod(self.checkpoint, spec, prefix)


def _has_weight_files(d: str) -> bool:
    return any(f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(d))
