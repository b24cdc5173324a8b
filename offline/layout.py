"""Where each linear's quantization geometry comes from: the decoder's linears by shared input site and by vLLM
module, and the group size, row-parallel k-blocks and activation ranges a layer's shapes allow."""

from __future__ import annotations

from twla_vllm import format as fmt

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
# each linear's vLLM module (the names `Recipe.group_size_for` uses)
VLLM_MODULE = {**dict.fromkeys(ATTN, "qkv_proj"), "self_attn.o_proj": "o_proj",
               **dict.fromkeys(MLP_IN, "gate_up_proj"), "mlp.down_proj": "down_proj"}


def input_sites(n_layers: int) -> list[list[str]]:
    """The linears of every block grouped by the input they share (q/k/v, o, gate/up, down), as module paths."""
    return [[f"model.layers.{l}.{m}" for m in members] for l in range(n_layers)
            for members in (ATTN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))]


def set_act_ranges(sims: dict, specs: dict, group_size: int, channels: int) -> dict[str, int]:
    """Give every simulated linear activation ranges of ~`channels` (as `--act-group-size` picks them; specs: its
    LayerSpec by module path; group_size: the weight group where a spec has none of its own); returns the channels
    per range by linear name."""
    ranges = {}
    for name, m in sims.items():
        spec = specs[name]
        m.set_act_ranges(pick_act_blocks(m.in_features, None if spec.rotation is None else spec.rotation[0],
                                         spec.k_blocks, spec.group_size or group_size, channels) or spec.k_blocks)
        ranges[name.split(".")[-1]] = m.in_features // m.act_ranges
    return ranges


def pick_group_size(ks: list[int], requested: int, code: str = "ternary") -> int:
    if requested == -1:
        return -1
    unit = max(16, fmt.CODES[code].codes_per_word)
    for g in range(requested - requested % unit, unit - 1, -unit):
        if all(k % g == 0 for k in ks):
            return g
    return -1


def pick_k_blocks(k: int, group_size: int, max_blocks: int) -> int:
    """Largest power of two <= max_blocks splitting K into whole packed words and weight groups."""
    unit = 16 if group_size == -1 else max(16, group_size)
    b = 1
    while b * 2 <= max_blocks and k % (b * 2) == 0 and (k // (b * 2)) % unit == 0:
        b *= 2
    return b


def pick_act_blocks(k: int, n1: int | None, k_blocks: int, group_size: int, target: int) -> int:
    """Activation ranges per token for a range of about `target` channels (0: one per k-block): the most ranges
    whose size stays >= target, a multiple of k_blocks, each a whole number of weight groups and of 32 channels
    (the int8 MMA's K), and with a transform whole rows of its [n1, n2] view, a power of two of them per
    k-block (what the Triton act_quant can split: twla_vllm/kernels/triton_ops/act_quant.py)."""
    if target <= 0:
        return 0
    unit = max(32, group_size)
    best = k_blocks
    for ab in range(k_blocks, k // unit + 1, k_blocks):
        if k % ab or (k // ab) % unit or k // ab < target:
            continue
        if n1 is not None:
            rows = n1 // ab if n1 % ab == 0 else 0
            if not rows or (ab > k_blocks and rows & (rows - 1)):
                continue
        best = ab
    return 0 if best == k_blocks else best
