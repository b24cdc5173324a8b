"""How long twla-quantize takes on a device, and whether its device paths agree.

Timing runs the real pipeline (default recipe for the device) on random weights of a real model's shape
(config only, no download; a character tokenizer over the Brown calibration text, the real vocabulary size so
the head costs what it costs) with fewer decoder blocks, and projects the full depth from the measured per-block
cost: calibration is one embedding pass, transforms and weights scale with the depth L, ILA-AMP with its count of block forwards and
head evaluations (a chain DP over singles and adjacent pairs), the clip search with L.

    python benchmarks/quantize_time.py --check                       # tiny models: cpu vs device, whole vs offload
    python benchmarks/quantize_time.py --shape qwen2.5-1.5b --layers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # real models' configs (public config.json values)
    "qwen2.5-1.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, use_sliding_window=False),
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, tie_word_embeddings=False),
}


def make_model_dir(shape: dict, layers: int, out: str, seed: int = 0) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.synthetic import char_tokenizer

    cfg = dict(shape, num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is slow on CPU for 8B shapes
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def ila_amp_work(n: int, low: int) -> tuple[int, int]:
    """(block forwards, head evaluations) of ILA-AMP's measurement on n blocks with `low` bit widths below 8."""
    blocks = n + sum(1 + (n - l - 1) for l in range(n)) * low  # reference chain + single configurations
    blocks += sum(1 + low * (n - l) for l in range(1, n)) * low  # pair inputs + pair configurations
    return blocks, 1 + n * low + (n - 1) * low * low


def time_shape(name: str, layers: int, device: str, offload: str) -> dict:
    from twla_offline.cli import quantize
    from twla_offline.recipe import Recipe

    shape = SHAPES[name]
    work = tempfile.mkdtemp(prefix="twla-qtime-")
    src = make_model_dir(shape, layers, os.path.join(work, "dense"))
    t0 = time.time()
    s = quantize(src, os.path.join(work, "q"), Recipe(), device, evaluate_after=False, offload=offload)
    wall = time.time() - t0
    st = s["stage_seconds"]
    full = shape["num_hidden_layers"]
    low = len([b for b in Recipe().bit_set if b != 8])
    b_meas, h_meas = ila_amp_work(layers, low)
    b_full, h_full = ila_amp_work(full, low)
    # ILA-AMP time = a·blocks + c·heads; with one measurement, split by FLOPs of a block vs the head
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    block_flops, head_flops = h * (2 * h + 2 * kv) + 3 * h * i, h * v
    per_unit = st.get("allocate", 0.0) / (b_meas * block_flops + h_meas * head_flops)
    projected = {k: st.get(k, 0.0) * full / layers for k in ("rotate", "weights", "clip", "tune")}
    projected["calibrate"] = st.get("calibrate", 0.0)  # the embedding pass, once
    projected["allocate"] = per_unit * (b_full * block_flops + h_full * head_flops)
    return {"shape": name, "layers_run": layers, "layers_full": full, "device": device, "offload": s["offload"],
            "stage_seconds": st, "wall_s": round(wall, 1), "projected_stage_seconds":
            {k: round(v, 1) for k, v in projected.items()}, "projected_total_s": round(sum(projected.values()), 1),
            "bits_per_weight": s["bits_per_weight"],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}


class Rows(list):
    """Table rows, printed as they come (a run cut short still shows what it measured)."""

    def append(self, row: dict) -> None:
        super().append(row)
        print(json.dumps(row), flush=True)


def check(device: str, rows: Rows) -> None:
    """Tiny random models through every method: on the CPU, on `device` whole and offloaded; checkpoints compared."""
    from safetensors.torch import load_file

    from twla_offline.cli import quantize
    from twla_offline.recipe import preset

    work = tempfile.mkdtemp(prefix="twla-qcheck-")
    src = make_model_dir(dict(SHAPES["qwen2.5-1.5b"], hidden_size=128, intermediate_size=256, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=98, head_dim=64), 2, os.path.join(work, "dense"))
    for method in ("twla", "bwla", "twinquant"):
        r = preset(method)
        r.nsamples, r.seqlen, r.amp_tokens, r.amp_seqlen, r.clip_tokens, r.batch_size = 4, 64, 128, 64, 256, 2
        r.kotms_iters = r.okt_iters = r.twinquant_iters = 10
        got = {}
        for i, (dev, off) in enumerate((("cpu", "off"), (device, "off"), (device, "on"))):
            t0 = time.time()
            try:  # directories keyed by index: with --device cpu the first two runs share (device, offload)
                s = quantize(src, os.path.join(work, f"{method}-{i}-{dev}-{off}"), r, dev, evaluate_after=False,
                             offload=off)
                got[(dev, off)] = load_file(os.path.join(s["checkpoint"], "model.safetensors"))
                rows.append({"method": method, "device": dev, "offload": off, "ok": True,
                             "seconds": round(time.time() - t0, 1)})
            except Exception as e:  # noqa: BLE001 -- the table reports it
                rows.append({"method": method, "device": dev, "offload": off, "ok": False, "error": repr(e)[:300]})
        if method == "twla" and (device, "off") in got:  # evaluation on the device, against the CPU's
            from twla_offline.cli import evaluate_checkpoint

            for dev in ("cpu", device):
                try:
                    e = evaluate_checkpoint(os.path.join(work, f"{method}-1-{device}-off"), src, max_windows=2, device=dev)
                    rows.append({"eval_on": dev, "ppl_dense": round(e["baseline"]["ppl"], 4),
                                 "ppl_twla": round(e["twla"]["ppl"], 4), "last_word": e["twla"]["last_word_acc"]})
                except Exception as ex:  # noqa: BLE001
                    rows.append({"eval_on": dev, "ok": False, "error": repr(ex)[:300]})
        for (a, b) in (((device, "off"), (device, "on")), (("cpu", "off"), (device, "off"))):
            if a in got and b in got:
                ta, tb = got[a], got[b]
                diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
                codes = [k for k in diff if k.endswith("weight_packed")]
                rows.append({"method": method, "compare": f"{a} vs {b}", "tensors_differ": len(diff),
                             "of": len(ta), "packed_codes_differ": len(codes)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check", action="store_true", help="tiny models: cpu vs device, whole vs offload")
    ap.add_argument("--shape", action="append", default=[], choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks actually run per shape")
    ap.add_argument("--offload", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    rows = Rows()
    if a.check:
        check(a.device, rows)
    for name in a.shape:
        try:
            rows.append(time_shape(name, a.layers, a.device, a.offload))
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": name, "error": repr(e)[:500]})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
