"""Evaluation on held-out text that calibration and bit allocation never see (the `test` split).

Perplexity: the text is tokenized once and cut into consecutive non-overlapping windows of `seqlen`
tokens (stride = seqlen, no context carried across windows); PPL = exp(mean NLL over every predicted
token, i.e. seqlen - 1 per window). Proxy tasks built from the same held-out text and reported under
their own names: "last-word" (greedy prediction of a paragraph's final word given the paragraph) and
"next-sentence-4way" (the true next sentence against 3 sentences from other documents, by mean
token log-likelihood).
"""

from __future__ import annotations

import math
import random
import re

import torch
from tqdm import tqdm

from . import data


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "ppl") -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False):
        ids = windows[i:i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def _sentences(doc: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 4]


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> tuple[float, int, torch.Tensor]:
    ctx = tok(context)["input_ids"]
    cont = tok(continuation)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([ctx + cont], device=device)[:, -512:]
    logits = model(ids, use_cache=False).logits[0, -len(cont) - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(cont, device=device)
    return float(logp.gather(1, target[:, None]).sum()), len(cont), logits.argmax(-1) == target


def last_word_items(text: str, n: int = 100, seed: int = 0) -> list[tuple[str, str]]:
    """(context, " " + last word) of `n` shuffled paragraphs of >= 12 words ending in a period."""
    paras = [p for p in text.split("\n") if len(p.split()) >= 12 and p.rstrip()[-1:] == "."]
    random.Random(seed).shuffle(paras)
    items = []
    for p in paras[:n]:
        context, _, word = p.rstrip()[:-1].rpartition(" ")
        items.append((context, " " + word))
    return items


def last_word_accuracy(model, tok, text: str, n: int = 100, seed: int = 0) -> float:
    items = last_word_items(text, n, seed)
    hits = sum(bool(_loglik(model, tok, context, word)[2].all()) for context, word in items)
    return hits / max(1, len(items))


def next_sentence_items(text: str, n: int = 60, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(two sentences, [the true next sentence, 3 sentences of other documents]) `n` times."""
    docs = [_sentences(d) for d in text.split("\n\n")]
    docs = [d for d in docs if len(d) >= 4]
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        di = rng.randrange(len(docs))
        d = docs[di]
        i = rng.randrange(2, len(d) - 1)
        others = [rng.choice(docs[j]) for j in rng.sample([j for j in range(len(docs)) if j != di], 3)]
        items.append((" ".join(d[i - 2:i]), [d[i]] + others))
    return items


def next_sentence_accuracy(model, tok, text: str, n: int = 60, seed: int = 0) -> float:
    hits = 0
    items = next_sentence_items(text, n, seed)
    for context, candidates in items:
        scores = []
        for cand in candidates:  # mean token log-likelihood: candidates differ in length
            ll, cnt, _ = _loglik(model, tok, context, " " + cand)
            scores.append(ll / cnt)
        hits += int(max(range(len(scores)), key=scores.__getitem__) == 0)
    return hits / len(items)


def evaluate(model, tok, source: str = "brown", seqlen: int = 512, max_windows: int | None = 32,
             proxy: bool = True, name: str = "model") -> dict:
    text = data.load_text(source, "test")
    out = {"ppl": perplexity(model, data.eval_windows(tok, text, seqlen, max_windows), desc=f"ppl {name}"),
           "ppl_seqlen": seqlen, "ppl_windows": max_windows}
    if proxy:
        out["last_word_acc"] = last_word_accuracy(model, tok, text)
        out["next_sentence_4way_acc"] = next_sentence_accuracy(model, tok, text)
    return out
