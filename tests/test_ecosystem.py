"""The checkpoint in the tools users already run: lm-eval through vLLM (offline tasks on the Brown test split)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from .helpers import REPO, vllm_env

SEQLEN, WINDOWS, PROXY_N = 128, 8, 8
# twla-eval's proxy tasks keep the last 512 tokens of an item, lm-eval the last max_model_len: with the synthetic
# model's character tokenizer items reach ~600 tokens, so the model gets 512 positions (RoPE stores no weights)
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def long_synthetic(tmp_path_factory) -> str:
    from twla_offline.synthetic import make_synthetic_checkpoint

    path = make_synthetic_checkpoint(str(tmp_path_factory.mktemp("lm_eval_ckpt") / "llama"), arch="llama", seed=5)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = MAX_MODEL_LEN
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def lm_eval_results(long_synthetic, tmp_path_factory):
    """All four twla_brown tasks through `twla-lm-eval --model vllm` on the synthetic Llama, offline."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'eval' (installed by ./install.sh)")
    from twla_offline.lm_eval_tasks import TASKS_DIR

    model = long_synthetic
    out = tmp_path_factory.mktemp("lm_eval")
    env = dict(vllm_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "twla_offline.lm_eval_entry", "--model", "vllm", "--model_args",
           f"pretrained={model},gpu_memory_utilization=0.3,max_model_len={MAX_MODEL_LEN},dtype=float32",
           "--tasks", "twla_brown", "--include_path", TASKS_DIR, "--output_path", str(out),
           "--metadata", json.dumps({"ppl_seqlen": SEQLEN, "ppl_windows": WINDOWS, "proxy_n": PROXY_N})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (path,) = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(path) as f:
        return model, json.load(f)["results"]


@pytest.mark.vllm
def test_lm_eval_perplexity_equals_twla_eval(lm_eval_results):
    """twla_brown_ppl_windows scores twla-eval's windows by twla-eval's rule: the served model's perplexity
    equals the simulated model's (offline/evaluate.py::perplexity) within 1%. twla_brown_ppl (lm-eval's rolling
    rule: every token of a window scored, the first from BOS) equals the simulated model under that rule."""
    from transformers import AutoTokenizer

    from twla_offline import data
    from twla_offline.evaluate import last_word_accuracy, next_sentence_accuracy, perplexity
    from twla_vllm.simulate import load_simulated_model

    model, results = lm_eval_results
    tok = AutoTokenizer.from_pretrained(model)
    sim = load_simulated_model(model)
    text = data.load_text("brown", "test")
    windows = data.eval_windows(tok, text, SEQLEN, WINDOWS)

    twla_eval_ppl = perplexity(sim, windows)
    served = results["twla_brown_ppl_windows"]["token_perplexity,none"]
    assert served == pytest.approx(twla_eval_ppl, rel=0.01)

    with torch.no_grad():  # lm-eval's rolling rule: input [BOS, w0 .. w_{S-2}] predicts w0 .. w_{S-1}
        bos = torch.full((windows.shape[0], 1), tok.bos_token_id)
        logits = sim(torch.cat([bos, windows[:, :-1]], 1)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows.reshape(-1),
                                                reduction="sum")
    rolling = results["twla_brown_ppl"]["token_perplexity,none"]
    assert rolling == pytest.approx(math.exp(float(nll) / windows.numel()), rel=0.01)

    assert results["twla_brown_last_word"]["acc,none"] == last_word_accuracy(sim, tok, text, n=PROXY_N)
    assert results["twla_brown_next_sentence"]["acc,none"] == next_sentence_accuracy(sim, tok, text, n=PROXY_N)


# ---------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------
def test_transformers_loads_the_simulated_model_after_import(synthetic_dirs):
    """`import twla_vllm.hf` + AutoModelForCausalLM.from_pretrained(DIR) = load_simulated_model(DIR), exactly."""
    import twla_vllm.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from twla_vllm.simulate import SimTwlaLinear, load_simulated_model

    model_dir = synthetic_dirs["qwen2"]  # q/k/v biases and per-layer settings
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sim = load_simulated_model(model_dir)
    layers = {n for n, m in model.named_modules() if isinstance(m, SimTwlaLinear)}
    assert layers == {n for n, m in sim.named_modules() if isinstance(m, SimTwlaLinear)} and len(layers) == 14
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, sim(ids).logits)
    assert model.config.quantization_config.to_dict()["quant_method"] == "twla"


def test_transformers_rejects_a_bad_quantization_config(synthetic_dirs, tmp_path):
    import shutil

    import twla_vllm.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from twla_vllm.format import FormatError

    bad = tmp_path / "bad"
    shutil.copytree(synthetic_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight"]["grop_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="grop_size"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_transformers_without_the_import_gives_a_random_model(synthetic_dirs):
    """The documented hazard (README, model card): transformers alone warns and random-initialises every quantized
    linear. If a transformers release starts refusing instead, this test says so and the docs must change."""
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(type(m.model.layers[0].self_attn.q_proj).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, synthetic_dirs["llama"]], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Unknown quantization type, got twla" in proc.stderr
    assert proc.stdout.split()[-1] == "Linear"  # a plain, randomly initialised nn.Linear
