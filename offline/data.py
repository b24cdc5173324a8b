"""Calibrate stage, data side: text sources and token windows.

Sources: "brown" (embedded default: Brown Corpus splits shipped with the package; calib for weights,
heldout for bit allocation and clip search, test for evaluation only), a local text file path, or
"wikitext2" / "c4" through Hugging Face `datasets` when the hub is reachable.
"""

from __future__ import annotations

import os

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPLITS = ("calib", "heldout", "test")


def load_text(source: str, split: str) -> str:
    """Text of `split` (calib | heldout | test) from `source` (brown | wikitext2 | c4 | a file path)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "brown":
        with open(os.path.join(DATA_DIR, f"brown_{split}.txt")) as f:
            return f.read()
    if os.path.isfile(source):
        return _split_file(source, split)
    if source in ("wikitext2", "c4"):
        return _hf_dataset_text(source, split)
    # anything else names a file: say that it is missing rather than that the source is unknown
    raise FileNotFoundError(f"calibration text file not found: {source} (sources: brown, wikitext2, c4 or a "
                            f"text file)")


def _split_file(path: str, split: str) -> str:
    """A user's text file: first 80% calib, next 10% heldout, last 10% test (by paragraphs)."""
    with open(path) as f:
        paras = [p for p in f.read().split("\n\n") if p.strip()]
    if len(paras) < 10:
        paras = [ln for p in paras for ln in p.splitlines() if ln.strip()]
    if len(paras) < 3:
        raise ValueError(f"{path}: too little text to split into calib/heldout/test")
    a, b = int(len(paras) * 0.8), int(len(paras) * 0.9)
    part = {"calib": paras[:a], "heldout": paras[a:b], "test": paras[b:]}[split]
    return "\n\n".join(part)


def _hf_dataset_text(name: str, split: str) -> str:
    from datasets import load_dataset

    if name == "wikitext2":
        hf_split = {"calib": "train", "heldout": "validation", "test": "test"}[split]
        return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"])
    # C4: stream the English validation shard; docs are split between our three splits by index.
    docs = [d["text"] for _, d in zip(range(3000), load_dataset("allenai/c4", "en", split="validation",
                                                                  streaming=True))]
    part = {"calib": docs[:2000], "heldout": docs[2000:2500], "test": docs[2500:]}[split]
    return "\n\n".join(part)


def token_windows(tokenizer, text: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from `text` -> LongTensor [n, seqlen]."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() <= seqlen:
        raise ValueError(f"text has {ids.numel()} tokens, need more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows (stride = seqlen) -> [w, seqlen]; the tail is dropped."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    w = ids.numel() // seqlen
    if max_windows:
        w = min(w, max_windows)
    if w == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: w * seqlen].view(w, seqlen)
