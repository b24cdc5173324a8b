"""Allocate-bits stage: ILA-AMP. Per-block activation bits from a bit set under an average budget,
chosen by an exact chain DP over single-block NLL increments C_l(b) and adjacent-pair interaction
terms K_{l-1,l}(b', b), all measured against an all-8-bit reference on held-out text.

Cost control: hidden states entering every block under the reference are cached, so a configuration
re-runs only from its first changed block; a pair (l-1, l) starts from the cached output of block l-1
at b' (recorded by the single runs). On CUDA the passes run their float32 matmuls in TF32: the simulated
linears' integer products (signed activation codes, |q| <= 128, times int8 weights) are exact in TF32's 11-bit
significand with float32 accumulation, and the rest (rotations, attention, the head) round as the served
kernels' single-pass TF32 rotations do.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .calibrate import BlockInputs, capture_first_block_inputs, decoder_layers, run_block
from .onload import cuda_matmul_precision


@dataclass
class SensitivityTable:
    base_nll: float
    bit_set: tuple[int, ...]
    single: list[dict[int, float]]  # C_l(b), b != 8 (0 for 8)
    pair: list[dict[tuple[int, int], float]] = field(default_factory=list)  # K_{l-1,l}(b', b) for l >= 1
    evaluations: int = 0

    def c(self, l: int, b: int) -> float:
        return self.single[l].get(b, 0.0)

    def k(self, l: int, bp: int, b: int) -> float:
        return self.pair[l].get((bp, b), 0.0) if l >= 1 else 0.0


@torch.no_grad()
def _nll_from(model, start: int, inputs: BlockInputs, labels: torch.Tensor) -> float:
    layers = decoder_layers(model)
    h = inputs
    for l in range(start, len(layers)):
        h = run_block(layers[l], h)
    total, count = 0.0, 0
    head = model.lm_head.weight.device
    for hid, lab in zip(h.hidden, labels.split(h.hidden[0].shape[0])):
        logits = model.lm_head(model.model.norm(hid.to(head))).float()
        lab = lab.to(head)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 lab[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += lab[:, 1:].numel()
    return total / count


def measure_sensitivity(model, ids: torch.Tensor, bit_set, set_block_bits, ref_bits: int = 8,
                        batch_size: int = 4, stash: str | torch.device | None = None,
                        precision: str = "tf32") -> SensitivityTable:
    """C_l(b) and K_{l-1,l}(b', b) of every block and bit pair. Keeps the reference hidden states entering every
    block (in `stash`, e.g. CPU memory when blocks are offloaded; default: where they are computed); the input of
    a pair configuration is recomputed from the cache, one block, instead of kept for every (block, bits).
    `precision`: of the float32 matmuls on CUDA (module docstring; "ieee" = full float32)."""
    with torch.no_grad(), cuda_matmul_precision(precision):
        return _measure(model, ids, bit_set, set_block_bits, ref_bits, batch_size, stash)


def _measure(model, ids, bit_set, set_block_bits, ref_bits, batch_size, stash) -> SensitivityTable:
    layers = decoder_layers(model)
    n = len(layers)
    low = [b for b in bit_set if b != ref_bits]
    for l in range(n):
        set_block_bits(l, ref_bits)
    cache = [capture_first_block_inputs(model, ids, batch_size)]
    for l in range(n):
        cache.append(run_block(layers[l], cache[-1]))
        if stash is not None:
            cache[l] = cache[l].to(stash)
    if stash is not None:
        cache[n] = cache[n].to(stash)
    base = _nll_from(model, n, cache[n], ids)
    table = SensitivityTable(base, tuple(bit_set), [dict() for _ in range(n)], [dict() for _ in range(n)])

    def block_at(l: int, b: int) -> BlockInputs:
        set_block_bits(l, b)
        out = run_block(layers[l], cache[l])
        set_block_bits(l, ref_bits)
        return out

    configs = n * len(low) + (n - 1) * len(low) ** 2
    bar = tqdm(total=configs, desc="ILA-AMP sensitivity")
    for l, b in itertools.product(range(n), low):
        table.single[l][b] = _nll_from(model, l + 1, block_at(l, b), ids) - base
        bar.update()
    for l in range(1, n):
        for bp in low:
            after = block_at(l - 1, bp)
            for b in low:
                set_block_bits(l, b)
                nll = _nll_from(model, l, after, ids)
                set_block_bits(l, ref_bits)
                table.pair[l][(bp, b)] = nll - base - table.c(l - 1, bp) - table.c(l, b)
                bar.update()
    bar.close()
    table.evaluations = configs + 1
    return table


def allocate_bits(table: SensitivityTable, bit_set, avg_bits: float, beta: float = 0.5) -> list[int]:
    """Exact chain DP: minimise Σ C_l(b_l) + β Σ K_{l-1,l}(b_{l-1}, b_l) s.t. Σ b_l <= round(avg·L)."""
    n = len(table.single)
    budget = int(round(avg_bits * n))
    bits = sorted(bit_set)
    inf = math.inf
    # dp[c][j]: best cost of blocks 0..l with total c and block l at bits[j]
    dp = [[inf] * len(bits) for _ in range(budget + 1)]
    back: list[list[list[int]]] = []
    for j, b in enumerate(bits):
        if b <= budget:
            dp[b][j] = table.c(0, b)
    for l in range(1, n):
        new = [[inf] * len(bits) for _ in range(budget + 1)]
        arg = [[-1] * len(bits) for _ in range(budget + 1)]
        for c in range(budget + 1):
            for j, b in enumerate(bits):
                if c - b < 0:
                    continue
                for jp, bp in enumerate(bits):
                    prev = dp[c - b][jp]
                    if prev == inf:
                        continue
                    v = prev + table.c(l, b) + beta * table.k(l, bp, b)
                    if v < new[c][j]:
                        new[c][j], arg[c][j] = v, jp
        back.append(arg)
        dp = new
    best = min(((dp[c][j], c, j) for c in range(budget + 1) for j in range(len(bits))), key=lambda x: x[0])
    if best[0] == inf:
        raise ValueError(f"no allocation of {bits} fits the budget {budget} for {n} blocks")
    _, c, j = best
    out = [bits[j]]
    for l in range(n - 1, 0, -1):
        jp = back[l - 1][c][j]
        c -= bits[j]
        j = jp
        out.append(bits[j])
    return out[::-1]


def chain_cost(table: SensitivityTable, bits: list[int], beta: float) -> float:
    return sum(table.c(l, b) for l, b in enumerate(bits)) + beta * sum(
        table.k(l, bits[l - 1], bits[l]) for l in range(1, len(bits)))
