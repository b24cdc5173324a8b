"""benchmarks/results_file.py: a run's rows replace the file's rows of the same key and keep the others."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from results_file import merge_rows  # noqa: E402


def test_merge_replaces_same_key_keeps_others_and_stamps_the_command(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    key = lambda r: (r["method"], r["bits"])  # noqa: E731
    merge_rows(path, [{"method": "a", "bits": 4, "ppl": 1.0}, {"method": "b", "bits": 4, "ppl": 2.0}], key, "cpu",
               model="m")
    merge_rows(path, [{"method": "a", "bits": 4, "ppl": 3.0}, {"method": "a", "bits": 8, "ppl": 4.0}], key, "gpu",
               model="m2")
    doc = json.load(open(path))
    assert doc["device"] == "gpu" and doc["model"] == "m2" and doc["date"] and doc["command"].startswith("python ")
    assert {(r["method"], r["bits"]): r["ppl"] for r in doc["rows"]} == {("a", 4): 3.0, ("b", 4): 2.0, ("a", 8): 4.0}
    assert all(r["command"] == doc["command"] for r in doc["rows"])
    assert os.listdir(tmp_path / "sub") == ["r.json"]  # written through a temporary file, nothing left over
