"""Device: rough per-block cost of the BWLA weight stage on Qwen2.5-1.5B shapes (random weights and Hessians), to
plan a Qwen BWLA run: OKT EM (100 iterations per site; 10 timed, x10) and one binary GPTQ pass per linear, on CUDA."""
import time

import torch

from twla_offline import okt
from twla_offline.recipe import preset
from twla_vllm import format as fmt
from twla_offline.weights import gptq_quantize

r = preset("bwla")
code = fmt.CODES["binary"]
sites = {"qkv": (2048, 1536, 32, 48), "o": (1536, 1536, 12, 128), "gate_up": (17920, 1536, 32, 48),
         "down": (1536, 8960, 64, 140)}
linears = {"q": (1536, 1536, 64), "k": (256, 1536, 64), "v": (256, 1536, 64), "o": (1536, 1536, 64),
           "gate": (8960, 1536, 256), "up": (8960, 1536, 256), "down": (1536, 8960, 256)}
tot_okt = tot_gptq = 0.0
with torch.device("cuda"):
    for name, (n, k, n1, n2) in sites.items():
        w = torch.randn(n, k) * 0.02
        okt.learn_okt(w, n1, n2, 64, 1, True, r, None, iters=1)
        torch.cuda.synchronize(); t = time.time()
        okt.learn_okt(w, n1, n2, 64, 1, True, r, None, iters=10)
        torch.cuda.synchronize(); dt = (time.time() - t) * 10
        tot_okt += dt
        print(f"okt {name:8s} {dt:6.1f} s per 100 iterations", flush=True)
    for name, (n, k, gs) in linears.items():
        w = torch.randn(n, k) * 0.02
        x = torch.randn(4096, k)
        h = x.t() @ x
        torch.cuda.synchronize(); t = time.time()
        gptq_quantize(w, h, code, gs)
        torch.cuda.synchronize(); dt = time.time() - t
        tot_gptq += dt
        print(f"gptq {name:6s} {dt:6.2f} s", flush=True)
print(f"per block: OKT {tot_okt:.0f} s, one binary GPTQ pass {tot_gptq:.1f} s; x28 blocks: OKT {28 * tot_okt:.0f} s, "
      f"GPTQ {28 * tot_gptq:.0f} s, PSP (4 passes) {4 * 28 * tot_gptq:.0f} s")
