"""TwinQuant accuracy ladder (issue 12): 4-bit-weight baselines and TwinQuant at A4 and A8, in the harness of
benchmarks/accuracy.py (same held-out Brown test windows, honest bits, rows merged into
benchmarks/results/accuracy_<model>.json).

    python benchmarks/accuracy_twinquant.py --model smollm2-135m --windows 16 [--group-size 128] [--methods ...]

Rows (W4 = int4 codes on format v2's integer grid unless said; activations per-token asymmetric, the same bits
in every block, no clip search unless said):
  RTN W4                    round-to-nearest int4 per (row, group), no transform, no branch
  QuaRot-style RTN W4       norms folded, randomized Hadamard per input site (online), RTN int4 with an fp16
                            scale and zero per group (simulation: `baselines.apply_quarot_rtn`)
  GPTQ W4                   the pipeline's weight stage (GPTQ + output-aware refit + integer grid), no transform
  SVD r32 + GPTQ W4         SVDQuant-style: truncated-SVD fp16 rank-32 branch, residual through the same weight
                            stage, no transform and nothing learned
  twinquant                 `--method twinquant` (learned transform + learned rank-32 branch), learned for the
                            row's activation bits; "+ clip search" adds the preset's per-linear clip search
  transform-only            ablation: twinquant's learned transform and weight stage without the branch
RTN W4A16 (at the chosen group, and the "caveat" row at group 32 = SmolLM2's Q4_1 blocks) shows how much weight
error a dequantized 4-bit GGUF dense model leaves to measure at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accuracy import Harness  # noqa: E402

from twla_offline.baselines import apply_quarot_rtn, set_act_bits  # noqa: E402
from twla_offline.models import load_model  # noqa: E402
from twla_offline.layout import pick_group_size  # noqa: E402
from twla_offline.recipe import Recipe, preset  # noqa: E402

METHODS = ("caveat", "rtn", "quarot", "gptq", "svd", "twinquant", "transform-only")
ACTS = (4, 8)


def w4(group_size: int, **kw) -> Recipe:
    fields = dict(method="twinquant", code="int4", group_size=group_size, rotation="none", lowrank="none",
                  allocation="uniform", clip_search=False)
    return Recipe(**{**fields, **kw})


def run_ladder(h: Harness, methods: list[str], group_size: int, rank: int) -> None:
    model, _ = load_model(h.path, torch.float32, h.device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ks = [cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * head_dim]
    gs = pick_group_size(ks, group_size, "int4")
    print(f"group size {gs} (requested {group_size}); K = {sorted(set(ks))}", flush=True)
    for m in methods:
        t0 = time.time()
        if m == "caveat":
            h.run("RTN W4, group 32 (= the GGUF's Q4 blocks)", w4(32, weight_method="rtn"), 4, act=(16,))
        elif m == "rtn":
            h.run("RTN W4", w4(gs, weight_method="rtn"), 4, act=(16, *ACTS))
        elif m == "quarot":
            apply_quarot_rtn(model, weight_bits=4, group_size=gs, act_bits=ACTS[0])
            secs = time.time() - t0
            for a in ACTS:
                set_act_bits(model, a)  # fp16 scale + zero per group; the Hadamard is generated, not stored
                h.record("QuaRot-style RTN W4", 4, a, h.ppl(model), 4 + 32 / gs, secs)
        elif m == "gptq":
            h.run("GPTQ W4", w4(gs), 4, act=ACTS)
        elif m == "svd":
            h.run(f"SVD r{rank} + GPTQ W4", w4(gs, lowrank="svd", lowrank_rank=rank), 4, act=ACTS)
        elif m == "twinquant":
            for a in ACTS:
                r = dataclasses.replace(preset("twinquant"), group_size=gs, lowrank_rank=rank, act_bits=float(a))
                q = h.run("twinquant", r, 4, act=(a,))
                if a == ACTS[0]:  # the preset's own last step, on the same model
                    bits = h.rows[-1]["bits_per_weight"]
                    secs = h.rows[-1]["quant_seconds"]
                    q.search_clips()
                    h.record("twinquant + clip search", 4, a, h.ppl(q.model), bits, secs + q.seconds["clip"])
        elif m == "transform-only":  # ablation: TwinQuant's learned transform without the branch (4-bit budget)
            for a in ACTS:
                r = dataclasses.replace(preset("twinquant"), group_size=gs, lowrank="none", lowrank_rank=0,
                                        act_bits=float(a))
                h.run("learned transform + GPTQ W4 (no branch)", r, 4, act=(a,))
        h.save()  # after every method: a long run keeps what it measured
        print(f"[{m}] done in {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16, help="512-token test windows for PPL")
    ap.add_argument("--group-size", type=int, default=128,
                    help="weight group (the largest multiple of 16 <= this dividing every K is used)")
    ap.add_argument("--rank", type=int, default=32, help="rank of the SVD and TwinQuant branches")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 on a shared 2-core box: oversubscribed BLAS threads spin)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    methods = a.methods.split(",")
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        ap.error(f"--methods: unknown {bad} (allowed: {', '.join(METHODS)})")
    torch.set_num_threads(a.threads)
    h = Harness(a.model, a.windows, a.device)
    run_ladder(h, methods, a.group_size, a.rank)
    print("\n" + h.table())
    print(f"rows merged into {h.save()}")


if __name__ == "__main__":
    main()
