"""Report next to the checkpoint: report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import os

import torch


def write_report(ckpt: str, summary: dict, quantizer=None) -> None:
    with open(os.path.join(ckpt, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plots = _plots(ckpt, summary, quantizer)
    ev = summary.get("eval", {})
    lines = [f"# TWLA report: {summary['model']}", "",
             f"Checkpoint: `{ckpt}`  ", f"Weights: ternary, group size {summary['group_size']}, "
             f"**{summary['bits_per_weight']} bits/weight** stored (codes + fp16 scales/offsets + rotations)  ",
             f"Activation bits per block (ILA-AMP or uniform): {summary['act_bits_per_block']}", "",
             "| model | PPL (Brown test, 512-token windows) | last-word acc | next-sentence 4-way acc |",
             "|---|---|---|---|"]
    for name, r in ev.items():
        lines.append(f"| {name} | {r['ppl']:.2f} | {r.get('last_word_acc', float('nan')):.3f} | "
                     f"{r.get('next_sentence_4way_acc', float('nan')):.3f} |")
    if "baseline" in ev and "twla" in ev:
        lines += ["", f"PPL ratio TWLA / baseline: **{ev['twla']['ppl'] / ev['baseline']['ppl']:.2f}x**"]
    lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()), "",
              "Note: for smollm2-135m the baseline is the dequantized Q4_1 GGUF model (the registries ship no "
              "fp16 weights); proxy tasks are built from held-out Brown text and are not standard benchmarks.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    with open(os.path.join(ckpt, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _plots(ckpt: str, summary: dict, q) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    bits = summary["act_bits_per_block"]
    fig, ax = plt.subplots(figsize=(8, 2.5))
    ax.bar(range(len(bits)), bits, color="tab:blue")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("activation bits")
    ax.set_title(f"ILA-AMP allocation (mean {sum(bits) / len(bits):.2f})")
    out.append(_save(fig, ckpt, "act_bits.png"))
    ex = getattr(q, "kotms_example", None) if q is not None else None
    if ex:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for ax, key in zip(axes, ("before", "after")):
            w = ex[key]
            w = (w - w.mean()) / w.abs().mean()
            ax.hist(w.clamp(-4, 4).numpy(), bins=200, color="tab:green")
            ax.set_title(f"gate/up weights, {key} KOTMS")
        axes[2].plot(ex["loss"])
        axes[2].set_title("KOTMS tri-modal NLL")
        out.append(_save(fig, ckpt, "kotms_weights.png"))
    act = getattr(q, "act_example", None) if q is not None else None
    if act:
        fig, ax = plt.subplots(figsize=(6, 3))
        qs = torch.linspace(0, 1, 101)
        for key in ("before", "after"):
            ax.plot(qs.numpy(), torch.quantile(act[key], qs).numpy(), label=f"{key} rotation")
        ax.set_yscale("log")
        ax.set_xlabel("quantile over channels")
        ax.set_ylabel("max |activation|")
        ax.set_title("mlp input channel ranges, block 1")
        ax.legend()
        out.append(_save(fig, ckpt, "act_ranges.png"))
    return out


def _save(fig, ckpt: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(ckpt, name), dpi=100)
    plt.close(fig)
    return name
