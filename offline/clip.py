"""Clip stage: per-site activation clip ratio p (range = p·[min, max] per token) minimising the output
MSE of the ternarized layers against their own unquantized-activation output, block by block on
held-out text with every earlier block already at its final bits and clips."""

from __future__ import annotations

import torch
from tqdm import tqdm

from .calibrate import capture_first_block_inputs, capture_inputs, decoder_layers, run_block


@torch.no_grad()
def search_clips(model, ids: torch.Tensor, sites: list[list[str]], batch_size: int,
                 grid: tuple[float, ...], log=print) -> dict[str, float]:
    layers = decoder_layers(model)
    inputs = capture_first_block_inputs(model, ids, batch_size)
    chosen: dict[str, float] = {}
    by_block: dict[int, list[list[str]]] = {}
    for members in sites:
        by_block.setdefault(int(members[0].split(".")[2]), []).append(members)
    for l in tqdm(range(len(layers)), desc="clip search"):
        layer = layers[l]
        for members in by_block.get(l, []):
            mods = [model.get_submodule(p) for p in members]
            if mods[0].act_bits >= 16:
                continue
            x = capture_inputs(layer, mods[0], inputs, max_tokens=ids.numel())
            bits = mods[0].act_bits
            refs = []
            for m in mods:  # the same layer with full-precision activations
                m.act_bits = 16
                refs.append(m(x))
                m.act_bits = bits
            best, best_err = 1.0, float("inf")
            for p in grid:
                err = 0.0
                for m, ref in zip(mods, refs):
                    m.act_clip = p
                    err += float((m(x) - ref).pow(2).mean())
                if err < best_err:
                    best, best_err = p, err
            for m, prefix in zip(mods, members):
                m.act_clip = best
                chosen[prefix] = best
        inputs = run_block(layer, inputs)
    return chosen
