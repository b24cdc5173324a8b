"""Serving benchmark on GPU vLLM: bf16 vs fp8 vs the quantized modes on a Llama-3-8B-shaped model with dummy
weights (load_format="dummy"), CUDA graphs and torch.compile on.

    python benchmarks/serve.py [--methods bf16,fp8,twla,bwla,twinquant,twla+kvfp8] [--workdir /tmp/serve-bench] [--profile]
                               [--json benchmarks/results/serve.json]

twla = ternary W1.58A4 (group 32, 64x64 transforms, 112x128 for down_proj in 8 K-blocks), bwla = binary W1A6 +
rank-16 low-rank branch, twinquant = int4 W4A4 (group 128) + rank-32 branch; all with format v2 integer scales.
A "+kv<dtype>" suffix (twla+kvfp8) runs the method with vLLM's --kv-cache-dtype <dtype>; "+ag<G>" (twla+ag128) with
activation ranges of G channels per token (format key act_blocks, `twla-quantize --act-group-size`); "+tp1"
(twla+tp1) with one activation K-block for o_proj and down_proj instead of 8 (`twla-quantize --row-parallel-blocks
1`: no shard-local ranges, servable at TP 1 only); "+nopdl" (twla+nopdl) without programmatic dependent launch
(TWLA_PDL=0; `tiles.use_pdl` turns it on at decode sizes); "+chunks" (twla+chunks) with the kernels' weights in
8-row chunks (TWLA_WEIGHT_LAYOUT, `triton_ops.layout`; default "rows"); "+wide" (twla+wide) with chunks only where
N >= 2K (the fused gate/up); "+lf" (twla+lf) with act_quant's left factor first (TWLA_ACT_LEFT_FIRST, KERNEL_NOTES
v30); "+cw<W>" (twla+chunks+cw8) with W words of a row together in each chunk
(TWLA_CHUNK_WORDS); "+fq" (twla+fq) with act_quant in the GEMV's prologue at batch 1 (TWLA_FUSED_GEMV, KERNEL_NOTES
v31; the JSON rows' `fused_gemv` says whether the engine's kernels saw it).

Prints decode tok/s at batch 1 and 64 (128-token prompts, 256 generated), prefill tok/s (32 prompts ×
2048 tokens, 1 output token) and GPU memory of the weights, with ratios to bf16 from the same run.
Each method runs in its own process (one engine per process). --profile adds, per method, where the GPU
time of one bs=1 and one bs=64 decode step goes (torch profiler, CUDA graphs on, overlapping kernels counted once;
needs the in-process engine core, VLLM_ENABLE_V1_MULTIPROCESSING=0, as the staged GPU vLLM uses).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
             "eos_token_id": 128001, "torch_dtype": "bfloat16"}


MODES = {  # method -> (weight code, group size, activation bits, low-rank rank)
    "twla": ("ternary", 32, 4, 0),
    "bwla": ("binary", 128, 6, 16),
    "twinquant": ("int4", 128, 4, 32),
}


def quant_config(method: str, n_layers: int, act_group: int = 0, row_blocks: int = 8) -> dict:
    """quantization_config of one mode for this shape: balanced transforms (64x64 for 4096; 112x128 for
    down_proj's 14336, k_blocks 8 = shard-local up to TP 8), o_proj's head factor folded (no online transform);
    act_group > 0: activation ranges of that many channels per token (format key act_blocks); row_blocks: the
    K-blocks of o_proj/down_proj (1: what `twla-quantize --row-parallel-blocks 1` writes for TP 1 only)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from twla_vllm import format as fmt

    code, gs, bits, rank = MODES[method]
    ranges = (lambda k: k // act_group) if act_group else (lambda k: 0)  # noqa: E731
    layers = {}
    for i in range(n_layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            layers[f"model.layers.{i}.{m}"] = fmt.LayerSpec(bits, 0.9, (64, 64), lowrank_rank=rank,
                                                            act_blocks=ranges(4096))
        layers[f"model.layers.{i}.self_attn.o_proj"] = fmt.LayerSpec(bits, 0.9, None, k_blocks=row_blocks,
                                                                     lowrank_rank=rank,
                                                                     act_blocks=ranges(4096))
        layers[f"model.layers.{i}.mlp.down_proj"] = fmt.LayerSpec(bits, 0.9, (112, 128), k_blocks=row_blocks,
                                                                  lowrank_rank=rank, act_blocks=ranges(14336))
    return fmt.CheckpointConfig(group_size=gs, default=fmt.LayerSpec(bits, 0.9), layers=layers,
                                weight_code=code).to_dict()


def weight_bytes(model) -> dict:
    """GPU bytes of all parameters, and of the decoder linears per linear weight (bytes/parameter)."""
    import torch

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lin_bytes = lin_params = 0
    for name, mod in model.named_modules():
        if not name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            continue
        own = [p for p in mod.parameters(recurse=False) if p is not None and not name.endswith("bias")]
        lin_bytes += sum(p.numel() * p.element_size() for p in own)
        if hasattr(mod, "twla_packed"):
            lin_params += mod.twla_packed.numel() * mod.quant_method.kernel.spec.code.codes_per_word
        elif hasattr(mod, "weight") and isinstance(mod.weight, torch.Tensor):
            lin_params += mod.weight.numel() * (2 if mod.weight.dtype == torch.uint8 else 1)
    return {"weights_gb": round(total / 1e9, 2), "linear_bytes_per_param": round(lin_bytes / max(lin_params, 1), 3)}


# gemv_quant (act_quant in the GEMV's prologue, "+fq") counts as the matmul: the transform is inside it
KERNEL_GROUPS = (("twla GEMV/GEMM", ("gemv_kernel", "gemv_quant_kernel", "gemm_kernel", "unpack_kernel",
                                     "epilogue_kernel")),
                 ("transform+quantize", ("act_quant",)),
                 ("attention", ("flash", "attn", "attention", "reshape_and_cache", "rotary")),
                 ("dense GEMM (bf16/fp8, lm_head)", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90", "scaled_mm")))


def exclusive_us(kernels: list[tuple[str, float, float]]) -> dict[str, float]:
    """GPU µs by kernel group from (name, start, end) kernel intervals, overlaps counted once: in start order, each
    kernel gets the part of its interval that no earlier-started kernel covers. With programmatic dependent launch
    the matmul starts while act_quant runs and waits for it, so summing durations counted that wait twice (session
    26: 4 906 µs of kernels in a 3 968 µs step); this way the groups add up to the GPU's busy time."""
    groups = dict.fromkeys([g for g, _ in KERNEL_GROUPS] + ["other"], 0.0)
    covered = float("-inf")
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        group = next((g for g, pats in KERNEL_GROUPS if any(p in name.lower() for p in pats)), "other")
        groups[group] += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    return groups


def decode_step_breakdown(llm, sampling_params_cls, new_prompts) -> dict:
    """GPU µs per decode step by kernel group: (profile of 33 tokens − profile of 1 token) / 32 over a batch of
    `new_prompts()`, each profile's kernels attributed by `exclusive_us`. Each profile gets prompts of its own:
    with the same ones vLLM's prefix cache would skip the second prefill, and the difference would subtract a
    prefill from the 32 steps (~1/32 of a 64 x 128-token prefill per step at bs = 64)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def kernel_us(n_tokens):
        sp = sampling_params_cls(temperature=0, max_tokens=n_tokens, ignore_eos=True, detokenize=False)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(new_prompts(), sp)
        return exclusive_us([(ev.name, ev.time_range.start, ev.time_range.end) for ev in prof.events()
                             if ev.device_type == DeviceType.CUDA])

    one, many = kernel_us(1), kernel_us(33)
    return {g: round((many[g] - one[g]) / 32, 1) for g in one}


def resident_layouts(model) -> list[str]:
    """The weight layouts the twla layers actually keep (`triton_ops.layout`), from the tensors themselves."""
    found = set()
    for mod in model.modules():
        p = getattr(mod, "twla_packed", None)
        if p is not None:
            found.add("rows" if p.dim() == 2 else "chunks")
    return sorted(found)


def fused_gemv_on(model) -> bool:
    """Whether the engine's TWLA kernels took TWLA_FUSED_GEMV (read when they were imported)."""
    from twla_vllm.kernels.triton_ops import tiles

    return tiles.FUSED_GEMV_ON


def run_one(method: str, workdir: str, out: str, profile_step: bool = False) -> None:
    # e.g. twla+kvfp8: the mode with an fp8 KV cache; twla+ag128: activation ranges of 128 channels; +tp1: one
    # K-block for o_proj/down_proj (no shard-local activation ranges: a TP-1-only checkpoint); +nopdl; +chunks
    base, *opts = method.split("+")
    kv = next((o[2:] for o in opts if o.startswith("kv")), "")
    act_group = next((int(o[2:]) for o in opts if o.startswith("ag")), 0)
    row_blocks = 1 if "tp1" in opts else 8
    # the plugin's kernels read these at import, which may happen as vLLM is imported: set them first
    if "nopdl" in opts:
        os.environ["TWLA_PDL"] = "0"
    if "lf" in opts:
        os.environ["TWLA_ACT_LEFT_FIRST"] = "1"
    if "fq" in opts:
        os.environ["TWLA_FUSED_GEMV"] = "1"
    layout = next((o for o in opts if o in ("chunks", "wide")), "")
    if layout:
        os.environ["TWLA_WEIGHT_LAYOUT"] = layout
    chunk_words = next((o[2:] for o in opts if o.startswith("cw")), "")
    if chunk_words:
        os.environ["TWLA_CHUNK_WORDS"] = chunk_words
    import torch
    from vllm import LLM, SamplingParams

    model_dir = os.path.join(workdir, method)
    os.makedirs(model_dir, exist_ok=True)
    cfg = dict(LLAMA3_8B)
    if base in MODES:
        cfg["quantization_config"] = quant_config(base, cfg["num_hidden_layers"], act_group, row_blocks)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    kw = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              gpu_memory_utilization=0.85, max_num_seqs=64, seed=0)
    if base == "fp8":
        kw["quantization"] = "fp8"
    if kv:
        kw["kv_cache_dtype"] = kv
    llm = LLM(**kw)
    res = {"method": method, **llm.apply_model(weight_bytes)[0]}
    if base in MODES:  # a layout asked for but not kept would time the default under another name
        res["weight_layout"] = ",".join(llm.apply_model(resident_layouts)[0])
        if layout and res["weight_layout"] != {"chunks": "chunks", "wide": "chunks,rows"}[layout]:
            raise RuntimeError(f"{method}: asked for the {layout} weight layout, the layers keep "
                               f"{res['weight_layout']}")
        res["fused_gemv"] = llm.apply_model(fused_gemv_on)[0]
        if res["fused_gemv"] != ("fq" in opts):
            raise RuntimeError(f"{method}: TWLA_FUSED_GEMV {'asked for but' if 'fq' in opts else 'not asked for,'} "
                               f"the kernels have it {'off' if 'fq' in opts else 'on'}")
    rng = torch.Generator().manual_seed(0)

    def prompts(n, length):
        return [{"prompt_token_ids": torch.randint(10, 120000, (length,), generator=rng).tolist()} for _ in range(n)]

    def timed(batch, length, gen):
        p = prompts(batch, length)
        sp = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True, detokenize=False)
        # warm with the timed batch's shapes but other tokens (prefix caching would serve the same prompts from the
        # cache): a prefill of batch x length tokens runs eager, beyond the CUDA-graph sizes, and its first call
        # JIT-compiles Triton variants, seconds that once halved the bs=64 figure
        llm.generate(prompts(batch, length), SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
        t0 = time.perf_counter()
        llm.generate(p, sp)
        return time.perf_counter() - t0

    t = timed(1, 128, 256)
    res["decode_bs1_tok_s"] = 256 / t
    t = timed(64, 128, 256)
    res["decode_bs64_tok_s"] = 64 * 256 / t
    t = timed(32, 2048, 1)
    res["prefill_tok_s"] = 32 * 2048 / t
    if profile_step:  # bs = 64 as well: its step (~14 ms for twla vs ~8 for bf16) was never broken down
        res["decode_step_us"] = decode_step_breakdown(llm, SamplingParams, lambda: prompts(1, 128))
        res["decode_step_bs64_us"] = decode_step_breakdown(llm, SamplingParams, lambda: prompts(64, 128))
    with open(out, "w") as f:
        json.dump(res, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="bf16,fp8,twla")
    ap.add_argument("--workdir", default="/tmp/serve-bench")
    ap.add_argument("--profile", action="store_true",
                    help="GPU time of one bs=1 and one bs=64 decode step by kernel group")
    ap.add_argument("--json", help="write the rows here (benchmarks/results schema)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        run_one(a.one, a.workdir, a.out, a.profile)
        return
    results = []
    for m in a.methods.split(","):
        out = os.path.join(a.workdir, f"{m}.json")
        os.makedirs(a.workdir, exist_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--one", m, "--workdir", a.workdir, "--out", out]
                              + (["--profile"] if a.profile else []))
        if proc.returncode or not os.path.exists(out):
            print(f"{m}: failed (exit {proc.returncode})", flush=True)
            continue
        results.append(json.load(open(out)))
    base = next((r for r in results if r["method"] == "bf16"), None)
    print("\n| method | decode bs=1 tok/s | decode bs=64 tok/s | prefill tok/s | weights GB | linear bytes/param |")
    print("|---|---|---|---|---|---|")
    for r in results:
        def cell(key):
            v = r[key]
            return f"{v:.0f}" + (f" ({v / base[key]:.2f}x)" if base else "")
        print(f"| {r['method']} | {cell('decode_bs1_tok_s')} | {cell('decode_bs64_tok_s')} | {cell('prefill_tok_s')} "
              f"| {r['weights_gb']} | {r['linear_bytes_per_param']} |")
    if a.json:
        import datetime

        import torch

        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                       "command": "python " + " ".join(sys.argv), "rows": results}, f, indent=1)
    if a.profile:
        groups = [g for g, _ in KERNEL_GROUPS] + ["other"]
        for key, batch in (("decode_step_us", 1), ("decode_step_bs64_us", 64)):
            print(f"\nGPU time of one bs={batch} decode step (µs, torch profiler, CUDA graphs on)")
            print("| method | " + " | ".join(groups) + " | total |")
            print("|---|" + "---|" * (len(groups) + 1))
            for r in results:
                st = r.get(key)
                if st:
                    print(f"| {r['method']} | " + " | ".join(f"{st[g]:.0f}" for g in groups)
                          + f" | {sum(st.values()):.0f} |")


if __name__ == "__main__":
    main()
