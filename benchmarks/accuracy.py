"""Accuracy benchmark: ladders of methods in one harness, on the same held-out Brown test windows.

    python benchmarks/accuracy.py --model smollm2-135m --ladder twla [--windows 16]
    python benchmarks/accuracy.py --model smollm2-135m --ladder groups        # format v2 grid vs fp16 scales
    python benchmarks/accuracy.py --model smollm2-135m --ladder rotation      # rotation placement options
    python benchmarks/accuracy.py --model smollm2-135m --ladder act-groups    # activation ranges per token
    python benchmarks/accuracy.py --model qwen2.5-coder-1.5b --ladder act-groups --checkpoint DIR --windows 8
    python benchmarks/accuracy.py --model qwen2.5-coder-1.5b --ladder baselines --checkpoint DIR --windows 8

Ladders (rows: weights W, activations A; A4MP = ILA-AMP mixed per-block bits averaging 4):
  twla       RTN ternary, ATQ (stage 1), + stage 2 (E2M-ATQ, GPTQ), + KOTMS, KOTMS per linear, + ILA-AMP,
             + clip search (= TWLA default), each at A16 and A4 where meaningful
  groups     E2M-ATQ + KOTMS at groups 128 / 64 / 32, integer grid (format v2) vs fp16 alpha/mu (format v1 scales),
             W1.58A16 and W1.58A4
  baselines  dense, RTN ternary and QuaRot-style randomized Hadamard + RTN INT2, plus `--checkpoint` (a finished
             checkpoint, simulated) on the same windows
  faithful   the released TWLA code's weight structure (salient columns with two trit planes, four groups per
             128-column block, ten fp16 scales per row and block) with its per-linear transforms: simulation
             only, not a checkpoint format; its bits/weight count the actual masks (offline/faithful.py)
  checkpoint dense and one finished checkpoint (`--checkpoint DIR --label NAME --a-bits A`), simulated
  clip       a finished checkpoint (`--checkpoint DIR`): its stored clips, every clip 1.0, clips searched again
             by layer / block output MSE on its recipe's held-out tokens (`--objectives`; `--act-groups G` for ranges)
  second-plane  format v2 at --groups with and without a structured second trit plane on the most salient 6.25%
             of columns (simulation: is it worth a kernel?), e.g. --groups 16,32
Other modes' ladders (BWLA, TwinQuant) use the same `Harness` from their own scripts.

PPL is measured on the same windows for every row; ratio = PPL / dense PPL of the same run. bits/weight counts
every tensor a checkpoint stores for the quantized linears (codes, scales, transforms, low-rank branch). Rows are
merged into benchmarks/results/accuracy_<model>.json (schema: shared design notes, results.md), replacing rows of
the same method and bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twla_offline import data  # noqa: E402
from twla_offline.baselines import apply_quarot_rtn, set_act_bits  # noqa: E402
from twla_offline.evaluate import perplexity  # noqa: E402
from twla_offline.export import stored_bits_per_weight  # noqa: E402
from twla_offline.models import load_model, resolve_model  # noqa: E402
from twla_offline.pipeline import Quantizer  # noqa: E402
from twla_offline.recipe import Recipe  # noqa: E402
from results_file import merge_rows  # noqa: E402  (benchmarks/, the script's own folder)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEQLEN = 512


class Harness:
    """One model, one set of test windows, rows recorded in the results schema."""

    def __init__(self, model: str, windows: int, device: str = "cpu", json_path: str | None = None,
                 save_each_row: bool = False):
        """`json_path`: the results file `save` merges into (default accuracy_<model>.json); `save_each_row`:
        merge after every row, so a long run that is cut keeps what it measured."""
        self.model_name, self.device = model, device
        self.json_path, self.save_each_row = json_path, save_each_row
        self.path = resolve_model(model)
        dense, self.tok = load_model(self.path, torch.float32, device)
        self.windows = data.eval_windows(self.tok, data.load_text("brown", "test"), SEQLEN, windows)
        self.n_windows = windows
        self.rows: list[dict[str, Any]] = []
        self.dense_ppl = self.ppl(dense)
        self.record("dense", 16, 16, self.dense_ppl, 16.0, 0.0)

    def ppl(self, model) -> float:
        return perplexity(model, self.windows.to(next(model.parameters()).device))

    def record(self, method: str, w_bits: float | str, a_bits: float | str, ppl: float, bits: float,
               seconds: float | None, **extra: Any) -> None:
        """One row; seconds None where the quantization time is not known."""
        row = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "ppl": round(ppl, 3),
               "ratio": round(ppl / self.dense_ppl, 3), "bits_per_weight": round(bits, 4),
               "quant_seconds": None if seconds is None else round(seconds, 1), **extra}
        self.rows.append(row)
        print(f"{method:44s} W{w_bits!s:5s} A{a_bits!s:5s} ppl {ppl:12.2f} ({row['ratio']:.2f}x)  bits {bits:.3f}  "
              f"({row['quant_seconds']} s)", flush=True)
        if self.save_each_row:
            self.save()

    def quantize(self, recipe: Recipe, make=Quantizer) -> tuple[Quantizer, float]:
        """A fresh copy of the model with `recipe`'s weight stage done (uniform bits not yet applied)."""
        model, tok = load_model(self.path, torch.float32, self.device)
        t0 = time.time()
        q = make(model, tok, recipe, tempfile.mkdtemp(prefix="twla-bench-"), self.device, log=lambda *x: None)
        q.quantize_weights()
        return q, time.time() - t0

    def run(self, method: str, recipe: Recipe, w_bits: float | str, act: tuple[int, ...] = (16, 4),
            make=Quantizer, **extra: Any) -> Quantizer:
        """Quantize with `recipe` (uniform activation bits), record one row per activation width in `act`."""
        q, secs = self.quantize(dataclasses.replace(recipe, allocation="uniform", clip_search=False), make)
        bits = honest_bits(q)
        for a in act:
            for l in range(len(q.sim_layers()) // 7):
                q.set_block_bits(l, a)
            self.record(method, w_bits, a, self.ppl(q.model), bits, secs, **extra)
        return q

    def table(self) -> str:
        lines = ["| method | W | A | PPL | PPL / dense | bits/weight | quant time (s) |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            secs = "n/a" if r["quant_seconds"] is None else r["quant_seconds"]
            lines.append(f"| {r['method']} | {r['w_bits']} | {r['a_bits']} | {r['ppl']:.2f} | {r['ratio']:.2f}x | "
                         f"{r['bits_per_weight']} | {secs} |")
        return "\n".join(lines)

    def save(self, path: str | None = None) -> str:
        """Merge this run's rows into accuracy_<model>.json (rows of the same method and bits are replaced)."""
        path = path or self.json_path or os.path.join(RESULTS, f"accuracy_{self.model_name}.json")
        return merge_rows(path, self.rows,
                          lambda r: (r["method"], str(r["w_bits"]), str(r["a_bits"])),
                          torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu",
                          model=self.model_name, dense_ppl=round(self.dense_ppl, 3), windows=self.n_windows,
                          seqlen=SEQLEN)


def honest_bits(q: Quantizer) -> float:
    """Bits/weight a checkpoint of q's in-memory model would store (`export.stored_bits_per_weight`)."""
    if hasattr(q, "bits_per_weight"):  # paper-faithful mode counts its own masks and scales
        return q.bits_per_weight()
    sims = q.sim_layers()
    if any(m.group_scale.is_floating_point() for m in sims.values()):  # fp16 alpha/mu (v1): codes, 2 fp16 per
        weights = sum(m.out_features * m.in_features for m in sims.values())  # group, fp32 transform factors
        bits = sum(m.code.bits * m.out_features * m.in_features + 32 * m.group_scale.numel()
                   + (0 if m.left is None else 32 * (m.left.numel() + m.right.numel())) for m in sims.values())
        return bits / weights
    tensors = {}
    for prefix, mod in sims.items():
        tensors.update(mod.tensors(prefix))
    return stored_bits_per_weight(tensors, next(iter(sims.values())).code.codes_per_word)


def twla_ladder(h: Harness, group_size: int, seed: int = 0) -> None:
    base = Recipe(group_size=group_size, seed=seed)
    for name, kw in [("RTN ternary", dict(weight_method="rtn", rotation="none")),
                     ("ATQ (init + stage 1)", dict(weight_method="atq", rotation="none")),
                     ("+ stage 2 (E2M-ATQ, GPTQ)", dict(rotation="none")),
                     ("KOTMS per linear", dict(rotation_sharing="linear"))]:
        h.run(name, dataclasses.replace(base, **kw), 1.58, seed=seed)
    q = h.run("+ KOTMS", base, 1.58, seed=seed)
    bits, secs = honest_bits(q), sum(q.seconds.values())
    q.r = dataclasses.replace(q.r, allocation="ila-amp")
    chosen = q.allocate()
    h.record("+ ILA-AMP", 1.58, "4MP", h.ppl(q.model), bits, secs + q.seconds["allocate"], seed=seed)
    q.search_clips()
    secs += q.seconds["allocate"] + q.seconds["clip"]
    h.record("+ clip search", 1.58, "4MP", h.ppl(q.model), bits, secs, act_bits_per_block=chosen, seed=seed)
    q.tune(h.path)
    h.record("default", 1.58, "4MP", h.ppl(q.model), bits, secs + q.seconds["tune"], act_bits_per_block=chosen,
             seed=seed)


ROTATION_RUNGS: list[tuple[str, dict[str, Any]]] = [
    ("KOTMS site-shared, head-local o_proj, 8 row blocks", {}),
    ("KOTMS per linear (deployable, x quantized per member)", dict(rotation_sharing="linear")),
    ("o_proj full online rotation", dict(o_proj_rotation="full")),
    ("down_proj full left factor (TP 1)", dict(row_parallel_blocks=1)),
    ("reference factor rule", dict(factor_rule="reference")),
]


def rotation_ladder(h: Harness, group_size: int, seed: int, rungs: list[int]) -> None:
    """Issue 10 item 3: each rotation option alone against the site-shared default (format v2, E2M-ATQ, uniform
    activation bits, no clip search); the last rung combines the options that are on in `rungs`."""
    base = Recipe(group_size=group_size, seed=seed)
    tag = f" (seed {seed})" if seed else ""
    combined: dict[str, Any] = {}
    for i in rungs:
        name, kw = ROTATION_RUNGS[i]
        combined.update(kw)
        h.run(name + tag, dataclasses.replace(base, **kw), 1.58)
    if len(combined) > 1:
        h.run("all options on: " + ", ".join(f"{k}={v}" for k, v in combined.items()) + tag,
              dataclasses.replace(base, **combined), 1.58)


def weight_target_ladder(h: Harness, group_size: int, seed: int) -> None:
    """What GPTQ fits each linear's output on (recipe weight_target): its 16-bit inputs (a16) or its inputs
    quantized at the recipe's act_bits (act). Uniform bits, no clip search, one seed for both."""
    from twla_offline.recipe import WEIGHT_TARGETS

    for target in WEIGHT_TARGETS:
        h.run(f"GPTQ target {target} (seed {seed})", Recipe(group_size=group_size, seed=seed, weight_target=target),
              1.58)


def act_group_ladder(h: Harness, group_size: int, seed: int, act_groups: list[int],
                     checkpoint: str | None = None, clip: float | None = None) -> None:
    """W1.58A4 with activation ranges of ~G channels per token (recipe act_group_size, format key act_blocks) on
    one set of quantized weights: the weight stage does not depend on the ranges (its Hessians come from 16-bit
    activations), so each row differs only in how activations are quantized. Ranges as the pipeline picks them
    (`pick_act_blocks`: whole rows of the transform view, servable by the Triton kernels). With `checkpoint` the
    weights, activation bits and clips are a finished checkpoint's (its clips were searched for its own ranges;
    `clip` replaces them all), and a last row runs it with 16-bit activations."""
    from twla_offline.layout import set_act_ranges

    if checkpoint:
        from twla_vllm.format import validate_checkpoint
        from twla_vllm.simulate import load_simulated_model

        qcfg = validate_checkpoint(checkpoint)
        model = load_simulated_model(checkpoint, device=h.device)
        sims = {n: m for n, m in model.named_modules() if isinstance(m, SimTwlaLinear)}
        specs, gs, bits, secs = {n: qcfg.spec(n) for n in sims}, qcfg.group_size, qcfg.bits_per_weight, None
        a_bits, tag = act_bits_label(qcfg, sims), f"checkpoint {os.path.basename(checkpoint.rstrip('/'))}"
        if clip is not None:
            for m in sims.values():
                m.act_clip = clip
            tag += f", clip {clip:g}"
        h.record(f"act ranges per k-block ({tag})", 1.58, a_bits, h.ppl(model), bits, secs)
    else:
        q = h.run(f"act ranges per k-block (seed {seed})", Recipe(group_size=group_size, seed=seed), 1.58,
                  act=(4,), act_group_size=0)
        model, sims, specs, gs = q.model, q.sim_layers(), q.specs, q.gs
        bits, secs, a_bits, tag = honest_bits(q), sum(q.seconds.values()), 4, f"seed {seed}"
    for g in act_groups:
        ranges = set_act_ranges(sims, specs, gs, g)
        h.record(f"act ranges of ~{g} channels ({tag})", 1.58, a_bits, h.ppl(model), bits, secs,
                 act_group_size=g, range_channels=ranges)
    if checkpoint and clip is None:  # how much of the loss is the weights': 16-bit activations
        for m in sims.values():
            m.act_bits = 16
        h.record(f"weights only ({tag})", 1.58, 16, h.ppl(model), bits, secs)


def act_bits_label(qcfg, names) -> int | str:
    """A checkpoint's activation bits as the tables write them: the bits where every linear has the same, else
    "<mean>MP" (mixed precision: ILA-AMP's per-block bits)."""
    bits = [qcfg.spec(n).act_bits for n in names]
    return bits[0] if len(set(bits)) == 1 else f"{sum(bits) / len(bits):.3g}MP"


def clip_ladder(h: Harness, checkpoint: str, objectives: list[str], act_group: int = 0) -> None:
    """A finished checkpoint's weights and activation bits, one row per objective: "stored" its own clips, "none"
    every clip 1.0, else clips searched again from 1.0 by that objective (`clip.search_clips`) on the held-out text
    and token count its recipe used (never the test windows). act_group > 0: activation ranges of ~that many
    channels (as `--act-group-size` picks them) for every row but "stored"."""
    import yaml

    from twla_offline import clip
    from twla_offline.layout import input_sites, set_act_ranges
    from twla_offline.pipeline import clip_windows
    from twla_vllm.format import validate_checkpoint
    from twla_vllm.simulate import load_simulated_model

    qcfg = validate_checkpoint(checkpoint)
    with open(os.path.join(checkpoint, "recipe.yaml")) as f:
        recipe = Recipe.from_dict(yaml.safe_load(f), source=f"{checkpoint}/recipe.yaml").resolved(h.device, 0)
    model = load_simulated_model(checkpoint, device=h.device)
    sims = {n: m for n, m in model.named_modules() if isinstance(m, SimTwlaLinear)}
    tag, bits, a_bits = os.path.basename(checkpoint.rstrip("/")), qcfg.bits_per_weight, act_bits_label(qcfg, sims)
    if "stored" in objectives:
        h.record(f"stored clips ({tag})", 1.58, a_bits, h.ppl(model), bits, None)
    if act_group:
        set_act_ranges(sims, {n: qcfg.spec(n) for n in sims}, qcfg.group_size, act_group)
        tag += f", ~{act_group}-channel act ranges"
    ids = clip_windows(h.tok, recipe)
    sites = input_sites(len(sims) // 7)
    for objective in [o for o in objectives if o != "stored"]:
        for m in sims.values():
            m.act_clip = 1.0
        secs = 0.0
        if objective != "none":
            t0 = time.time()
            chosen = clip.search_clips(model, ids, sites, recipe.batch_size, recipe.clip_grid(), objective)
            secs = time.time() - t0
            print(f"{objective}: clips {sorted(set(chosen.values()))}", flush=True)
        name = "every clip 1.0" if objective == "none" else f"clips searched by {objective} output MSE"
        h.record(f"{name} ({tag}, {recipe.clip_tokens} tokens)", 1.58, a_bits, h.ppl(model), bits, secs,
                 clips={k: v.act_clip for k, v in sims.items()} if objective != "none" else None)


def group_ladder(h: Harness, groups: list[int], formats: list[str]) -> None:
    """Format v2's integer grid against fp16 alpha/mu at the same group size (E2M-ATQ + KOTMS, uniform bits)."""
    from twla_offline import weights

    original = weights.gptq_quantize
    for gs in groups:
        if "v2" in formats:
            h.run(f"v2 int8 grid, group {gs}", Recipe(group_size=gs), 1.58)
        if "fp16" not in formats:
            continue
        weights.gptq_quantize = lambda *a, **k: original(*a, **{**k, "int_grid": False})
        try:  # the pipeline imported the name: patch where it is looked up
            import twla_offline.pipeline as p

            p.gptq_quantize = weights.gptq_quantize
            h.run(f"fp16 alpha/mu (v1 scales), group {gs}", Recipe(group_size=gs), 1.58)
        finally:
            weights.gptq_quantize = original
            p.gptq_quantize = original


def faithful(h: Harness) -> None:
    """The released TWLA code's weight structure and placement (simulation only; offline/faithful.py)."""
    from twla_offline.faithful import DEFAULT_PERCENTILES, DEFAULT_SALIENT_COUNTS, faithful_quantizer, faithful_recipe

    q = h.run("paper-faithful (order-2 groups, per-linear KOTMS)", faithful_recipe(Recipe()), 1.58,
              make=faithful_quantizer, salient_counts=list(DEFAULT_SALIENT_COUNTS),
              percentiles=list(DEFAULT_PERCENTILES))
    sal = [m.salient_fraction for m in q.sim_layers().values()]
    print(f"salient (two-plane) columns: {100 * sum(sal) / len(sal):.1f}% on average")


def second_plane(h: Harness, groups: list[int]) -> None:
    """Format v2 with a structured second trit plane on the most salient columns (simulation) against plain v2 at
    a smaller group: which spends the next ~0.3 bits/weight better (offline/faithful.py `fit_second_plane`)."""
    from twla_offline.faithful import SECOND_PLANE_FRACTION, second_plane_quantizer

    for gs in groups:
        h.run(f"v2 int8 grid, group {gs}", Recipe(group_size=gs), 1.58)
        h.run(f"v2 group {gs} + second trit plane on {100 * SECOND_PLANE_FRACTION:.2f}% of columns",
              Recipe(group_size=gs), 1.58, make=second_plane_quantizer)


def baselines(h: Harness, group_size: int, checkpoint: str | None) -> None:
    h.run("RTN ternary", Recipe(group_size=group_size, weight_method="rtn", rotation="none"), 1.58)
    model, _ = load_model(h.path, torch.float32, h.device)
    t0 = time.time()
    apply_quarot_rtn(model, weight_bits=2, group_size=group_size, act_bits=16)
    secs = time.time() - t0
    h.record("QuaRot-style RTN INT2", 2, 16, h.ppl(model), 2 + 32 / group_size, secs)
    set_act_bits(model, 4)
    h.record("QuaRot-style RTN INT2", 2, 4, h.ppl(model), 2 + 32 / group_size, secs)
    if checkpoint:
        record_checkpoint(h, checkpoint, "default", "4MP")


def record_checkpoint(h: Harness, checkpoint: str, method: str, a_bits: str, act_bits: int | None = None) -> None:
    """A finished checkpoint, simulated, on the harness's windows (time from its report.json when there);
    `act_bits`: every linear's activations at this width instead of the stored ones (16: the weights alone)."""
    from twla_vllm.simulate import load_simulated_model

    with open(os.path.join(checkpoint, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    report = os.path.join(checkpoint, "report.json")
    secs = json.load(open(report))["stage_seconds"]["total"] if os.path.exists(report) else None
    name = os.path.join(*checkpoint.rstrip("/").split(os.sep)[-2:])  # a staged checkpoint's parent names its run
    model = load_simulated_model(checkpoint, device=h.device)
    if act_bits is not None:
        set_act_bits(model, act_bits)
    h.record(method, 1.58, str(act_bits) if act_bits is not None else a_bits, h.ppl(model), qc["bits_per_weight"],
             secs, checkpoint=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ladder", choices=["twla", "groups", "rotation", "act-groups", "baselines", "faithful",
                                         "second-plane", "checkpoint", "clip", "weight-target"],
                    default="twla")
    ap.add_argument("--windows", type=int, default=16, help="512-token test windows for PPL")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--checkpoint",
                    help="baselines / checkpoint / act-groups ladders: evaluate this finished checkpoint")
    ap.add_argument("--label", default="default", help="checkpoint ladder: the row's method name")
    ap.add_argument("--a-bits", default="4MP", help="checkpoint ladder: the row's activation bits")
    ap.add_argument("--act-bits", type=int, help="checkpoint ladder: simulate every linear's activations at this "
                                                 "width instead of the stored ones (16: the weights alone)")
    ap.add_argument("--groups", default="128,64,32", help="groups ladder: group sizes")
    ap.add_argument("--formats", default="v2,fp16", help="groups ladder: v2 (integer grid) and/or fp16 (alpha/mu)")
    ap.add_argument("--act-groups", help="act-groups ladder: channels per range (default 192,128,96,64); clip "
                                         "ladder: one value, activation ranges for its rows (default: none)")
    ap.add_argument("--clip", type=float, help="act-groups ladder with --checkpoint: this clip ratio everywhere")
    ap.add_argument("--objectives", default="stored,none,layer,block",
                    help="clip ladder rows: stored (the checkpoint's clips), none (every clip 1.0), layer, block")
    ap.add_argument("--rungs", default="0,1,2,3,4", help="rotation ladder: which of ROTATION_RUNGS (0 = default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="twla / rotation / act-groups / weight-target ladders: calibration sample and transform seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="results file (default benchmarks/results/accuracy_<model>.json)")
    a = ap.parse_args()
    if a.ladder in ("checkpoint", "clip") and not a.checkpoint:
        ap.error(f"--ladder {a.ladder} needs --checkpoint DIR")
    if a.clip is not None and not a.checkpoint:
        ap.error("--clip needs --checkpoint DIR (a fresh quantization searches its own clips)")
    h = Harness(a.model, a.windows, a.device)
    if a.ladder == "twla":
        twla_ladder(h, a.group_size, a.seed)
    elif a.ladder == "faithful":
        faithful(h)
    elif a.ladder == "checkpoint":
        record_checkpoint(h, a.checkpoint, a.label, a.a_bits, a.act_bits)
    elif a.ladder == "clip":
        clip_ladder(h, a.checkpoint, a.objectives.split(","), int(a.act_groups or 0))
    elif a.ladder == "weight-target":
        weight_target_ladder(h, a.group_size, a.seed)
    elif a.ladder == "second-plane":
        second_plane(h, [int(g) for g in a.groups.split(",")])
    elif a.ladder == "act-groups":
        groups = [int(g) for g in (a.act_groups or "192,128,96,64").split(",")]
        act_group_ladder(h, a.group_size, a.seed, groups, a.checkpoint, a.clip)
    elif a.ladder == "rotation":
        rotation_ladder(h, a.group_size, a.seed, [int(i) for i in a.rungs.split(",")])
    elif a.ladder == "groups":
        group_ladder(h, [int(g) for g in a.groups.split(",")], a.formats.split(","))
    else:
        baselines(h, a.group_size, a.checkpoint)
    print("\n" + h.table())
    print(f"rows merged into {h.save(a.json)}")


if __name__ == "__main__":
    main()
