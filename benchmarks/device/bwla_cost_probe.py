"""Rough per-block cost of the BWLA weight stage on Qwen2.5-1.5B shapes (random weights and Hessians), to plan a Qwen
BWLA run: OKT EM per input site (`--iters` timed, scaled to the preset's 100) and one binary GPTQ pass per linear.

    python benchmarks/device/bwla_cost_probe.py [--device cuda] [--iters 10]
"""
import argparse
import time

import torch

from twla_offline import okt
from twla_offline.recipe import preset
from twla_offline.weights import gptq_quantize
from twla_vllm import format as fmt

# input site -> (stacked rows N, K, Kronecker factors n1 x n2, weight group); linear -> (N, K, group): the bwla
# preset's groups (64; 256 for gate/up and down_proj)
SITES = {"qkv": (2048, 1536, 32, 48, 64), "o": (1536, 1536, 12, 128, 64), "gate_up": (17920, 1536, 32, 48, 256),
         "down": (1536, 8960, 64, 140, 256)}
LINEARS = {"q": (1536, 1536, 64), "k": (256, 1536, 64), "v": (256, 1536, 64), "o": (1536, 1536, 64),
           "gate": (8960, 1536, 256), "up": (8960, 1536, 256), "down": (1536, 8960, 256)}


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=10, help="OKT iterations timed per site (scaled to the preset's)")
    a = ap.parse_args()
    r, code = preset("bwla"), fmt.CODES["binary"]
    okt_s = gptq_s = 0.0
    with torch.device(a.device):
        for name, (n, k, n1, n2, gs) in SITES.items():
            w = torch.randn(n, k) * 0.02
            okt.learn_okt(w, n1, n2, gs, 1, True, r, None, iters=1)  # warm-up
            dt = timed(lambda: okt.learn_okt(w, n1, n2, gs, 1, True, r, None, iters=a.iters), a.device)
            dt *= r.okt_iters / a.iters
            okt_s += dt
            print(f"okt  {name:8s} {dt:7.1f} s for {r.okt_iters} iterations", flush=True)
        for name, (n, k, gs) in LINEARS.items():
            w, x = torch.randn(n, k) * 0.02, torch.randn(4096, k)
            dt = timed(lambda: gptq_quantize(w, x.t() @ x, code, gs), a.device)
            gptq_s += dt
            print(f"gptq {name:8s} {dt:7.2f} s", flush=True)
    blocks = 28
    print(f"per block: OKT {okt_s:.0f} s, one binary GPTQ pass {gptq_s:.1f} s; x{blocks} blocks: OKT "
          f"{blocks * okt_s:.0f} s, GPTQ {blocks * gptq_s:.0f} s, PSP ({r.psp_iters + 1} passes) "
          f"{(r.psp_iters + 1) * blocks * gptq_s:.0f} s")


if __name__ == "__main__":
    main()
