"""Rotate stage helpers: Kronecker factor sizes, random orthogonal factors, folding into weights."""

from __future__ import annotations

import torch


def balanced_factors(k: int, blocks: int = 1) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = k, n1 divisible by `blocks`, as close to square as possible
    (balanced factors keep the online rotation cheap: K * (n1 + n2) MACs per token)."""
    best = None
    for n1 in range(1, k + 1):
        if k % n1 or n1 % blocks:
            continue
        n2 = k // n1
        cost = n1 + n2
        if best is None or cost < best[0]:
            best = (cost, n1, n2)
    if best is None:
        raise ValueError(f"K={k} has no factor pair with n1 divisible by {blocks}")
    return best[1], best[2]


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float().contiguous()


def block_diagonal_orthogonal(n: int, blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthogonal n x n made of `blocks` independent diagonal blocks: such a left factor never mixes
    the K-shards of a row-parallel layer, so the layer can run with tensor parallel size | blocks."""
    if n % blocks:
        raise ValueError(f"n={n} not divisible by blocks={blocks}")
    return torch.block_diag(*[random_orthogonal(n // blocks, generator) for _ in range(blocks)])


def is_block_diagonal(m: torch.Tensor, blocks: int, tol: float = 1e-6) -> bool:
    n = m.shape[0]
    if n % blocks:
        return False
    b = n // blocks
    mask = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool)] * blocks)
    return bool(m.masked_fill(mask, 0).abs().max() <= tol)


def max_tp_for_rotation(left: torch.Tensor, limit: int = 64) -> int:
    """Largest tensor-parallel size (power of two <= limit) for which `left` is shard-local."""
    best = 1
    tp = 2
    while tp <= min(limit, left.shape[0]):
        if is_block_diagonal(left, tp):
            best = tp
        tp *= 2
    return best


def orthogonality_error(m: torch.Tensor) -> float:
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return float((m.double() @ m.double().t() - eye).abs().max())


__all__ = ["balanced_factors", "random_orthogonal", "block_diagonal_orthogonal", "is_block_diagonal",
           "max_tp_for_rotation", "orthogonality_error"]
