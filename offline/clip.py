"""Clip stage: per-site activation clip ratio p (range = p·[min, max] per token), block by block on held-out
text with every earlier block already at its final bits and clips.

Two objectives (recipe `clip_objective`):
- "layer": the output MSE of the site's own linears against the same linears with unquantized activations;
- "block": the MSE of the whole decoder block's output against the block with every quantized site's activations
  unquantized, the block's other sites at their current clips (sites in order, each chosen once). A layer's MSE
  does not see what the block does with the error (q/k through the softmax, gate through SiLU): on
  Qwen2.5-Coder-1.5B the layer objective picked clips that raised PPL 13% over clip 1.0 everywhere, the block
  objective's 2% (3.32x / 2.99x / 2.93x dense); on SmolLM2 both beat 1.0, block by 4% more. Block costs one
  block forward per grid point (3-4x the layer objective's time)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from .calibrate import BlockInputs, capture_first_block_inputs, capture_inputs, decoder_layers, run_block
from .recipe import CLIP_OBJECTIVES


@torch.no_grad()
def search_clips(model, ids: torch.Tensor, sites: list[list[str]], batch_size: int,
                 grid: tuple[float, ...], objective: str = "block") -> dict[str, float]:
    if objective not in CLIP_OBJECTIVES:
        raise ValueError(f"clip objective {objective!r}: expected one of {', '.join(CLIP_OBJECTIVES)}")
    layers = decoder_layers(model)
    inputs = capture_first_block_inputs(model, ids, batch_size)
    chosen: dict[str, float] = {}
    by_block: dict[int, list[list[str]]] = {}
    for members in sites:
        by_block.setdefault(int(members[0].split(".")[2]), []).append(members)
    for l in tqdm(range(len(layers)), desc=f"clip search ({objective} output)"):
        layer = layers[l]
        in_order = [[model.get_submodule(p) for p in members] for members in by_block.get(l, [])]
        quantized = [(i, members, mods) for i, (members, mods) in enumerate(zip(by_block.get(l, []), in_order))
                     if mods[0].act_bits < 16]
        if objective == "block":
            every = [m for _, _, mods in quantized for m in mods]
            ref = _unquantized(every, lambda: run_block(layer, inputs).hidden)
        for i, members, mods in quantized:
            if objective == "block":
                def err() -> float:
                    out = run_block(layer, inputs).hidden
                    return sum(float((h - r).float().pow(2).mean()) for h, r in zip(out, ref))

                earlier = [m for ms in in_order[:i] for m in ms]
                with _replaying(layer, _upstream(layer, earlier, in_order), inputs):
                    best = _argmin(grid, mods, err)
            else:
                x = capture_inputs(layer, mods[0], inputs, max_tokens=ids.numel())
                refs = [_unquantized([m], lambda m=m: m(x)) for m in mods]

                def err() -> float:
                    return sum(float((m(x) - r).pow(2).mean()) for m, r in zip(mods, refs))
                best = _argmin(grid, mods, err)
            for m, prefix in zip(mods, members):
                m.act_clip = best
                chosen[prefix] = best
        inputs = run_block(layer, inputs)
    return chosen


def _upstream(layer: torch.nn.Module, earlier: list, sites: list[list]) -> list[torch.nn.Module]:
    """The largest submodules of `layer` whose site linears are all in `earlier` (sites are in data-flow order,
    so these run before the site being searched and their inputs do not depend on its clip): self_attn for the
    MLP's sites, q/k/v for o_proj, gate/up for down_proj."""
    linears = {id(m) for ms in sites for m in ms}
    before = {id(m) for m in earlier}
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        inside = {id(m) for m in module.modules()} & linears
        if inside and inside <= before:
            found.append(module)
        elif inside:
            for child in module.children():
                visit(child)
    for child in layer.children():
        visit(child)
    return found


@contextmanager
def _replaying(layer: torch.nn.Module, modules: list[torch.nn.Module], inputs: BlockInputs) -> Iterator[None]:
    """Inside, each of `modules` returns what it returned on one pass of `layer` over `inputs` (its k-th call of
    a pass gets its k-th output) instead of computing it. Exact while the modules' inputs and weights stay as they
    were, which holds for modules upstream of the site being searched (SmolLM2: 11% of the block search's time)."""
    outputs: dict[torch.nn.Module, list] = {m: [] for m in modules}
    handles = [m.register_forward_hook(lambda mod, _args, out: outputs[mod].append(out)) for m in modules]
    try:
        if modules:
            run_block(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    calls = dict.fromkeys(modules, 0)
    saved = {m: m.__dict__.get("forward") for m in modules}

    def replay(m: torch.nn.Module):
        def forward(*_args, **_kwargs):
            out = outputs[m][calls[m] % len(outputs[m])]
            calls[m] += 1
            return out
        return forward
    for m in modules:
        m.forward = replay(m)
    try:
        yield
    finally:
        for m, f in saved.items():
            if f is None:
                del m.forward
            else:
                m.forward = f


def _unquantized(mods: list, fn):
    """fn() with the activations of `mods` at 16 bits."""
    bits = [m.act_bits for m in mods]
    for m in mods:
        m.act_bits = 16
    try:
        return fn()
    finally:
        for m, b in zip(mods, bits):
            m.act_bits = b


def _argmin(grid: tuple[float, ...], mods: list, err) -> float:
    best, best_err = 1.0, float("inf")
    for p in grid:
        for m in mods:
            m.act_clip = p
        e = err()
        if e < best_err:
            best, best_err = p, e
    return best
