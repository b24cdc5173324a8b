"""Accuracy of the BWLA mode (binary weights, OKT, PSP low-rank branch, A6) in the `accuracy.Harness`: the same
held-out Brown test windows, PPL ratio and honest bits/weight as the TWLA tables.

    nice -n 10 python benchmarks/accuracy_bwla.py --model smollm2-135m --windows 16 [--ladder all]
    python benchmarks/accuracy_bwla.py --model qwen2.5-coder-1.5b --windows 32 --ladder bwla --device cuda \
        --rows bwla --json /tmp/psp.json        # one process per row group, in parallel on one GPU

Ladders (W1 = binary codes; A16 = activations unquantized; uniform activation bits, no clip search unless said):
  bwla     RTN binary; binary + GPTQ (E2M-ATQ stage 1 + 2, integer grid); + OKT; + PSP (= BWLA) at A16/A6/A4;
           `bwla` = BWLA + the per-site clip search at A6 and A4, then at A6 + block-wise scale tuning (what
           `twla-quantize --method bwla` does); TWLA (ternary, KOTMS) at the same activation bits, for comparison.
           `--rows` picks some of them (rtn, gptq, okt, bwla = + PSP and what follows, twla); rows are saved to
           the JSON as each finishes, so a cut run keeps what it measured
  groups   BWLA at the other weight groups of 32, 64, 192, per row: the bits / accuracy trade-off
  svd      binary + OKT with a rank-16 branch from a truncated SVD of W (`lowrank.fit_svd`) instead of PSP:
           PSP's baseline at equal bits
  all      all three

The "+ OKT" and BWLA rows learn identical transforms (OKT is data-free and sees the same weights), so they are
learned once per group size (`OktCache`); the seconds the first row spent on them are added to the later row's
quant time, so every row reports what a run of its own takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy import Harness, honest_bits  # noqa: E402

from twla_offline import okt  # noqa: E402
from twla_offline.pipeline import Quantizer  # noqa: E402
from twla_offline.recipe import Recipe, preset  # noqa: E402

NO_BRANCH = dict(lowrank="none", lowrank_rank=0)


class OktCache:
    """`okt.learn_okt` memoised on its exact inputs (weights, sizes, group, iterations), with the seconds each
    entry took, so a row that reuses transforms can report the time a run of its own would take."""

    def __init__(self):
        self.learn = okt.learn_okt
        self.table: dict[tuple, tuple[tuple, float]] = {}
        self.reused_seconds = 0.0

    def __call__(self, w, n1, n2, group_size, left_blocks, learn_left, recipe, site_inputs=None):
        digest = hashlib.sha1(w.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (digest, tuple(w.shape), n1, n2, group_size, left_blocks, learn_left, recipe.okt_iters)
        if key in self.table:
            (left, right, hist), secs = self.table[key]
            self.reused_seconds += secs
        else:
            t0 = time.time()
            left, right, hist = self.learn(w, n1, n2, group_size, left_blocks, learn_left, recipe, site_inputs)
            self.table[key] = ((left, right, hist), time.time() - t0)
        return (None if left is None else left.clone()), right.clone(), list(hist)


def run_row(h: Harness, cache: OktCache, method: str, recipe: Recipe, w_bits: float,
            act: tuple[int, ...]) -> tuple[Quantizer, float, float]:
    """Quantize with `recipe` (uniform bits, no clip search) and record a row per activation width in `act`;
    returns (quantizer, honest bits, seconds incl. reused OKT time)."""
    print(f"--- {method}: quantizing ({recipe.code}, rotation {recipe.rotation}, low-rank {recipe.lowrank}, "
          f"group {recipe.group_size})", flush=True)
    reused = cache.reused_seconds
    q, secs = h.quantize(dataclasses.replace(recipe, allocation="uniform", clip_search=False))
    secs += cache.reused_seconds - reused
    bits = honest_bits(q)
    for a in act:
        set_bits(q, a)
        h.record(method, w_bits, a, h.ppl(q.model), bits, secs, group_size=q.gs)
    return q, bits, secs


def set_bits(q: Quantizer, bits: int) -> None:
    for l in range(len(q.sim_layers()) // 7):
        q.set_block_bits(l, bits)


BWLA_ROWS = ("rtn", "gptq", "okt", "bwla", "twla")


def bwla_ladder(h: Harness, cache: OktCache, group_size: int, rows: tuple[str, ...] = BWLA_ROWS) -> None:
    base = dataclasses.replace(preset("bwla"), group_size=group_size)
    for key, name, kw in [("rtn", "RTN binary", dict(weight_method="rtn", rotation="none", **NO_BRANCH)),
                          ("gptq", "binary + GPTQ (E2M-ATQ stages, integer grid)", dict(rotation="none", **NO_BRANCH)),
                          ("okt", "+ OKT", NO_BRANCH)]:
        if key in rows:
            run_row(h, cache, name, dataclasses.replace(base, **kw), 1, (16, 6))
    if "bwla" in rows:
        q, bits, secs = run_row(h, cache, "+ PSP rank 16 (= BWLA)", base, 1, (16, 6, 4))
        for a in (4, 6):  # the full mode: per-site activation clip search on held-out text at the served bits
            set_bits(q, a)
            q.search_clips()
            secs_a = secs + q.seconds["clip"]
            h.record("bwla", 1, a, h.ppl(q.model), bits, secs_a, group_size=q.gs)
        q.tune(h.path)  # last, at A6 (the preset's bits): what `twla-quantize --method bwla` ships
        h.record("bwla + block-wise scale tuning (= twla-quantize --method bwla)", 1, 6, h.ppl(q.model), bits,
                 secs_a + q.seconds["tune"], group_size=q.gs)
    if "twla" in rows:
        run_row(h, cache, f"TWLA (ternary, KOTMS, group {group_size})",
                dataclasses.replace(preset("twla"), group_size=group_size),
                1.58, (16, 6))


def group_ladder(h: Harness, cache: OktCache, group_size: int) -> None:
    for gs in (g for g in (32, 64, 192, -1) if g != group_size):  # the bwla ladder ran group_size
        run_row(h, cache, f"BWLA, group {'per row' if gs == -1 else gs}",
                dataclasses.replace(preset("bwla"), group_size=gs), 1, (16, 6))


def svd_ladder(h: Harness, cache: OktCache, group_size: int) -> None:
    run_row(h, cache, "+ SVD branch rank 16 (instead of PSP)",
            dataclasses.replace(preset("bwla"), group_size=group_size, lowrank="svd"), 1, (16, 6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ladder", choices=["bwla", "groups", "svd", "all"], default="all")
    ap.add_argument("--windows", type=int, default=16, help="512-token test windows for PPL")
    ap.add_argument("--group-size", type=int, default=preset("bwla").group_size,
                    help="weight group of the bwla and svd ladders (the groups ladder sweeps its own)")
    ap.add_argument("--rows", default=",".join(BWLA_ROWS),
                    help=f"rows of the bwla ladder, comma-separated from {', '.join(BWLA_ROWS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="results file (default benchmarks/results/accuracy_<model>.json)")
    a = ap.parse_args()
    torch.manual_seed(0)
    cache = OktCache()
    okt.learn_okt = cache  # pipeline.transform_learner("okt") imports it from the module at each call
    rows = tuple(a.rows.split(","))
    if set(rows) - set(BWLA_ROWS):
        ap.error(f"--rows: unknown {', '.join(sorted(set(rows) - set(BWLA_ROWS)))} (allowed: {', '.join(BWLA_ROWS)})")
    h = Harness(a.model, a.windows, a.device, json_path=a.json, save_each_row=True)
    if a.ladder in ("bwla", "all"):
        bwla_ladder(h, cache, a.group_size, rows)
    if a.ladder in ("groups", "all"):
        group_ladder(h, cache, a.group_size)
    if a.ladder in ("svd", "all"):
        svd_ladder(h, cache, a.group_size)
    print("\n" + h.table())
    print(f"rows merged into {h.save()}")


if __name__ == "__main__":
    main()
