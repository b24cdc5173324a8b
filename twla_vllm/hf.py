"""Load a TWLA checkpoint with transformers: `import twla_vllm.hf` registers quantization method "twla".

    import twla_vllm.hf  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("models/smollm2-twla")   # SimTwlaLinear layers

Without the import, transformers (5.x) does not know "twla": it only warns "Unknown quantization type" and
random-initialises every quantized linear, so the model computes noise (transformers has no hook that lets a
checkpoint refuse that; README and the checkpoint's model card say so). With it, every quantized linear becomes
`simulate.SimTwlaLinear`, which runs `reference.quant_linear` -- the same math as `load_simulated_model` and
vLLM's CPU path. Loading only: a simulated model cannot be saved back (`twla-quantize` writes checkpoints).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import format as fmt
from .simulate import replace_linear, simulated_layer


class TwlaHfConfig(QuantizationConfigMixin):
    """`quantization_config` of a TWLA checkpoint for transformers: the dict as written, validated by
    twla_vllm.format."""

    def __init__(self, **config: Any):
        self.quant_method = fmt.QUANT_METHOD
        self.raw = copy.deepcopy(config)
        self.checkpoint = fmt.CheckpointConfig.from_dict(config, source="config.json: quantization_config")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def __iter__(self):
        yield from self.to_dict().items()


class _StoredTwlaLinear(torch.nn.Module):
    """Holds one quantized linear's checkpoint tensors, named and typed as format v2 stores them, while
    transformers loads the weights; replaced by a SimTwlaLinear afterwards."""

    def __init__(self, linear: torch.nn.Linear, spec: fmt.LayerSpec, qcfg: fmt.CheckpointConfig):
        super().__init__()
        tensors = fmt.expected_tensors(spec, linear.out_features, linear.in_features,
                                       qcfg.spec_group_size(spec), qcfg.code, qcfg.version)
        for suffix, (shape, dtype) in tensors.items():
            self.register_parameter(suffix, torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            torch.empty_like(linear.bias), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a TWLA layer was used before transformers finished loading it")


class TwlaHfQuantizer(HfQuantizer):
    """Pre-quantized TWLA checkpoints only: each quantized linear is swapped for a holder of its stored tensors
    before loading and turned into a SimTwlaLinear after."""

    requires_calibration = True  # nothing to quantize on the fly: checkpoints come from twla-quantize

    def _process_model_before_weight_loading(self, model: torch.nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        if not checkpoint_files:
            raise fmt.FormatError("twla: transformers gave no checkpoint files to load (a TWLA model loads from "
                                  "a checkpoint directory written by twla-quantize)")
        directory = os.path.dirname(checkpoint_files[0])
        qcfg = fmt.validate_checkpoint(directory, self.quantization_config.checkpoint)  # names file and tensor
        index = fmt.read_tensor_index(directory)
        self.prefixes = sorted({name.rpartition(".")[0] for name in index if name.endswith("." + fmt.WEIGHT_PACKED)})
        for prefix in self.prefixes:
            try:
                linear = model.get_submodule(prefix)
            except AttributeError:
                raise fmt.FormatError(f"{directory}: quantized layer '{prefix}' is not a module of "
                                      f"{type(model).__name__}") from None
            if not isinstance(linear, torch.nn.Linear):
                raise fmt.FormatError(f"{directory}: quantized layer '{prefix}' is a {type(linear).__name__} in "
                                      f"{type(model).__name__}, not an nn.Linear")
            replace_linear(model, prefix, _StoredTwlaLinear(linear, qcfg.spec(prefix), qcfg))

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        qcfg = self.quantization_config.checkpoint
        for prefix in self.prefixes:
            stored = model.get_submodule(prefix)
            tensors = {f"{prefix}.{name}": p.data for name, p in stored.named_parameters(recurse=False)}
            replace_linear(model, prefix, simulated_layer(tensors, prefix, qcfg))
        return model

    def is_serializable(self) -> bool:
        return False  # SimTwlaLinear keeps unpacked weights; checkpoints are written by twla-quantize

    @property
    def is_trainable(self) -> bool:
        return False


if fmt.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # registration is global to the process: once
    register_quantization_config(fmt.QUANT_METHOD)(TwlaHfConfig)
    register_quantizer(fmt.QUANT_METHOD)(TwlaHfQuantizer)
