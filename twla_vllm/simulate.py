"""Simulated-quant Hugging Face model: each quantized nn.Linear replaced by `SimTwlaLinear`, which
runs `reference.ternary_linear` (the same function the vLLM CPU path runs).

Used by the offline tool for evaluation and by tests as the oracle for served tokens.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from . import format as fmt
from .reference import prepare_unit_sums, ternary_linear


class SimTwlaLinear(torch.nn.Module):
    """nn.Linear stand-in: rotate -> per-token fake-quant -> ternary GEMM -> epilogue (+ bias)."""

    def __init__(self, t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, left: torch.Tensor | None,
                 right: torch.Tensor | None, act_bits: int, act_clip: float, k_blocks: int = 1,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.act_bits, self.act_clip, self.k_blocks = act_bits, act_clip, k_blocks
        self.register_buffer("t", t.to(torch.float32))
        self.register_buffer("alpha", alpha.to(torch.float32))
        self.register_buffer("mu", mu.to(torch.float32))
        self.register_buffer("wsum", prepare_unit_sums(self.t, self.alpha, self.mu, k_blocks))
        self.register_buffer("left", None if left is None else left.to(torch.float32))
        self.register_buffer("right", None if right is None else right.to(torch.float32))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ternary_linear(x, self.t, self.alpha, self.mu, self.left, self.right, self.act_bits,
                           self.act_clip, self.k_blocks, wsum=self.wsum)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        rot = None if self.left is None else (self.left.shape[0], self.right.shape[0])
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"clip={self.act_clip:.3f}, k_blocks={self.k_blocks}, rotation={rot}")


def replace_linear(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def load_simulated_model(model_dir: str, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the HF model of a TWLA checkpoint with `SimTwlaLinear` layers (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = fmt.validate_checkpoint(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg_dict = json.load(f)
    cfg_dict.pop("quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        with safe_open(os.path.join(model_dir, fname), framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    quantized = sorted({k.rpartition(".")[0] for k in tensors if k.endswith("." + fmt.WEIGHT_PACKED)})
    for prefix in quantized:
        spec = qcfg.spec(prefix)
        t = fmt.unpack_ternary(tensors.pop(f"{prefix}.{fmt.WEIGHT_PACKED}"))
        left = tensors.pop(f"{prefix}.{fmt.ROT_LEFT}", None)
        right = tensors.pop(f"{prefix}.{fmt.ROT_RIGHT}", None)
        layer = SimTwlaLinear(t, tensors.pop(f"{prefix}.{fmt.WEIGHT_SCALE}"),
                              tensors.pop(f"{prefix}.{fmt.WEIGHT_OFFSET}"), left, right, spec.act_bits,
                              spec.act_clip, spec.k_blocks, tensors.pop(f"{prefix}.bias", None))
        replace_linear(model, prefix, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise fmt.FormatError(f"{model_dir}: tensors {unexpected[:5]} match no module of "
                              f"{type(model).__name__}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if not _is_sim_buffer(model, m)]
    if missing:
        raise fmt.FormatError(f"{model_dir}: missing tensors {missing[:5]}")
    return model.to(device).eval()


def _is_sim_buffer(model: torch.nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), SimTwlaLinear) if owner else False
