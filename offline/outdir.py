"""Where a checkpoint may be written, and how it replaces an old one without touching the user's files.

Rule: the destination must be new or an empty directory. An existing non-empty one is replaced only when
`overwrite` is set and it is a checkpoint this tool wrote: `config.json` says
`quantization_config.quant_method == "twla"` and the marker file MARKER lists every other file in it
(the writers add each file they write to the marker). A file not on that list is the user's: the
directory is then refused even with `overwrite`. The current directory, the home directory, `/` and
their parents are never a destination. Replacing renames the old directory aside, moves the new one in,
then deletes only the listed files of the old one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from .errors import UsageError

MARKER = ".twla-checkpoint"
QUANT_METHOD = "twla"  # the value twla_vllm.format writes; not imported from there: it pulls in torch


def check_out_dir(out_dir: str, overwrite: bool, name: str | None = None) -> list[str] | None:
    """Raise UsageError unless `out_dir` may be written; return the files of the checkpoint it replaces
    (None: there is none, the directory is missing or empty).

    `name` is how the message refers to the destination (e.g. "--out models/x"; default: the path)."""
    label = name or out_dir
    path = os.path.abspath(os.path.expanduser(out_dir))
    real = os.path.realpath(path)
    for protected in (os.getcwd(), os.path.expanduser("~")):
        if os.path.commonpath([real, os.path.realpath(protected)]) == real:
            raise UsageError(f"{label}: refusing to write to the current directory, the home directory, / "
                             f"or a parent of them; name a new directory")
    if os.path.islink(path):
        raise UsageError(f"{label}: is a symbolic link; name the directory itself")
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise UsageError(f"{label}: exists and is not a directory")
    entries = sorted(os.listdir(path))
    if not entries:
        return None
    listed = tool_files(path)
    if listed is None:
        raise UsageError(f"{label}: exists and holds {entries[0]!r}, but is not a checkpoint twla wrote; "
                         f"choose a new directory (nothing in it is deleted or overwritten)")
    foreign = [e for e in entries if e not in listed and e != MARKER]
    if foreign:
        raise UsageError(f"{label}: holds {foreign[0]!r}, which twla did not write; refusing to replace it "
                         f"even with --overwrite")
    if not overwrite:
        raise UsageError(f"{label}: already holds a twla checkpoint; pass --overwrite to replace it")
    return listed


def tool_files(d: str) -> list[str] | None:
    """Files the marker of `d` lists, or None if `d` is not a checkpoint this tool wrote."""
    try:
        with open(os.path.join(d, "config.json")) as f:
            method = json.load(f)["quantization_config"]["quant_method"]
        with open(os.path.join(d, MARKER)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):  # missing or unreadable: not ours
        return None
    if method != QUANT_METHOD or not isinstance(files, list):
        return None
    return [str(x) for x in files]


def record_files(d: str, names: list[str]) -> None:
    """Add `names` (files just written into `d`) to the marker of `d`, creating the marker if needed."""
    marker = os.path.join(d, MARKER)
    listed = []
    if os.path.exists(marker):
        with open(marker) as f:
            listed = json.load(f)["files"]
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"written_by": "twla_offline", "files": sorted(set(listed) | set(names))}, f, indent=1)
    os.replace(tmp, marker)


def install_dir(new: str, out_dir: str, overwrite: bool) -> None:
    """Move the finished directory `new` (same filesystem) to `out_dir`, replacing an old checkpoint there
    only as `check_out_dir` allows. `out_dir` is either the old or the new checkpoint at every moment
    except between two renames."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    old_files = check_out_dir(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if old_files is None:
        # rename(2) onto a missing or empty directory; it fails rather than clobber one filled since the check
        os.rename(new, out_dir)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    old = os.path.join(aside, "old")
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        os.rmdir(aside)
        raise
    # only the listed files go; whatever else appeared in the old directory since the check stays
    for name in [*old_files, MARKER]:
        p = os.path.join(old, name)
        if os.path.isfile(p) or os.path.islink(p):
            os.remove(p)
    try:
        os.rmdir(old)
        os.rmdir(aside)
    except OSError:
        print(f"warning: kept {old}: files twla did not write appeared in it", file=sys.stderr)
