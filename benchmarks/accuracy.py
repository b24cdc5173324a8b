"""Accuracy benchmark: TWLA ablation ladder and baselines in one harness, on held-out Brown test text.

    python benchmarks/accuracy.py --model smollm2-135m [--windows 16] [--json out.json]
    # larger models: baselines + an already-written TWLA checkpoint (twla-quantize) on the same windows
    python benchmarks/accuracy.py --model qwen2.5-coder-1.5b --twla-checkpoint DIR --windows 8

Rows (weights W, activations A; A4MP = ILA-AMP mixed per-block bits averaging 4):
  RTN ternary (per group), ATQ (PT²-LLM-style init + stage 1), +stage 2 (E2M-ATQ with GPTQ feedback),
  +KOTMS (one rotation per input site, deployable), KOTMS per linear (the paper's placement, simulation only),
  +ILA-AMP, +clip search (= TWLA default), and QuaRot-style randomized-Hadamard + RTN INT2.
PPL is measured on the same windows for every row; the ratio is to the dense model in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twla_offline import data  # noqa: E402
from twla_offline.baselines import apply_quarot_rtn, set_act_bits  # noqa: E402
from twla_offline.evaluate import perplexity  # noqa: E402
from twla_offline.models import load_model, resolve_model  # noqa: E402
from twla_offline.pipeline import Quantizer, Recipe  # noqa: E402
from twla_vllm import format as fmt  # noqa: E402


def ternary_bits(q: Quantizer) -> float:
    """Honest bits/weight of the in-memory ternary model (codes, fp16 scales, rotations per linear)."""
    bits = weights = 0.0
    for mod in q.sim_layers().values():
        n, k = mod.t.shape
        rot = None if mod.left is None else (mod.left.shape[0], mod.right.shape[0])
        bits += fmt.bits_per_weight(n, k, q.gs, rot) * n * k
        weights += n * k
    return bits / weights


def record_checkpoint(ckpt: str, windows: torch.Tensor, record) -> None:
    """The TWLA row from a finished checkpoint: simulated-quant model (reference definitions)."""
    from twla_vllm.simulate import load_simulated_model

    with open(os.path.join(ckpt, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(ckpt, "report.json")) as f:
        secs = json.load(f)["stage_seconds"]["total"]
    record(f"TWLA default ({os.path.basename(ckpt.rstrip('/'))})", "1.58", "4MP",
           perplexity(load_simulated_model(ckpt), windows), qc["bits_per_weight"], secs)


def ladder_rest(path: str, group_size: int, twla: Quantizer, bits: float, secs: float, windows: torch.Tensor,
                record) -> list[int]:
    """Per-linear KOTMS (simulation), then ILA-AMP and clip search on top of the +KOTMS quantizer
    (`twla`, its bits/weight and seconds so far); returns the chosen bits of every block."""
    model, tok = load_model(path)
    t0 = time.time()
    q = Quantizer(model, tok, Recipe(group_size=group_size, allocation="uniform", clip_search=False,
                                     rotation_sharing="linear"), tempfile.mkdtemp(prefix="twla-bench-"))
    q.quantize_weights()
    secs_pl = time.time() - t0
    record("KOTMS per linear (paper; sim only)", "1.58", "16", perplexity(model, windows), ternary_bits(q), secs_pl)
    q.allocate()
    record("KOTMS per linear (paper; sim only)", "1.58", "4", perplexity(model, windows), ternary_bits(q), secs_pl)
    q, model = twla, twla.model
    q.r.allocation = "ila-amp"
    q.allocate()
    record("+ ILA-AMP", "1.58", "4MP", perplexity(model, windows), bits, secs + q.seconds["allocate"])
    q.search_clips()
    record("+ clip search (TWLA)", "1.58", "4MP", perplexity(model, windows), bits,
           secs + q.seconds["allocate"] + q.seconds["clip"])
    return [m.act_bits for m in list(q.sim_layers().values())[::7]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16, help="512-token test windows for PPL")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--twla-checkpoint", help="evaluate this TWLA checkpoint instead of running the ladder")
    a = ap.parse_args()
    path = resolve_model(a.model)
    rows: list[dict] = []

    def record(name, w, act, ppl, bits, secs):
        rows.append({"method": name, "W": w, "A": act, "ppl": ppl, "bits_per_weight": round(bits, 3),
                     "quant_seconds": round(secs, 1)})
        print(f"{name:34s} W{w:5s} A{act:4s} ppl {ppl:12.2f}  bits {bits:.3f}  ({secs:.0f}s)", flush=True)

    model, tok = load_model(path)
    windows = data.eval_windows(tok, data.load_text("brown", "test"), 512, a.windows)
    base = perplexity(model, windows)
    record("dense (dequantized GGUF baseline)" if "smollm2" in a.model else "dense", "16", "16", base, 16.0, 0)

    ladder = [("RTN ternary", dict(weight_method="rtn", rotation="none")),
              ("ATQ (init + stage 1)", dict(weight_method="atq", rotation="none")),
              ("+ stage 2 (E2M-ATQ, GPTQ)", dict(weight_method="e2m-atq", rotation="none")),
              ("+ KOTMS", dict(weight_method="e2m-atq", rotation="kotms"))]
    if a.twla_checkpoint:
        ladder = ladder[:1]
    for name, kw in ladder:
        model, tok = load_model(path)
        t0 = time.time()
        q = Quantizer(model, tok, Recipe(group_size=a.group_size, allocation="uniform", clip_search=False, **kw),
                      tempfile.mkdtemp(prefix="twla-bench-"), log=lambda *x: None)
        q.quantize_weights()
        secs = time.time() - t0
        bits = ternary_bits(q)
        record(name, "1.58", "16", perplexity(model, windows), bits, secs)
        q.allocate()  # uniform 4 bits
        record(name, "1.58", "4", perplexity(model, windows), bits, secs)
    if a.twla_checkpoint:
        record_checkpoint(a.twla_checkpoint, windows, record)
    else:
        act_bits = ladder_rest(path, a.group_size, q, bits, secs, windows, record)
        rows[-1]["act_bits_per_block"] = act_bits  # the "+ clip search" row
    gs = q.gs
    del q, model  # free the ternary model before loading the next copy

    model, tok = load_model(path)
    t0 = time.time()
    apply_quarot_rtn(model, weight_bits=2, group_size=gs, act_bits=16)
    secs = time.time() - t0
    w2bits = 2 + 32 / gs
    record("QuaRot-style RTN INT2", "2", "16", perplexity(model, windows), w2bits, secs)
    set_act_bits(model, 4)
    record("QuaRot-style RTN INT2", "2", "4", perplexity(model, windows), w2bits, secs)

    print(f"\n| method | W | A | PPL | PPL / dense | bits/weight | quant time (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['W']} | {r['A']} | {r['ppl']:.2f} | {r['ppl'] / base:.2f}x | "
              f"{r['bits_per_weight']} | {r['quant_seconds']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "windows": a.windows, "group_size": gs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
