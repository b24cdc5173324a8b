"""Report inside the checkpoint: report.json, report.md and PNG plots.

The quantizer writes it into the finished checkpoint before that moves to `--out`, so no reader ever
sees a half-written report.
"""

from __future__ import annotations

import json
import os

import torch

# where a weight code puts a (row, group) of weights, centred and divided by its mean |w| (none for int4)
CODE_CENTRES = {"ternary": (-1.0, 0.0, 1.0), "binary": (-1.0, 1.0)}
# what each transform's plot shows: its name and the loss its history holds (pipeline.transform_learner)
TRANSFORMS = {"kotms": ("KOTMS", "tri-modal NLL", "Adam step"),
              "okt": ("OKT", "bimodal NLL", "EM iteration"),
              "learned": ("learned transform", "quantized output error J", "Adam step (first, last: eval subset)")}


def write_report(ckpt: str, summary: dict, quantizer=None) -> list[str]:
    """Write report.json, report.md and the plots into `ckpt`; return the names of the files written."""
    with open(os.path.join(ckpt, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plots = _plots(ckpt, summary, quantizer)
    ev = summary.get("eval", {})
    recipe = summary.get("recipe", {})
    rank = recipe.get("lowrank_rank", 0) if recipe.get("lowrank", "none") != "none" else 0
    label = recipe.get("method", "twla").upper()
    # eval keys stay "baseline" / "twla" (report.json readers); the tables name the models
    names = {"baseline": "dense", "twla": f"{label} (quantized)"}
    ratio = ev["twla"]["ppl"] / ev["baseline"]["ppl"] if "baseline" in ev and "twla" in ev else None
    lines = [f"# {label} report: {summary['model']}", "",
             f"Checkpoint: `{summary.get('checkpoint', ckpt)}`  ",
             f"Weights: {recipe.get('code', 'ternary')}, group size {summary['group_size']}"
             f"{''.join(f' ({m} {g})' for m, g in summary.get('group_size_for', {}).items())}"
             f"{f', rank-{rank} low-rank branch' if rank else ''}, **{summary['bits_per_weight']} bits/weight** "
             f"stored (codes + int8 group scales + fp16 row scales + transforms{' + branch' if rank else ''})  ",
             f"Activation bits per block (ILA-AMP or uniform): {summary['act_bits_per_block']}", "",
             "| model | PPL (Brown test, 512-token windows) | last-word acc | next-sentence 4-way acc |",
             "|---|---|---|---|"]
    for key in (k for k in names if k in ev):
        r = ev[key]
        lines.append(f"| {names[key]} | {r['ppl']:.2f} | {r.get('last_word_acc', float('nan')):.3f} | "
                     f"{r.get('next_sentence_4way_acc', float('nan')):.3f} |")
    if ratio is not None:
        lines += ["", f"PPL ratio {label} / dense: **{ratio:.2f}x**"]
    lines += ["", "Time per stage (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()), "",
              "Note: dense is the source model as the quantizer read it; the built-in models come from the "
              "registries as GGUF only (smollm2-135m Q4_1, qwen2.5-coder-1.5b Q4_K_M), dequantized to float. "
              "Proxy tasks are built from held-out Brown text and are not standard benchmarks.", ""]
    lines += _generations(ev.get("generations"), summary, label, names, ratio)
    lines += [f"![{p}]({p})" for p in plots]
    with open(os.path.join(ckpt, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["report.json", "report.md", *plots]


@torch.no_grad()
def greedy_continuations(model, tok, prompts: tuple[str, ...], n_tokens: int) -> list[str]:
    """Greedy continuation of each prompt, `n_tokens` tokens or up to EOS (no cache: exact, and short)."""
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
        new: list[int] = []
        for _ in range(n_tokens):
            nxt = int(model(ids, use_cache=False).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        texts.append(tok.decode(new, skip_special_tokens=True))
    return texts


def _generations(gens: list[dict] | None, summary: dict, label: str, names: dict[str, str],
                 ratio: float | None) -> list[str]:
    if not gens:
        return []
    cols = [k for k in names if k in gens[0]]
    bits = summary["act_bits_per_block"]
    if ratio is not None and ratio <= 1.25:
        expect = ("close to dense (PPL ratio {:.2f}x), so the continuations often agree word for word at first "
                  "and then part on a word choice, both staying fluent.").format(ratio)
    else:
        expect = ("much of the model's quality is lost (the PPL ratio above measures how much), so the quantized "
                  "text often drifts off topic, repeats itself or breaks into fragments where the dense model "
                  "stays coherent.")
    lines = ["## Greedy continuations, dense and quantized side by side", "",
             f"The same prompts continued greedily by each model ({label}: simulated in PyTorch with the "
             f"checkpoint's numerics). What to expect at {summary['bits_per_weight']} bits per weight and "
             f"{sum(bits) / len(bits):.1f} activation bits on average: {expect}", "",
             "| prompt | " + " | ".join(names[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for g in gens:
        lines.append("| " + " | ".join(_cell(g[k]) for k in ("prompt", *cols)) + " |")
    return lines + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ↵ ")


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
    ex = getattr(q, "transform_example", None) if q is not None else None
    if ex:
        # the weights as the transform leaves them: per (row, group), centred and in units of the group's mean
        # |w|, where a group that suits the code clusters at its centres; log counts show the tails
        name, loss, step = TRANSFORMS.get(q.r.rotation, (q.r.rotation, "loss", "step"))
        centres = CODE_CENTRES.get(q.r.code, ())
        gs = q.linear_gs["mlp.gate_proj"]  # the example is a gate/up input's transform
        glen = gs if gs > 0 else q.hidden
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
        for key, color in (("before", "tab:gray"), ("after", "tab:green")):
            x = _group_normalized(ex[key], glen)
            text = f"{key} {name}"
            if centres:
                near = (x[:, None] - torch.tensor(centres)).abs().amin(1).lt(0.25).float().mean()
                text += f" ({100 * near:.1f}% within 0.25 of a centre)"
            axes[0].hist(x.clamp(-6, 6).numpy(), bins=241, range=(-6, 6), histtype="step", color=color, label=text)
        for c in centres:
            axes[0].axvline(c, color="tab:red", linestyle=":", linewidth=1)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("(w - group mean) / group mean |w|   (|x| > 6 piled at the edges)")
        axes[0].set_ylabel("count")
        axes[0].set_title(f"gate/up weights of block 1{f'; red: {q.r.code} centres' if centres else ''}")
        axes[0].legend(fontsize=8)
        axes[1].plot(ex["loss"])
        axes[1].set_xlabel(step)
        axes[1].set_title(f"{name}: {loss}")
        out.append(_save(fig, ckpt, "transform_weights.png"))
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


def _group_normalized(w: torch.Tensor, glen: int) -> torch.Tensor:
    """Row-major weights cut into groups of `glen`, each centred and divided by its mean |w| (flattened)."""
    g = w.float().reshape(-1, glen)
    g = g - g.mean(-1, keepdim=True)
    return (g / g.abs().mean(-1, keepdim=True).clamp(min=1e-12)).flatten()


def _save(fig, ckpt: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(ckpt, name), dpi=100)
    plt.close(fig)
    return name
