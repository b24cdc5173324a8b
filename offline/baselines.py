"""Comparison baselines that are not TWLA checkpoints (simulation only): QuaRot-style rotation +
round-to-nearest INT2 weights with per-token low-bit activations."""

from __future__ import annotations

import torch

from twla_vllm.reference import fake_quant_per_token, kron_rotate, rotate_weight
from twla_vllm.simulate import SimTwlaLinear

from .calibrate import decoder_layers
from .layout import ATTN, MLP_IN
from .rotate import fold_norm_into, random_orthogonal

LINEARS = (ATTN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))


class FakeQuantLinear(torch.nn.Module):
    """y = fake_quant(rotate(x)) @ W_deqᵀ + b: any dequantized weight, TWLA's activation definition."""

    def __init__(self, w: torch.Tensor, bias, left, right, act_bits: int, act_clip: float = 1.0, k_blocks: int = 1):
        super().__init__()
        self.register_buffer("w", w.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.left, self.right, self.act_bits, self.act_clip, self.k_blocks = left, right, act_bits, act_clip, k_blocks

    def forward(self, x):
        x2 = kron_rotate(x.reshape(-1, x.shape[-1]).float(), self.left, self.right)
        y = fake_quant_per_token(x2, self.act_bits, self.act_clip, self.k_blocks) @ self.w.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def rtn_int(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest per (row, group), dequantized."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wg = w.float().reshape(n, k // gs, gs)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1) - z) * s).reshape(n, k)


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"{n} is not a power of two")
    return h / n**0.5


def randomized_hadamard_factors(k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot-style rotation for any K: (random orthogonal on the odd part) ⊗ (Hadamard with random signs
    on the largest power-of-two factor), as Kronecker factors (left, right)."""
    n2 = k & -k
    signs = torch.randint(0, 2, (n2,), generator=gen, device="cpu").to(torch.get_default_device()).float() * 2 - 1
    return random_orthogonal(k // n2, gen), (hadamard(n2) * signs).contiguous()


@torch.no_grad()
def apply_quarot_rtn(model, weight_bits: int = 2, group_size: int = 128, act_bits: int = 4, seed: int = 0) -> None:
    """Rewrite every decoder linear in place: fold norms, rotate each input site, RTN the weights."""
    gen = torch.Generator().manual_seed(seed)
    for layer in decoder_layers(model):
        lin = {m: layer.get_submodule(m) for ms in LINEARS for m in ms}
        fold_norm_into([lin[m] for m in LINEARS[0]], layer.input_layernorm)
        fold_norm_into([lin[m] for m in LINEARS[2]], layer.post_attention_layernorm)
        for members in LINEARS:
            k = lin[members[0]].weight.shape[1]
            dev = lin[members[0]].weight.device  # the factors are drawn on the CPU generator
            left, right = (f.to(dev) for f in randomized_hadamard_factors(k, gen))
            for m in members:
                w = rtn_int(rotate_weight(lin[m].weight.data.float(), left, right), weight_bits, group_size)
                parent, _, leaf = m.rpartition(".")
                setattr(layer.get_submodule(parent), leaf,
                        FakeQuantLinear(w, lin[m].bias, left, right, act_bits))


def set_act_bits(model, bits: int) -> None:
    """Every quantized linear of `model` (FakeQuantLinear or the checkpoint's SimTwlaLinear) at `bits`."""
    for mod in model.modules():
        if isinstance(mod, (FakeQuantLinear, SimTwlaLinear)):
            mod.act_bits = bits
