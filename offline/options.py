"""The recipe's command-line options: each checked by argparse before any work, with an error naming the
option and what it accepts.

Nothing here imports torch: `twla-quantize --help` and a bad option must answer at once, and importing
torch, transformers and vLLM takes seconds.
"""

from __future__ import annotations

import argparse
import ast
import os
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .pipeline import Recipe

CALIB_SOURCES = ("brown", "wikitext2", "c4")
BLOCK_BITS = range(2, 9)  # activation bits one block can get (16, unquantized, is never allocated)
MAX_SEED = 2**32 - 1


def recipe_defaults() -> dict[str, Any]:
    """Field defaults of `pipeline.Recipe`, read from pipeline.py's source without importing it: pipeline
    imports torch. The defaults are literals, so this is exact (tests/test_cli.py checks it against the
    imported class)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Recipe":
            return {s.target.id: ast.literal_eval(s.value) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}
    raise RuntimeError("offline/pipeline.py defines no Recipe class")


def _int_check(ok: Callable[[int], bool], allowed: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return v

    return parse


positive_int = _int_check(lambda v: v >= 1, "a positive integer")
group_size = _int_check(lambda v: v == -1 or (v > 0 and v % 16 == 0), "-1 (per row) or a positive multiple of 16")
power_of_two = _int_check(lambda v: v >= 1 and v & (v - 1) == 0, "a power of two >= 1 (1, 2, 4, 8, ...)")
seed = _int_check(lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def act_bits(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not BLOCK_BITS[0] <= v <= BLOCK_BITS[-1]:
        raise argparse.ArgumentTypeError(f"must be a number in [{BLOCK_BITS[0]}, {BLOCK_BITS[-1]}] "
                                         f"(average bits per block), got {text!r}")
    return v


def bit_set(text: str) -> tuple[int, ...]:
    allowed = f"comma-separated integers in {BLOCK_BITS[0]}..{BLOCK_BITS[-1]}, e.g. 2,4,6,8"
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not all(b in BLOCK_BITS for b in bits):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return bits


def calib_source(text: str) -> str:
    if text in CALIB_SOURCES or os.path.isfile(text):
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"not a file: {text} (use {', '.join(CALIB_SOURCES)} or a text file)")
    raise argparse.ArgumentTypeError(f"file not found: {text} (use {', '.join(CALIB_SOURCES)} or a text file)")


def add_recipe_args(ap: argparse.ArgumentParser) -> None:
    d = recipe_defaults()
    g = ap.add_argument_group("recipe (recorded in the checkpoint; a resumed run must use the same)")
    g.add_argument("--group-size", type=group_size, default=d["group_size"],
                   help="weight group along K: the largest multiple of 16 <= this that divides every K is "
                        "used; -1 = one group per row")
    g.add_argument("--act-bits", type=act_bits, default=d["act_bits"],
                   help="average activation bits per decoder block, in [2, 8]")
    g.add_argument("--bit-set", type=bit_set, default=",".join(map(str, d["bit_set"])),
                   help="activation bits a block may get: comma-separated integers in 2..8 (e.g. 2,4,6,8); "
                        "must reach --act-bits from below and above")
    g.add_argument("--weight-method", default=d["weight_method"], choices=["e2m-atq", "atq", "rtn"],
                   help="ternarization: e2m-atq (GPTQ + two refits), atq (refit only), rtn (round to nearest)")
    g.add_argument("--rotation", default=d["rotation"], choices=["kotms", "random", "none"],
                   help="input rotation: kotms (learned Kronecker), random orthogonal, or none")
    g.add_argument("--kotms-iters", type=positive_int, default=d["kotms_iters"],
                   help="Adam steps that learn each KOTMS rotation")
    g.add_argument("--allocation", default=d["allocation"], choices=["ila-amp", "uniform"],
                   help="how --act-bits is spread over blocks: ila-amp (by measured sensitivity) or uniform")
    g.add_argument("--no-clip-search", action="store_true",
                   help="skip the per-linear activation clip search (clip = 1.0)")
    g.add_argument("--row-parallel-blocks", type=power_of_two, default=d["row_parallel_blocks"],
                   help="max tensor-parallel size the checkpoint supports (shard-local blocks of o/down "
                        "inputs): a power of two")
    g.add_argument("--calib", type=calib_source, default=d["calib"],
                   help="calibration text: brown (embedded), wikitext2, c4 (need the hub) or a text file")
    g.add_argument("--nsamples", type=positive_int, default=d["nsamples"],
                   help="calibration windows of --seqlen tokens")
    g.add_argument("--seqlen", type=positive_int, default=d["seqlen"], help="tokens per calibration window")
    g.add_argument("--amp-tokens", type=positive_int, default=d["amp_tokens"],
                   help="held-out tokens ILA-AMP measures block sensitivity on")
    g.add_argument("--seed", type=seed, default=d["seed"],
                   help="seed of every random choice (windows, rotations): same command + seed = same bytes")


def check_recipe_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Checks that involve two options (argparse checks each alone, string defaults included)."""
    bits = a.bit_set
    if a.allocation == "ila-amp" and not bits[0] <= a.act_bits <= bits[-1]:
        ap.error(f"--bit-set {','.join(map(str, bits))} must include values at or below and at or above "
                 f"--act-bits {a.act_bits:g}")
    if a.allocation == "uniform" and a.act_bits != int(a.act_bits):
        ap.error(f"--act-bits {a.act_bits:g} with --allocation uniform: must be a whole number (every block "
                 f"gets the same bits)")


def recipe_from_args(a: argparse.Namespace) -> Recipe:
    """The pipeline's Recipe for the parsed options (imports the pipeline, hence torch)."""
    from .pipeline import Recipe

    return Recipe(group_size=a.group_size, act_bits=a.act_bits, bit_set=a.bit_set,
                  weight_method=a.weight_method, rotation=a.rotation, kotms_iters=a.kotms_iters,
                  allocation=a.allocation, clip_search=not a.no_clip_search,
                  row_parallel_blocks=a.row_parallel_blocks, calib=a.calib, nsamples=a.nsamples,
                  seqlen=a.seqlen, amp_tokens=a.amp_tokens, seed=a.seed)
