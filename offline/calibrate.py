"""Calibrate stage: run a decoder block at a time on cached hidden states and collect what the
quantizers need (input Gram matrices of rotated activations, captured inputs) without ever holding
more than one block's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from twla_vllm.reference import fake_quant_per_token, kron_rotate


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block, in mini-batches, plus the keyword arguments the model passes
    to every decoder layer (rotary embeddings, masks)."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any]

    def to(self, device) -> "BlockInputs":
        """The hidden states moved to `device` (the keyword arguments stay where the model made them)."""
        return BlockInputs([h.to(device) for h in self.hidden], self.kwargs)


def calibration_tokens(inputs: BlockInputs) -> int:
    """How many token rows the calibration hidden states hold."""
    return sum(h.numel() // h.shape[-1] for h in inputs.hidden)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def capture_first_block_inputs(model, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Embed `input_ids` [n, seqlen] and capture what the first decoder layer receives."""
    layers = decoder_layers(model)
    captured: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden, kwargs = [], {}
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i:i + batch_size].to(next(model.parameters()).device), use_cache=False)
            except _Stop:
                pass
            hidden.append(captured["hidden"].detach())
            kwargs = captured["kwargs"]
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return BlockInputs(hidden, kwargs)


def call_block(layer, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states one decoder layer returns for `h` (some transformers versions wrap them in a tuple)."""
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(layer, inputs: BlockInputs) -> BlockInputs:
    return BlockInputs([call_block(layer, h, inputs.kwargs) for h in inputs.hidden], inputs.kwargs)


class RotatedLinear(torch.nn.Module):
    """Full-precision linear on rotated input: y = W' vec(C x B) (+ bias); equals the original layer
    when W' = C W B. Stands in for a layer between rotation and ternarization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, left: torch.Tensor | None,
                 right: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        self.left, self.right = left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = kron_rotate(x.reshape(-1, x.shape[-1]).float(), self.left, self.right)
        y = torch.nn.functional.linear(xr, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _feed_until_hook(layer, module: torch.nn.Module, inputs: BlockInputs, hook, enough=lambda: False) -> None:
    """Run the block on each mini-batch with `hook` on `module`'s input; the hook stops the forward."""
    handle = module.register_forward_pre_hook(hook)
    try:
        for h in inputs.hidden:
            try:
                call_block(layer, h, inputs.kwargs)
            except _Stop:
                pass
            if enough():
                break
    finally:
        handle.remove()


@torch.no_grad()
def _input_sums(layer, module: torch.nn.Module, inputs: BlockInputs, terms, rotate: bool = True) -> tuple:
    """Sums over all calibration tokens of terms(x) (a tuple of tensors), x = `module`'s (rotated) input rows;
    the forward stops there."""
    acc: list = []

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        if rotate and getattr(mod, "left", None) is not None:
            x = kron_rotate(x, mod.left, mod.right)
        parts = terms(x)
        acc[:] = parts if not acc else [a + p for a, p in zip(acc, parts)]
        raise _Stop

    _feed_until_hook(layer, module, inputs, hook)
    return tuple(acc)


def input_gram(layer, module: torch.nn.Module, inputs: BlockInputs, rotate: bool = True) -> torch.Tensor:
    """Σ x'ᵀx' over all calibration tokens of `module`'s (rotated) input; the forward stops there."""
    return _input_sums(layer, module, inputs, lambda x: (x.t() @ x,), rotate)[0]


def quantized_input_grams(layer, module: torch.nn.Module, inputs: BlockInputs, bits: int,
                          ranges: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X̃ᵀX̃, X̃ᵀX) over all calibration tokens of `module`'s rotated input X and its per-token quantization X̃
    at `bits` in `ranges` ranges per token (clip 1.0): what fitting weights to the activations they will be
    served with needs (`weights.act_aware_target`); the forward stops there."""
    def terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq = fake_quant_per_token(x, bits, 1.0, ranges)
        return xq.t() @ xq, xq.t() @ x

    return _input_sums(layer, module, inputs, terms)


@torch.no_grad()
def capture_inputs(layer, module: torch.nn.Module, inputs: BlockInputs, max_tokens: int) -> torch.Tensor:
    """Up to `max_tokens` raw input rows of `module` (before any rotation it applies itself)."""
    rows: list[torch.Tensor] = []

    def hook(_mod, args):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    _feed_until_hook(layer, module, inputs, hook, enough=lambda: sum(r.shape[0] for r in rows) >= max_tokens)
    return torch.cat(rows)[:max_tokens]
