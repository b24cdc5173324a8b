"""Weight codes (ternary, binary, int4), their packing into int32 words, and the integer group-scale grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import (FormatError, INT_WEIGHT_MAX, LOWRANK_A, LOWRANK_B, LOWRANK_DTYPE, ROTATION_DTYPE, ROT_LEFT,
                    ROT_RIGHT, WEIGHT_GROUP_OFFSET, WEIGHT_GROUP_SCALE, WEIGHT_PACKED, WEIGHT_SCALE)


@dataclass(frozen=True)
class WeightCode:
    """A stored code c in [0, num_codes) stands for the value v(c) = step * c - offset."""

    name: str
    bits: int
    step: int
    offset: int
    num_codes: int

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    @property
    def lane_mask(self) -> int:
        return (2**self.bits - 1) * 0x01010101

    @property
    def vmin(self) -> int:
        return -self.offset

    @property
    def vmax(self) -> int:
        return self.step * (self.num_codes - 1) - self.offset

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int32) * self.step - self.offset

    def codes(self, values: torch.Tensor) -> torch.Tensor:
        return ((values.to(torch.int32) + self.offset) // self.step).to(torch.int32)


CODES: dict[str, WeightCode] = {
    "ternary": WeightCode("ternary", bits=2, step=1, offset=1, num_codes=3),  # TWLA
    "binary": WeightCode("binary", bits=1, step=2, offset=1, num_codes=2),  # BWLA
    "int4": WeightCode("int4", bits=4, step=1, offset=8, num_codes=16),  # TwinQuant residual
}


def _bit_positions(code: WeightCode) -> torch.Tensor:
    j = torch.arange(code.codes_per_word, dtype=torch.int64)
    return 8 * (j % 4) + code.bits * (j // 4)


def pack_codes(codes: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """Codes in [0, num_codes) ([N, K], K % codes_per_word == 0) -> int32 [N, K / codes_per_word]."""
    cpw = code.codes_per_word
    if codes.dim() != 2 or codes.shape[1] % cpw:
        raise FormatError(f"pack_codes: {code.name} needs [N, K] with K % {cpw} == 0, got {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= code.num_codes):
        raise FormatError(f"pack_codes: {code.name} codes must lie in [0, {code.num_codes - 1}]")
    n, k = c.shape
    words = (c.view(n, k // cpw, cpw) << _bit_positions(code).to(c.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # unsigned 32-bit pattern as int32
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, code: WeightCode, name: str = "weight_packed") -> torch.Tensor:
    """Inverse of `pack_codes` -> int32 codes [N, K]; raises FormatError on a code >= num_codes."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> _bit_positions(code).to(w.device)) & (2**code.bits - 1)
    codes = codes.reshape(packed.shape[0], -1).to(torch.int32)
    if code.num_codes < 2**code.bits and bool((codes >= code.num_codes).any()):
        raise FormatError(f"{name}: packed {code.name} codes contain the invalid code "
                          f"{int(codes.max())} (valid: 0..{code.num_codes - 1})")
    return codes


def pack_values(v: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """Pack integer values v(c) (e.g. a ternary matrix in {-1, 0, 1})."""
    return pack_codes(code.codes(v), code)


def check_int_grid(qa: torch.Tensor, qm: torch.Tensor, code: WeightCode, name: str) -> None:
    """a >= 0 and a*v + m in [-127, 127] for every code value (kernels rely on both)."""
    a, m = qa.to(torch.int32), qm.to(torch.int32)
    if bool((a < 0).any()):
        raise FormatError(f"{name}: '{WEIGHT_GROUP_SCALE}' has negative entries (must be >= 0)")
    hi, lo = a * code.vmax + m, a * code.vmin + m
    if bool((hi > INT_WEIGHT_MAX).any() or (lo < -INT_WEIGHT_MAX).any()):
        raise FormatError(f"{name}: integer weights a*v + m leave [-127, 127] (max {int(hi.max())}, "
                          f"min {int(lo.min())}); '{WEIGHT_GROUP_SCALE}'/'{WEIGHT_GROUP_OFFSET}' out of range")


def int_weights(codes: torch.Tensor, qa: torch.Tensor, qm: torch.Tensor, code: WeightCode) -> torch.Tensor:
    """W_int [N, K] = a * v(c) + m per (row, group), as int8."""
    n, k = codes.shape
    g = qa.shape[1]
    v = code.values(codes).view(n, g, k // g)
    w = v * qa.to(torch.int32).unsqueeze(-1) + qm.to(torch.int32).unsqueeze(-1)
    return w.view(n, k).to(torch.int8)


def upgrade_v1(t: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A v1 layer (ternary t [N, K], fp alpha/mu [N, G]) on v2's grid: (codes, s [N, 1], a, m).

    s_n = max_g(|alpha| + |mu|) / 127; a group with alpha < 0 flips its codes (t -> -t) so a >= 0. Rounding
    moves alpha and mu by at most s_n / 2 each, mu by one step more where both rounded up past 127: every
    weight moves by at most 2 s_n (1.6% of the row's largest level)."""
    alpha, mu = alpha.float(), mu.float()
    n, k = t.shape
    g = alpha.shape[1]
    flip = alpha < 0
    tt = torch.where(flip.repeat_interleave(k // g, dim=1), -t.to(torch.int32), t.to(torch.int32))
    s = (alpha.abs() + mu.abs()).amax(dim=1, keepdim=True) / INT_WEIGHT_MAX
    s = torch.where(s > 0, s, torch.ones_like(s)).half().float()  # stored in fp16: divide by what is stored
    qa = torch.round(alpha.abs() / s).clamp(0, INT_WEIGHT_MAX)
    qm = torch.round(mu / s)
    qm = torch.minimum(torch.maximum(qm, qa - INT_WEIGHT_MAX), INT_WEIGHT_MAX - qa)
    return CODES["ternary"].codes(tt), s.half(), qa.to(torch.int8), qm.to(torch.int8)


def linear_tensors(prefix: str, codes: torch.Tensor, code: WeightCode, row_scale: torch.Tensor,
                   qa: torch.Tensor, qm: torch.Tensor, left: torch.Tensor | None = None,
                   right: torch.Tensor | None = None, lowrank_a: torch.Tensor | None = None,
                   lowrank_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, named and typed as format v2 requires."""
    check_int_grid(qa, qm, code, prefix)
    out = {f"{prefix}.{WEIGHT_PACKED}": pack_codes(codes.cpu(), code),
           f"{prefix}.{WEIGHT_SCALE}": row_scale.detach().cpu().reshape(-1, 1).to(torch.float16).contiguous(),
           f"{prefix}.{WEIGHT_GROUP_SCALE}": qa.detach().cpu().to(torch.int8).contiguous(),
           f"{prefix}.{WEIGHT_GROUP_OFFSET}": qm.detach().cpu().to(torch.int8).contiguous()}
    if left is not None:
        out[f"{prefix}.{ROT_LEFT}"] = left.detach().cpu().to(ROTATION_DTYPE).contiguous()
        out[f"{prefix}.{ROT_RIGHT}"] = right.detach().cpu().to(ROTATION_DTYPE).contiguous()
    if lowrank_a is not None:
        out[f"{prefix}.{LOWRANK_A}"] = lowrank_a.detach().cpu().to(LOWRANK_DTYPE).contiguous()
        out[f"{prefix}.{LOWRANK_B}"] = lowrank_b.detach().cpu().to(LOWRANK_DTYPE).contiguous()
    return out


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size
