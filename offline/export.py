"""Export stage: write a TWLA checkpoint directory atomically (temp dir + validate + rename into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file

from twla_vllm.ct_vocab import describe as describe_in_ct_vocabulary
from twla_vllm.format import (QUANT_TENSOR_SUFFIXES, WEIGHT_PACKED, CheckpointConfig,
                              validate_checkpoint)

from .model_card import base_model_id, model_card
from .outdir import check_out_dir, install_dir, record_files

SHARD_BYTES = 2 * 1024**3
RECIPE_FILE = "recipe.yaml"
MODEL_CARD = "README.md"


def write_checkpoint(out_dir: str, hf_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     qconfig: CheckpointConfig, tokenizer: Any = None,
                     extra_files: dict[str, str] | None = None, *, overwrite: bool = False) -> str:
    """Write config.json (+quantization_config), model*.safetensors, the tokenizer, recipe.yaml (the recipe,
    reusable with `twla-quantize --recipe`) and a model card README.md to `out_dir`.

    Nothing appears at `out_dir` until the whole checkpoint is written and passes `validate_checkpoint`.
    `out_dir` must be new or empty, or (with `overwrite`) a checkpoint this tool wrote and nothing else:
    see `outdir.py`, which also names the marker file listing what was written here.
    `extra_files`: name -> path of files to copy alongside (e.g. a report).
    """
    out_dir = os.path.abspath(out_dir)
    check_out_dir(out_dir, overwrite)  # fail before the work; install_dir checks again before the swap
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        if qconfig.bits_per_weight is None:
            qconfig.bits_per_weight = stored_bits_per_weight(tensors, qconfig.code.codes_per_word)
        qconfig.extra.update(describe_in_ct_vocabulary(qconfig))  # checked by validate_checkpoint below
        cfg = dict(hf_config)
        cfg["quantization_config"] = qconfig.to_dict()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        write_recipe(tmp, qconfig.recipe)
        write_model_card(tmp, qconfig, base_model_id(None, hf_config))
        _save_sharded(tmp, {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, name))
        validate_checkpoint(tmp)
        record_files(tmp, os.listdir(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint is meant to be shared
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        install_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our temp dir: a failed write leaves nothing behind
        raise
    return out_dir


def write_recipe(d: str, recipe: dict[str, Any]) -> str:
    """recipe.yaml in `d`: the checkpoint's recipe (quantization_config.recipe), loadable by --recipe."""
    import yaml

    with open(os.path.join(d, RECIPE_FILE), "w") as f:
        f.write("# The recipe this checkpoint was made with (also quantization_config.recipe in config.json).\n"
                "# twla-quantize MODEL --out DIR --recipe recipe.yaml repeats it; flags override its fields.\n")
        yaml.safe_dump(recipe, f, sort_keys=False)
    return RECIPE_FILE


def write_model_card(d: str, qconfig: CheckpointConfig, base_model: str | None = None,
                     summary: dict[str, Any] | None = None) -> str:
    """README.md in `d` (model_card.py); the CLI rewrites it with the evaluation once the report exists."""
    with open(os.path.join(d, MODEL_CARD), "w") as f:
        f.write(model_card(qconfig, base_model, summary))
    return MODEL_CARD


def stored_bits_per_weight(tensors: dict[str, torch.Tensor], codes_per_word: int) -> float:
    """Bits stored for quantized linears (codes, scales, offsets, rotations) per linear weight."""
    bits = weights = 0
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANT_TENSOR_SUFFIXES:
            bits += t.numel() * t.element_size() * 8
        if suffix == WEIGHT_PACKED:
            weights += t.numel() * codes_per_word
    return round(bits / max(weights, 1), 4)


def _save_sharded(d: str, tensors: dict[str, torch.Tensor]) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
