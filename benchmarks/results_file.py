"""Rows into a `benchmarks/results/*.json` file (schema: ../shared/design/results.md): a run's rows replace the
file's rows with the same key, the others stay, and the file is replaced atomically."""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Callable


def merge_rows(path: str, rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], device: str,
               **top: Any) -> str:
    """Write `rows` (each stamped with this command line) into `path` over the rows of the same `key`; `device`
    and `top` (e.g. the model, its dense PPL) are the file's top-level fields, with the date and the command."""
    command = "python " + " ".join(sys.argv)
    old = json.load(open(path)) if os.path.exists(path) else {"rows": []}
    mine = {key(r) for r in rows}
    kept = [r for r in old["rows"] if key(r) not in mine]
    out = {"device": device, "date": datetime.date.today().isoformat(), "command": command, **top,
           "rows": kept + [{**r, "command": command} for r in rows]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return path
