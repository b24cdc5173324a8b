"""ILA-AMP's sensitivity passes on CUDA in TF32 (the default) against full float32, on a real checkpoint:
how far the measured table moves, whether the chain DP picks the same bits, and the time of each.

The simulated linears' integer products are exact either way (|codes| <= 128 times int8 weights fit TF32's
significand); TF32 rounds the rotations, attention and the head. The table is measured on the checkpoint's own
activation clips (the pipeline measures before its clip search), on held-out windows of the recipe's text.

    python benchmarks/amp_precision.py --checkpoint DIR [--tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from transformers import AutoTokenizer

    from twla_offline import allocate, data
    from twla_offline.calibrate import decoder_layers
    from twla_vllm.simulate import load_simulated_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens per table (the CUDA default is 2048)")
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--device", default="cuda", help="cpu runs the same passes (both in float32) as a dry run")
    a = ap.parse_args()

    with open(os.path.join(a.checkpoint, "config.json")) as f:
        recipe = json.load(f)["quantization_config"]["recipe"]
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    model = load_simulated_model(a.checkpoint, device=a.device)
    n_layers = len(decoder_layers(model))
    blocks = [[m for name, m in model.named_modules() if name.startswith(f"model.layers.{l}.") and
               hasattr(m, "act_bits")] for l in range(n_layers)]

    def set_block_bits(l: int, bits: int) -> None:
        for m in blocks[l]:
            m.act_bits = bits

    seqlen = recipe["amp_seqlen"]
    heldout = data.load_text(recipe["calib"], "heldout", recipe.get("text_column", data.DEFAULT_TEXT_COLUMN))
    ids = data.token_windows(tok, heldout, max(1, a.tokens // seqlen), seqlen, recipe["seed"] + 1)
    bit_set = tuple(recipe["bit_set"])
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    tables, bits, seconds = {}, {}, {}
    for precision in ("tf32", "ieee"):
        sync()
        t0 = time.time()
        tables[precision] = allocate.measure_sensitivity(model, ids, bit_set, set_block_bits, precision=precision)
        sync()
        seconds[precision] = time.time() - t0
        bits[precision] = allocate.allocate_bits(tables[precision], bit_set, recipe["act_bits"], recipe["amp_beta"])

    def entries(t: allocate.SensitivityTable) -> list[float]:
        return [v for d in t.single for v in d.values()] + [v for d in t.pair for v in d.values()]

    x, y = torch.tensor(entries(tables["tf32"])), torch.tensor(entries(tables["ieee"]))
    out = {
        "checkpoint": a.checkpoint, "tokens": int(ids.numel()),
        "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device,
        "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
        "seconds": seconds, "bits": bits, "same_bits": bits["tf32"] == bits["ieee"],
        "base_nll": {p: t.base_nll for p, t in tables.items()},
        "max_abs_diff": float((x - y).abs().max()), "max_abs_entry": float(y.abs().max()),
        "median_abs_entry": float(y.abs().median()),
        "chain_cost_of_tf32_bits_under_ieee_table": allocate.chain_cost(tables["ieee"], bits["tf32"],
                                                                         recipe["amp_beta"]),
        "chain_cost_of_ieee_bits_under_ieee_table": allocate.chain_cost(tables["ieee"], bits["ieee"],
                                                                         recipe["amp_beta"]),
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"{'precision':>9} | {'seconds':>7} | base NLL | bits")
    for p in ("tf32", "ieee"):
        print(f"{p:>9} | {seconds[p]:7.1f} | {tables[p].base_nll:.5f} | {bits[p]}")
    print(f"table entries: max |tf32 - ieee| {out['max_abs_diff']:.2e}, median |entry| {out['median_abs_entry']:.2e}, "
          f"max |entry| {out['max_abs_entry']:.2e}; same bits: {out['same_bits']}")


if __name__ == "__main__":
    main()
