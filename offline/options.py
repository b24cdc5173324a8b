"""The recipe's command-line options: each checked by argparse before any work, with an error naming the
option and what it accepts.

Nothing here imports torch: `twla-quantize --help` and a bad option must answer at once, and importing
torch, transformers and vLLM takes seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable

from . import data
from . import recipe as R
from .errors import UsageError

CALIB_SOURCES = ("brown", "wikitext2", "c4")
BLOCK_BITS = range(2, 9)  # activation bits one block can get (16, unquantized, is never allocated)
MAX_SEED = 2**32 - 1


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
non_negative_int = _int_check(lambda v: v >= 0, "an integer >= 0")
group_size = _int_check(R.valid_group_size, "-1 (per row) or a positive multiple of 16")
power_of_two = _int_check(lambda v: v >= 1 and v & (v - 1) == 0, "a power of two >= 1 (1, 2, 4, 8, ...)")
seed = _int_check(lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def _float_check(ok: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")  # fails every check below
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return v

    return parse


positive_float = _float_check(lambda v: 0 < v < float("inf"), "a positive number")
act_bits = _float_check(lambda v: BLOCK_BITS[0] <= v <= BLOCK_BITS[-1],
                        f"a number in [{BLOCK_BITS[0]}, {BLOCK_BITS[-1]}] (average bits per block)")


def bit_set(text: str) -> tuple[int, ...]:
    allowed = f"comma-separated integers in {BLOCK_BITS[0]}..{BLOCK_BITS[-1]}, e.g. 2,4,6,8"
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not all(b in BLOCK_BITS for b in bits):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return bits


def group_sizes(text: str) -> str:
    """--group-size-for: checked, normalised (sorted by module) so equal settings compare equal on resume."""
    try:
        sizes = R.parse_group_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(f"{m}={sizes[m]}" for m in R.GROUP_SIZE_MODULES if m in sizes)


def calib_source(text: str) -> str:
    files = "a text, .jsonl, .json or .csv file"
    if text in CALIB_SOURCES or os.path.isfile(text):
        return text
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"not a file: {text} (use {', '.join(CALIB_SOURCES)} or {files})")
    raise argparse.ArgumentTypeError(f"file not found: {text} (use {', '.join(CALIB_SOURCES)} or {files})")


def recipe_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file not found: {text} (a YAML recipe, e.g. a checkpoint's recipe.yaml)")
    return text


def add_recipe_args(ap: argparse.ArgumentParser) -> None:
    """Recipe options. Each defaults to the --method preset's value (shown for TWLA); data sizes left unset
    follow the device (recipe.DEVICE_DEFAULTS: cpu / cuda)."""
    d = R.preset("twla").to_dict()
    dev = {k: f"{c} on cpu, {g} on cuda" for k, (c, g) in R.DEVICE_DEFAULTS.items()}
    g = ap.add_argument_group("recipe (recorded in the checkpoint as recipe.yaml; a resumed run must use the same). "
                              "Defaults: the --method preset (values shown are TWLA's), then --recipe, then flags")
    g.add_argument("--recipe", type=recipe_file, metavar="FILE",
                   help="YAML file of recipe fields (e.g. a checkpoint's recipe.yaml): overrides the --method "
                        "preset; flags override the file")
    g.add_argument("--method", choices=R.METHODS,
                   help="preset: twla (ternary, KOTMS, A4 by ILA-AMP), bwla (binary, OKT, rank-16 PSP branch, A6), "
                        "twinquant (int4 residual, learned transforms, rank-32 branch, A4) (default: the --recipe "
                        "file's method, else twla)")
    g.add_argument("--code", choices=R.CODES, help=f"weight code (default: {d['code']})")
    g.add_argument("--group-size", type=group_size,
                   help=f"weight group along K: the largest multiple of 16 (32 for binary) <= this that divides "
                        f"every K; -1 = one group per row; modules named in --group-size-for keep theirs (default: "
                        f"{d['group_size']})")
    g.add_argument("--group-size-for", type=group_sizes, metavar="MODULE=SIZE[,...]",
                   help=f"other group sizes for some of {', '.join(R.GROUP_SIZE_MODULES)} (vLLM's module names; "
                        f"fused shards share one), each the largest multiple of 16 <= SIZE dividing its K; '' = "
                        f"none, one group size everywhere (default: '{d['group_size_for']}': gate/up at 64 keep "
                        f"TWLA under 2.5 bits/weight)")
    g.add_argument("--act-bits", type=act_bits, help=f"average activation bits per decoder block, in [2, 8] "
                                                      f"(default: {d['act_bits']:g})")
    g.add_argument("--bit-set", type=bit_set, help=f"activation bits a block may get: comma-separated integers in "
                                                    f"2..8; must reach --act-bits from below and above (default: "
                                                    f"{','.join(map(str, d['bit_set']))})")
    g.add_argument("--weight-method", choices=R.WEIGHT_METHODS,
                   help="weight fit: e2m-atq (GPTQ + weight-space and output-aware refits + integer grid), atq "
                        f"(weight-space refit only), rtn (round to nearest) (default: {d['weight_method']})")
    g.add_argument("--weight-target", choices=R.WEIGHT_TARGETS,
                   help="what GPTQ fits each linear's output on: a16 (its 16-bit inputs) or act (its inputs "
                        "quantized at --act-bits, activation rounding included; e2m-atq only; sites with < 8 "
                        f"calibration tokens per input channel keep a16) (default: {d['weight_target']})")
    g.add_argument("--rotation", choices=R.ROTATIONS,
                   help="online Kronecker transform of each input: kotms (TWLA), okt (BWLA), learned "
                        f"(TwinQuant), random orthogonal, or none (default: {d['rotation']})")
    g.add_argument("--rotation-sharing", choices=("site", "linear"),
                   help="site: one transform per input shared by q/k/v and gate/up (fused, quantized once); "
                        "linear: each linear its own, as the papers (vLLM's fused module quantizes its input once "
                        f"per member) (default: {d['rotation_sharing']})")
    g.add_argument("--factor-rule", choices=("balanced", "reference"),
                   help="Kronecker factor sizes: balanced (n1 ~ n2, cheapest online) or reference (the TWLA "
                        f"code's rule, e.g. 576 -> 8x72) (default: {d['factor_rule']})")
    g.add_argument("--o-proj-rotation", choices=("head", "full"),
                   help="o_proj input: head (a head-local factor folded into v_proj, free) or full (an online "
                        f"transform across heads) (default: {d['o_proj_rotation']})")
    g.add_argument("--lowrank", choices=R.LOWRANKS,
                   help="16-bit low-rank branch: none, svd (truncated SVD, residual quantized), psp (BWLA), "
                        f"learned (TwinQuant) (default: {d['lowrank']})")
    g.add_argument("--lowrank-rank", type=non_negative_int,
                   help=f"rank of the low-rank branch (default: {d['lowrank_rank']})")
    g.add_argument("--kotms-iters", type=positive_int, help=f"Adam steps that learn each KOTMS rotation "
                                                             f"(default: {d['kotms_iters']})")
    g.add_argument("--allocation", choices=R.ALLOCATIONS,
                   help="how --act-bits is spread over blocks: ila-amp (by measured sensitivity) or uniform; a "
                        f"fractional --act-bits always uses ila-amp (default: {dev['allocation']})")
    g.add_argument("--clip-search", action=argparse.BooleanOptionalAction,
                   help="the per-linear activation clip search on held-out text; --no-clip-search: clip = 1.0 "
                        "(default: on, off for --method bwla, where scale tuning made it worth nothing)")
    g.add_argument("--clip-objective", choices=R.CLIP_OBJECTIVES,
                   help="what a clip minimises: block (the decoder block's output error) or layer (the linear's "
                        f"own output error; faster) (default: {d['clip_objective']})")
    g.add_argument("--row-parallel-blocks", type=power_of_two,
                   help="max tensor-parallel size the checkpoint supports (shard-local blocks of o/down inputs; "
                        "1 = a full left factor, TP 1 only, and slower to serve on CUDA: one program per token "
                        "transforms the whole input, 26 vs 5 us per down_proj at batch 1 on an H100): a power of two "
                        f"(default: {d['row_parallel_blocks']})")
    g.add_argument("--act-group-size", type=non_negative_int, metavar="CHANNELS",
                   help="activation ranges of about this many channels per token instead of one per token (and "
                        "row-parallel block): more accurate at 4 bits, an fp32 promotion per range in the GEMM; "
                        f"0 = off (default: {d['act_group_size']})")
    g.add_argument("--tune-epochs", type=non_negative_int,
                   help="block-wise scale tuning after the clip search: passes over the calibration windows per "
                        "decoder block, fitting each block's group scales to the dense block's output (0 = off) "
                        f"(default: {dev['tune_epochs']})")
    g.add_argument("--tune-lr", type=positive_float,
                   help=f"Adam learning rate of the scale tuning (cosine schedule) (default: {d['tune_lr']})")
    g.add_argument("--calib", type=calib_source,
                   help="calibration text: brown (embedded), wikitext2, c4 (need the hub), a text file, or records "
                        "in a .jsonl/.json/.csv file (see --text-column); a file's first 80%% calibrates, the next "
                        f"10%% allocates bits and clips, the last 10%% is left for evaluation (default: {d['calib']})")
    g.add_argument("--text-column", metavar="NAME",
                   help=f"column holding the text in a .jsonl/.json/.csv --calib file (default: {d['text_column']})")
    g.add_argument("--nsamples", type=positive_int, help=f"calibration windows of --seqlen tokens (default: "
                                                          f"{dev['nsamples']})")
    g.add_argument("--seqlen", type=positive_int, help=f"tokens per calibration window (default: {dev['seqlen']})")
    g.add_argument("--amp-tokens", type=positive_int,
                   help=f"held-out tokens ILA-AMP measures block sensitivity on (default: {dev['amp_tokens']})")
    g.add_argument("--clip-tokens", type=positive_int,
                   help=f"held-out tokens for the activation clip search (default: {dev['clip_tokens']})")
    g.add_argument("--seed", type=seed, help="seed of every random choice (windows, rotations): same command + "
                                             f"seed = same bytes (default: {d['seed']})")


_FLAG_FIELDS = ("code", "group_size", "group_size_for", "act_bits", "bit_set", "weight_method", "weight_target",
                "rotation", "rotation_sharing", "factor_rule", "o_proj_rotation", "lowrank", "lowrank_rank",
                "kotms_iters", "allocation", "tune_epochs", "tune_lr", "row_parallel_blocks", "act_group_size", "calib",
                "text_column", "nsamples", "seqlen", "amp_tokens", "clip_search", "clip_objective", "clip_tokens",
                "seed")


def recipe_from_args(a: argparse.Namespace, ap: argparse.ArgumentParser | None = None) -> R.Recipe:
    """The recipe of a command line: the --method preset (or the --recipe file's method), the --recipe file's
    fields over it, every given flag over both. A bad file raises UsageError naming the file and key (`ap`: the
    parser whose option checks the file's values go through; default: twla-quantize's)."""
    fields = read_recipe_file(a.recipe, ap) if getattr(a, "recipe", None) else {}
    method = a.method or fields.get("method", "twla")
    given: dict[str, Any] = {f: getattr(a, f) for f in _FLAG_FIELDS if getattr(a, f, None) is not None}
    return dataclasses.replace(R.preset(method), **{**fields, "method": method, **given})


def read_recipe_file(path: str, ap: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Recipe fields of a YAML file, each checked as its flag checks it (or by the field's type where no flag
    sets it); unknown keys are refused."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"--recipe {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--recipe {path}: expected a mapping of recipe fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(R.Recipe)}
    if ap is None:
        from .cli import quantize_parser

        ap = quantize_parser()
    actions = {act.dest: act for act in ap._actions}  # the flags' own checks
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise UsageError(f"--recipe {path}: unknown key '{key}' (a typo? recipe fields: {', '.join(fields)})")
        try:
            out[key] = _check_field(fields[key], actions.get(key), value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UsageError(f"--recipe {path}: key '{key}': {e}") from None
    return out


def _check_field(field: dataclasses.Field, action: argparse.Action | None, value: Any) -> Any:
    if action is not None and value is not None and action.type is not None:
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        value = action.type(text)
    if action is not None and action.choices is not None and value is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    kind = str(field.type)  # annotations are strings here (from __future__ import annotations)
    ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "int | None": value is None or (isinstance(value, int) and not isinstance(value, bool)),
          "str | None": value is None or isinstance(value, str),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "tuple[int, ...]": isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)}.get(kind)
    if ok is None:
        raise ValueError(f"field type {kind} cannot be read from a file")
    if not ok:
        raise ValueError(f"must be {kind}, got {value!r}")
    return tuple(value) if kind.startswith("tuple") else value


def check_recipe(ap: argparse.ArgumentParser, r: R.Recipe) -> None:
    """Checks that involve several options (argparse checks each alone)."""
    bits = r.bit_set
    if r.allocation != "uniform" and not bits[0] <= r.act_bits <= bits[-1]:  # None: ILA-AMP on CUDA
        ap.error(f"--bit-set {','.join(map(str, bits))} must include values at or below and at or above "
                 f"--act-bits {r.act_bits:g}")
    if r.allocation == "uniform" and r.act_bits != int(r.act_bits):
        ap.error(f"--act-bits {r.act_bits:g} with --allocation uniform: must be a whole number (every block "
                 f"gets the same bits)")
    if r.code == "binary" and r.group_size != -1 and r.group_size % 32:
        ap.error(f"--group-size {r.group_size} with --code binary: must be -1 or a multiple of 32 (one packed word)")
    odd = [f"{m}={g}" for m, g in R.parse_group_sizes(r.group_size_for).items() if g != -1 and g % 32]
    if r.code == "binary" and odd:
        ap.error(f"--group-size-for {','.join(odd)} with --code binary: must be -1 or a multiple of 32 (one packed "
                 f"word)")
    if (r.lowrank == "none") != (r.lowrank_rank == 0):
        ap.error(f"--lowrank {r.lowrank} with --lowrank-rank {r.lowrank_rank}: a branch needs a rank > 0, and a "
                 f"rank needs a --lowrank method")
    if os.path.isfile(r.calib) and r.calib.lower().endswith(data.RECORD_FORMATS):
        try:  # the file and its column are read now, before any model loads
            data.read_records(r.calib, r.text_column)
        except data.DataError as e:
            ap.error(f"--calib {e}")
