"""Output error of real layers' weights under each weight format, on the same captured activations.

    python benchmarks/weight_formats.py --model smollm2-135m --block 5 [--json out.json]

For each linear of one decoder block of the dense model (no transform: the formats are compared on the same
inputs), the relative output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration tokens the fit saw and on held-out
tokens it did not, with honest bits/weight (transform bits not included: the same for every row). Formats:
format v2 (E2M-ATQ + GPTQ, integer group scales) at several group sizes (the largest multiple of 16 not above each
request that divides K, as the pipeline picks), v2 group 32 with a structured second trit
plane on 6.25% of columns, and the released TWLA code's structure (paper-faithful mode, offline/faithful.py).
A cheap way to see which format spends bits best before any perplexity run.
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

from twla_offline import data  # noqa: E402
from twla_offline.calibrate import capture_first_block_inputs, capture_inputs, decoder_layers, run_block  # noqa: E402
from twla_offline.faithful import fit_faithful, fit_second_plane  # noqa: E402
from twla_offline.models import load_model, resolve_model  # noqa: E402
from twla_offline.layout import pick_group_size  # noqa: E402
from twla_offline.weights import gptq_quantize  # noqa: E402
from twla_vllm.format import CODES  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def block_inputs(model, tok, split: str, n: int, seqlen: int, block: int, seed: int):
    ids = data.token_windows(tok, data.load_text("brown", split), n, seqlen, seed)
    inputs = capture_first_block_inputs(model, ids, 4)
    for layer in decoder_layers(model)[:block]:
        inputs = run_block(layer, inputs)
    return inputs


def v2_bits(n: int, k: int, gs: int) -> float:
    """Format v2 per weight: 2-bit codes, int8 (qa, qm) per (row, group), an fp16 scale per row."""
    return (2 * n * k + 16 * n * (k // gs) + 16 * n) / (n * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--calib", type=int, default=32, help="512-token calibration windows")
    ap.add_argument("--heldout", type=int, default=8, help="512-token held-out windows")
    ap.add_argument("--groups", default="128,64,32,16")
    ap.add_argument("--json")
    a = ap.parse_args()
    model, tok = load_model(resolve_model(a.model))
    layer = decoder_layers(model)[a.block]
    cal = block_inputs(model, tok, "calib", a.calib, 512, a.block, 0)
    held = block_inputs(model, tok, "heldout", a.heldout, 512, a.block, 1)
    rows = []
    for name in LINEARS:
        mod = layer.get_submodule(name)
        xc = capture_inputs(layer, mod, cal, max_tokens=a.calib * 512)
        xh = capture_inputs(layer, mod, held, max_tokens=a.heldout * 512)
        w = mod.weight.detach().float()
        n, k = w.shape
        h = xc.t() @ xc

        def err(wh, x):
            return float(((x @ (w - wh).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())

        groups = sorted({pick_group_size([k], int(x)) for x in a.groups.split(",")}, reverse=True)  # dividing K
        fits = [(f"v2 group {g}", lambda g=g: (gptq_quantize(w, h, CODES["ternary"], g).dequantize(), v2_bits(n, k, g)))
                for g in groups]
        fits.append(("v2 group 32 + second plane 6.25%", lambda: (lambda f: (f.weight, f.bits))(
            fit_second_plane(w, h, 32))))
        fits.append(("paper-faithful", lambda: (lambda f: (f.weight, f.bits))(fit_faithful(w, h))))
        for fmt_name, fit in fits:
            t0 = time.time()
            wh, bits = fit()
            row = {"linear": name, "format": fmt_name, "bits_per_weight": round(bits, 3),
                   "calib_err": round(err(wh, xc), 5), "heldout_err": round(err(wh, xh), 5),
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| linear | format | bits/weight | output error (calib) | output error (held-out) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['linear']} | {r['format']} | {r['bits_per_weight']} | {r['calib_err']} | {r['heldout_err']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": "cpu", "date": datetime.date.today().isoformat(),
                       "command": "python " + " ".join(sys.argv), "model": a.model,
                       "block": a.block, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
