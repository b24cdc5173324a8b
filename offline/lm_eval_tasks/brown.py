"""Documents and metrics of the twla_brown_* lm-eval tasks, built from the packaged Brown test split when a
task loads (lm-eval calls `custom_dataset` with the task metadata and the model arguments, so the model's own
tokenizer cuts the same windows `twla-eval` scores).

Options (`--metadata '{"ppl_seqlen": 512, ...}'`): ppl_seqlen (tokens per window, 512), ppl_windows (32),
proxy_n (items per proxy task: 100 last-word, 60 next-sentence by default), proxy_seed (0) -- twla-eval's
defaults, so both tools score the same items.

Tasks:
  twla_brown_ppl          lm-eval's rolling log-likelihood over the text of each twla-eval window: every
                          token is scored, the first one from the BOS/prefix token (lm-eval's rule), so its
                          token perplexity differs from twla-eval's (which scores tokens 1.. of a window given
                          its first, without BOS); also word/byte perplexity and bits per byte.
  twla_brown_ppl_windows  twla-eval's rule: the window's first token is the context, the other seqlen - 1
                          tokens are scored. Equal to `twla-eval` when the tokenizer reproduces each window
                          from its text (checked per window at load; a warning names the windows where not).
  twla_brown_last_word    the final word of a paragraph, exact greedy match (acc), as twla-eval's last-word.
  twla_brown_next_sentence  the true next sentence against 3 from other documents, by mean token
                          log-likelihood (acc), as twla-eval's next-sentence-4way.
This file is loaded by lm-eval by path (not as part of the package): imports are absolute.
"""

from __future__ import annotations

import logging
import re
from typing import Any

logger = logging.getLogger("twla_offline.lm_eval_tasks")

DEFAULTS = {"ppl_seqlen": 512, "ppl_windows": 32, "proxy_seed": 0}


def _tokenizer(kwargs: dict[str, Any]):
    from transformers import AutoTokenizer

    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name:
        raise ValueError("twla_brown tasks need the model's tokenizer: pass --model_args pretrained=DIR "
                         "(or tokenizer=...)")
    return AutoTokenizer.from_pretrained(name)


def _option(kwargs: dict[str, Any], key: str, default: int | None = None) -> int:
    value = kwargs.get(key, DEFAULTS.get(key, default))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"twla_brown tasks: metadata '{key}' must be a non-negative integer, got {value!r}")
    return value


def _test_text() -> str:
    from twla_offline import data

    return data.load_text("brown", "test")


def _windows(kwargs: dict[str, Any]):
    from twla_offline import data

    tok = _tokenizer(kwargs)
    seqlen = _option(kwargs, "ppl_seqlen")
    return tok, data.eval_windows(tok, _test_text(), seqlen, _option(kwargs, "ppl_windows"))


def _dataset(rows: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------
def ppl_docs(**kwargs: Any):
    """One document per twla-eval window: its text and the number of tokens lm-eval will score."""
    tok, windows = _windows(kwargs)
    rows = []
    for w in windows.tolist():
        text = tok.decode(w)  # special tokens kept as text (e.g. <unk>): the tokenizer maps them back
        rows.append({"text": text, "tokens": len(tok(text)["input_ids"])})
    return _dataset(rows)


def ppl_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"token_perplexity": (loglikelihood, doc["tokens"]),
            "word_perplexity": (loglikelihood, len(re.split(r"\s+", doc["text"]))),
            "byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}


def _lm_eval_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token ids lm-eval's causal models give a (context, continuation) pair (`TemplateLM._encode_pair`):
    trailing whitespace of the context moves to the continuation; the pair is encoded whole and split at the
    length of the encoded context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def ppl_window_docs(**kwargs: Any):
    """twla-eval's windows as (first token, the rest) pairs, with the count of tokens lm-eval will score."""
    tok, windows = _windows(kwargs)
    rows, inexact = [], []
    for i, w in enumerate(windows.tolist()):
        j = 1  # lm-eval cannot take an all-whitespace context: widen it (that window is then inexact)
        while j < len(w) - 1 and not tok.decode(w[:j]).strip():
            j += 1
        context, continuation = tok.decode(w[:j]), tok.decode(w[j:])
        ctx, cont = _lm_eval_split(tok, context, continuation)
        if ctx != w[:1] or cont != w[1:]:
            inexact.append(i)
        rows.append({"context": context, "continuation": continuation, "predicted": len(cont)})
    if inexact:
        logger.warning("twla_brown_ppl_windows: %d of %d windows (%s) do not tokenize back to twla-eval's window "
                       "(a first token ending in whitespace, a BOS the tokenizer adds, or a non-reversible "
                       "decode); those are scored as lm-eval tokenizes them, so the perplexity differs from "
                       "twla-eval's", len(inexact), len(rows), inexact[:10])
    return _dataset(rows)


def ppl_window_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    loglikelihood, _ = results[0]
    return {"token_perplexity": (loglikelihood, doc["predicted"])}


# ---------------------------------------------------------------------------------------------------------
# Proxy tasks (the items of twla_offline.evaluate, same n and seed)
# ---------------------------------------------------------------------------------------------------------
def last_word_docs(**kwargs: Any):
    from twla_offline.evaluate import last_word_items

    items = last_word_items(_test_text(), _option(kwargs, "proxy_n", 100), _option(kwargs, "proxy_seed"))
    return _dataset([{"context": c, "word": w} for c, w in items])


def next_sentence_docs(**kwargs: Any):
    from twla_offline.evaluate import next_sentence_items

    tok = _tokenizer(kwargs)
    items = next_sentence_items(_test_text(), _option(kwargs, "proxy_n", 60), _option(kwargs, "proxy_seed"))
    # twla-eval divides each candidate's log-likelihood by its token count, tokenized on its own
    return _dataset([{"context": c, "choices": cands, "gold": 0,
                      "choice_tokens": [len(tok(" " + s)["input_ids"]) for s in cands]} for c, cands in items])


def next_sentence_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    scores = [ll / n for (ll, _), n in zip(results, doc["choice_tokens"], strict=True)]
    return {"acc": float(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])}
