"""The recipe: everything that determines a checkpoint, recorded in it and checked when a run resumes.

Torch-free on purpose: the CLI reads the defaults for `--help` and checks options before any heavy import.
A recipe starts from a method preset (TWLA, BWLA, TwinQuant are modes of one pipeline: a weight code, a
transform, an optional low-rank branch, activation bits); any field can then be overridden (flags, --recipe).

Data sizes left at None are resolved by device when the run starts (`resolved`): the GPU defaults are the
reference's (262k calibration tokens, clip search on 8k) but ILA-AMP on 2k held-out tokens (not 32k: see
DEVICE_DEFAULTS); the CPU defaults are 16k calibration and 512 clip-search tokens, 3 scale-tuning epochs (GPU: 4)
and uniform activation bits (GPU: ILA-AMP), sized for the SmolLM2 demo on 2 cores. Calibration always has more
tokens than the model's largest K (a Hessian of lower rank than K lets GPTQ overfit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METHODS = ("twla", "bwla", "twinquant")
CODES = ("ternary", "binary", "int4")
ROTATIONS = ("kotms", "okt", "learned", "random", "none")
LOWRANKS = ("none", "svd", "psp", "learned")
WEIGHT_METHODS = ("e2m-atq", "atq", "rtn")
ALLOCATIONS = ("ila-amp", "uniform")
CLIP_OBJECTIVES = ("block", "layer")
WEIGHT_TARGETS = ("a16", "act")

# fields read only after the weight stage (bit allocation, clip search, scale tuning): an interrupted or finished
# weight stage in OUT.work/ is reused when only these change, so re-allocating bits does not re-quantize the weights
AFTER_WEIGHTS = frozenset({"allocation", "bit_set", "amp_beta", "amp_tokens", "amp_seqlen", "clip_search",
                           "clip_objective", "clip_tokens", "clip_min", "clip_step", "tune_epochs", "tune_lr"})

# what a recipe saved before a key existed behaved as, where that is not the key's current default
BEHAVED_BEFORE: dict[str, Any] = {"stage1_iters": 15, "group_size_for": ""}

# stage-1 alternations per group inside GPTQ by weight code, where the recipe leaves it None. The authors' code does
# 15; ternary does 5: on SmolLM2 its output error is 0.997x that of 15 and the weight stage 16% faster on the CPU,
# 2x faster with the GPTQ changes on the H100. Binary: 0.996x for 36% less GPTQ time on 21 SmolLM2 linears, but
# the full bwla run at 5 gave 50.8x dense PPL vs 29.1x at 15 for 8% less weight-stage time (RESULTS.md, session
# 20); int4: 1.017x (worse) for 20% less (session 17)
STAGE1_ITERS = {"ternary": 5, "binary": 15, "int4": 15}

# the vLLM modules a group size may be set for (`Recipe.group_size_for`); fused shards share one
GROUP_SIZE_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def valid_group_size(v: int) -> bool:
    """-1 (one group per row) or a positive multiple of 16 (the format's rule)."""
    return v == -1 or (v > 0 and v % 16 == 0)


def parse_group_sizes(text: str) -> dict[str, int]:
    """'gate_up_proj=64,down_proj=64' -> {module: group size}; '' -> {}. Raises ValueError naming the part."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        module, sep, size = part.partition("=")
        if not sep or module.strip() not in GROUP_SIZE_MODULES:
            raise ValueError(f"{part!r}: expected MODULE=SIZE with MODULE one of {', '.join(GROUP_SIZE_MODULES)}")
        try:
            gs = int(size)
        except ValueError:
            gs = 0
        if not valid_group_size(gs):
            raise ValueError(f"{part!r}: the size must be -1 (per row) or a positive multiple of 16")
        out[module.strip()] = gs
    return out


# field -> (cpu, cuda) default where the recipe leaves it None. The CPU column is sized for the SmolLM2 demo on 2
# cores (<= 10 min): on SmolLM2, uniform A4 + clip search on 512 tokens + 3 tuning epochs gave 5.98x dense in 572 s
# of stages against 5.97x in 959 s for ILA-AMP (which chose uniform A4 anyway: 246 s) + 1024 tokens + 4 epochs;
# 2 epochs cost 20% (7.14x) (benchmarks/RESULTS.md, session 18)
DEVICE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "nsamples": (32, 128),
    "seqlen": (512, 2048),
    # not the reference's 32k held-out tokens: ILA-AMP on Qwen2.5-1.5B took 50 s at 2k on an H200, its rate at 8k
    # was 5x slower (32k: ~17 min or more), and uniform A4 was within 0.5% of ILA-AMP on Qwen anyway
    "amp_tokens": (512, 2048),
    "amp_seqlen": (512, 512),
    "clip_tokens": (512, 8192),
    "tune_epochs": (3, 4),
    "allocation": ("uniform", "ila-amp"),  # a fractional --act-bits budget needs ILA-AMP on either (`resolved`)
}


@dataclass
class Recipe:
    method: str = "twla"  # the preset this recipe started from: twla | bwla | twinquant
    code: str = "ternary"  # weight code: ternary | binary | int4 (twla_vllm.format.CODES)
    group_size: int = 32  # largest multiple of 16 (32 for binary) <= this dividing every K; -1 = per row
    # other group sizes for some vLLM modules, "MODULE=SIZE,..." (GROUP_SIZE_MODULES); each the largest multiple
    # of 16 <= SIZE dividing that module's K. gate/up at 64 keep TWLA under 2.5 bits/weight: Qwen2.5-Coder-1.5B
    # 1.89x -> 1.95x dense at 2.53 -> 2.39 bits, SmolLM2 5.42x -> 5.97x at 2.61 -> 2.48 (RESULTS.md, session 18)
    group_size_for: str = "gate_up_proj=64"
    weight_method: str = "e2m-atq"  # rtn | atq (stage 1) | e2m-atq (GPTQ + stage 1 + stage 2 + integer grid)
    stage1_iters: int | None = None  # stage-1 alternations per group inside GPTQ (None: by code, STAGE1_ITERS)
    rotation: str = "kotms"  # kotms (TWLA) | okt (BWLA) | learned (TwinQuant) | random | none
    # "site": one transform shared by the linears reading one input (q/k/v and gate/up quantize x once);
    # "linear": each linear its own (the papers' placement; the fused vLLM module quantizes x once per member)
    rotation_sharing: str = "site"
    factor_rule: str = "balanced"  # balanced (n1 ~ n2) | reference (TWLA code: r = largest divisor <= sqrt(NK/64))
    o_proj_rotation: str = "head"  # head (head-local factor folded into v_proj) | full (online, across heads)
    lowrank: str = "none"  # none | svd | psp (BWLA) | learned (TwinQuant): the 16-bit branch A @ B
    lowrank_rank: int = 0
    fold_norms: bool = False  # RMSNorm γ into q/k/v and gate/up (exact in fp; changes what is quantized)
    kotms_iters: int = 100
    kotms_lr: float = 1e-2
    okt_iters: int = 100  # EM iterations of each OKT transform (rotation "okt"; each updates R1 then R2)
    psp_iters: int = 3  # proximal SVD steps of the PSP branch (lowrank "psp"): psp_iters + 1 GPTQ runs per linear
    twinquant_iters: int = 100  # Adam steps of each learned (TwinQuant) transform (rotation "learned")
    twinquant_lr: float = 1e-2
    twinquant_rounds: int = 3  # quantize / refit alternations of the learned low-rank branch
    row_parallel_blocks: int = 8  # max shard-local K-blocks of o_proj/down_proj inputs (max TP size); 1 = TP 1
    # activation ranges of about this many channels per token (0: one range per k-block, i.e. per token for
    # q/k/v and gate/up); finer ranges cost an fp32 promotion per range in the GEMM (format key act_blocks)
    act_group_size: int = 0
    act_bits: float = 4.0  # average activation bits per block
    bit_set: tuple[int, ...] = (2, 4, 6, 8)
    allocation: str | None = None  # ila-amp | uniform (None: by device)
    amp_beta: float = 0.5
    amp_tokens: int | None = None  # held-out tokens for ILA-AMP (None: by device)
    amp_seqlen: int | None = None  # window length of the held-out text for ILA-AMP and the clip search
    clip_search: bool = True
    clip_objective: str = "block"  # block | layer: whose output MSE a clip minimises (offline/clip.py)
    default_clip: float = 1.0
    clip_tokens: int | None = None  # held-out tokens for the clip search (None: by device)
    clip_min: float = 0.5  # clip ratios searched: clip_min .. 1.0 in steps of clip_step
    clip_step: float = 0.02
    # block-wise scale tuning after the clip search (offline/tune.py): passes over the calibration windows per
    # block; 0 = off (None: by device)
    tune_epochs: int | None = None
    # SmolLM2 default run, PPL / dense at 2e-3 / 5e-3 / 1e-2 / 2e-2: 6.83x / 5.81x / 5.42x / 6.07x (same time;
    # benchmarks/RESULTS.md, session 17); bwla tunes at 2e-2 (its preset), twinquant keeps 2e-3 and 4 epochs
    tune_lr: float = 1e-2
    calib: str = "brown"
    text_column: str = "text"  # the column holding the text when calib is a .jsonl / .json / .csv file
    nsamples: int | None = None  # calibration windows (None: by device)
    seqlen: int | None = None
    seed: int = 0
    percdamp: float = 0.1
    # a16: GPTQ fits each linear's output on its 16-bit inputs; act: on its inputs quantized at act_bits (clip 1),
    # target W XᵀX̃ (X̃ᵀX̃)⁻¹ with Hessian X̃ᵀX̃ (offline/weights.py act_aware_target), where calibration has at least
    # 8 tokens per input channel (pipeline.ACT_TARGET_TOKENS_PER_INPUT; other sites keep a16)
    weight_target: str = "a16"
    batch_size: int = 4

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bit_set"] = list(self.bit_set)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "recipe") -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown recipe key(s) {unknown} (allowed: {sorted(names)})")
        d = dict(d)
        if "bit_set" in d:
            d["bit_set"] = tuple(int(b) for b in d["bit_set"])
        return cls(**d)

    def resolved(self, device: str, max_k: int) -> "Recipe":
        """None data sizes, tuning epochs and allocation filled in for `device`, stage-1 alternations for the code;
        calibration bumped to more tokens than max_k."""
        col = 1 if str(device).startswith("cuda") else 0
        r = dataclasses.replace(self, **{k: v[col] for k, v in DEVICE_DEFAULTS.items() if getattr(self, k) is None})
        if self.allocation is None and r.act_bits != int(r.act_bits):
            r = dataclasses.replace(r, allocation="ila-amp")  # only ILA-AMP reaches a fractional average
        if r.stage1_iters is None:
            r = dataclasses.replace(r, stage1_iters=STAGE1_ITERS[r.code])
        if r.nsamples * r.seqlen <= max_k:
            r = dataclasses.replace(r, nsamples=max_k // r.seqlen + 1)
        return r

    def clip_grid(self) -> tuple[float, ...]:
        n = int(round((1.0 - self.clip_min) / self.clip_step))
        return tuple(round(1.0 - i * self.clip_step, 4) for i in range(n + 1))


def preset(method: str) -> Recipe:
    """The recipe a method starts from: TWLA (ternary, KOTMS, A4 by ILA-AMP), BWLA (binary, OKT learned by EM,
    PSP low-rank branch of rank 16, A6), TwinQuant (int4 residual + learned transforms + rank-32 branch, A4)."""
    if method == "twla":
        return Recipe()
    if method == "bwla":
        # group 64: on SmolLM2 W1A6 PPL 3 081 vs 2 963 at group 32 (within run-to-run noise) for 0.25 fewer
        # bits/weight; 192 and per row cost 1.4-1.8x (benchmarks/RESULTS.md "BWLA weight groups"). gate/up and
        # down_proj at 256: Qwen2.5-Coder-1.5B 1.51 -> 1.34 bits/weight (rank 16 included), SmolLM2 24.7x -> 29.1x
        # dense at 2.09 -> 1.96 bits (session 18)
        # scale tuning at 2e-2 and no clip search: SmolLM2 W1A6 29.1x dense at 2e-3 with the search, 21.8x at 1e-2
        # with or without it, 18.2x at 2e-2, 21.4x at 4e-2 (session 24); the search is 70 s on 2 cores
        return Recipe(method="bwla", code="binary", group_size=64, group_size_for="gate_up_proj=256,down_proj=256",
                      rotation="okt", lowrank="psp",
                      lowrank_rank=16, act_bits=6.0, bit_set=(4, 6, 8), allocation="uniform", clip_search=False,
                      tune_epochs=4, tune_lr=2e-2)
    if method == "twinquant":
        # scale tuning on (the default 4 epochs): SmolLM2 W4A4 1.22x -> 1.17x dense for 416 s on 2 cores
        return Recipe(method="twinquant", code="int4", group_size=128, group_size_for="", rotation="learned",
                      lowrank="learned", lowrank_rank=32, act_bits=4.0, allocation="uniform", tune_epochs=4,
                      tune_lr=2e-3)
    raise ValueError(f"unknown method {method!r} (allowed: {', '.join(METHODS)})")
