"""Calibrate stage, data side: text sources and token windows.

Sources: "brown" (embedded default: Brown Corpus splits shipped with the package; calib for weights,
heldout for bit allocation and clip search, test for evaluation only), a local file, or "wikitext2" / "c4"
through Hugging Face `datasets` when the hub is reachable. A local file is plain text (split by paragraphs)
or records (split by record): `.jsonl` (one JSON object per line), `.json` (a list of objects, or an object
whose `text_column` holds a list of strings) or `.csv` (a header row), the text in column `text_column`.

Torch is imported only by the functions that make token windows: the command line checks a calibration
file (and its column) before anything heavy loads.
"""

from __future__ import annotations

import csv
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPLITS = ("calib", "heldout", "test")
RECORD_FORMATS = (".jsonl", ".json", ".csv")
DEFAULT_TEXT_COLUMN = "text"


class DataError(ValueError):
    """A calibration file that cannot be used; the message names the file (and column or record)."""


def load_text(source: str, split: str, text_column: str = DEFAULT_TEXT_COLUMN) -> str:
    """Text of `split` (calib | heldout | test) from `source` (brown | wikitext2 | c4 | a file path);
    `text_column`: the column holding the text in a .jsonl / .json / .csv file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "brown":
        with open(os.path.join(DATA_DIR, f"brown_{split}.txt")) as f:
            return f.read()
    if os.path.isfile(source) and source.lower().endswith(RECORD_FORMATS):
        return "\n\n".join(_split(read_records(source, text_column), split, source))
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
    return "\n\n".join(_split(paras, split, path))


def _split(items: list[str], split: str, path: str) -> list[str]:
    """First 80% calib, next 10% heldout, last 10% test: the test part never reaches calibration."""
    if len(items) < 3:
        raise DataError(f"{path}: too little text to split into calib/heldout/test")
    a, b = int(len(items) * 0.8), int(len(items) * 0.9)
    return {"calib": items[:a], "heldout": items[a:b], "test": items[b:]}[split]


def read_records(path: str, text_column: str = DEFAULT_TEXT_COLUMN) -> list[str]:
    """The non-empty texts in column `text_column` of a .jsonl / .json / .csv file, in file order."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in RECORD_FORMATS:
        raise DataError(f"{path}: not a records file ({', '.join(RECORD_FORMATS)})")
    try:
        if ext == ".csv":
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns = reader.fieldnames or []
                if text_column not in columns:
                    raise DataError(f"{path}: no column '{text_column}' (columns: {', '.join(columns) or 'none'}); "
                                    f"choose one with --text-column")
                rows: list[Any] = list(reader)
        elif ext == ".jsonl":
            with open(path) as f:
                rows = [_json(line, path, i + 1) for i, line in enumerate(f) if line.strip()]
        else:
            with open(path) as f:
                data = _json(f.read(), path)
            if isinstance(data, dict):  # columns: {"text": [...], ...}
                if text_column not in data:
                    raise DataError(f"{path}: no key '{text_column}' (keys: {', '.join(map(str, data)) or 'none'}); "
                                    f"choose one with --text-column")
                data = [{text_column: t} for t in data[text_column]] if isinstance(data[text_column], list) else None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a list of objects, or an object whose '{text_column}' is a list")
            rows = data
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    texts = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is a {type(row).__name__}, not an object")
        if text_column not in row:
            raise DataError(f"{path}: record {i} has no column '{text_column}' (has: {', '.join(map(str, row))}); "
                            f"choose one with --text-column")
        value = row[text_column]
        if not isinstance(value, str):
            raise DataError(f"{path}: record {i}: column '{text_column}' is a {type(value).__name__}, not text")
        if value.strip():
            texts.append(value)
    if not texts:
        raise DataError(f"{path}: column '{text_column}' holds no text")
    return texts


def _json(text: str, path: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line}" if line else f"line {e.lineno}"
        raise DataError(f"{path}: {where}: not valid JSON ({e.msg})") from None


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
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() <= seqlen:
        raise ValueError(f"text has {ids.numel()} tokens, need more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g, device="cpu")
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
