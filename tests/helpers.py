"""Shared test helpers: the simulated-quant oracle, running vLLM in a subprocess, a tiny random model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello world", "The quick brown fox", "abc", "TWLA serves ternary weights!"]
MAX_TOKENS = 16


def sim_greedy(model_dir: str, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy continuation with the simulated-quant transformers model (no EOS stop)."""
    from twla_vllm.simulate import load_simulated_model

    model = load_simulated_model(model_dir)
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            gen = []
            for _ in range(max_tokens):
                nxt = int(model(x).logits[0, -1].argmax())
                gen.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
            outs.append(gen)
    return outs


def vllm_env(tp: int = 1) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_DISABLE_COMPILE_CACHE="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    return env


def check_exit(proc: subprocess.CompletedProcess, what: str) -> None:
    """Raise if `proc` failed, with what is needed to tell why: the exit status (a signal by name: a process
    killed from outside, e.g. by the OOM killer, prints no traceback), every error line (vLLM's workers log
    their exception to stdout) and the output's tail."""
    if proc.returncode == 0:
        return
    rc = proc.returncode
    status = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    text = proc.stdout + proc.stderr
    errors = "\n".join(ln for ln in text.splitlines() if "rror" in ln or "Traceback" in ln or "Killed" in ln)
    raise RuntimeError(f"{what} failed ({status}):\n{errors[-4000:]}\n--- output tail ---\n{text[-3000:]}")


def run_vllm(timeout: int = 600, **args) -> dict:
    """Run tests/vllm_runner.py with `args`; raise with vLLM's stderr tail on failure."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        proc = subprocess.run([sys.executable, "-m", "tests.vllm_runner", json.dumps(args), out], cwd=REPO,
                              env=vllm_env(args.get("tp", 1)), capture_output=True, text=True, timeout=timeout)
        check_exit(proc, "vLLM run")
        with open(out) as f:
            return json.load(f)


def tiny_llama(rng: torch.Generator):
    """A tiny random Qwen2-style causal LM (float32, eval mode) with non-trivial norms and biases; (model, config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.synthetic import tiny_config

    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=rng)))
    cfg = tiny_config("qwen2", 98)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model, cfg
