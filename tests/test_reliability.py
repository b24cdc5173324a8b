"""Faults must stay contained: non-finite activations in one request, malformed configs, a killed quantizer."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twla_offline.rotate import block_diagonal_orthogonal, random_orthogonal
from twla_offline.weights import fit_rtn
from twla_vllm import format as fmt
from twla_vllm.reference import block_row_sums, quant_linear

from .conftest import vllm_layer_env
from .helpers import REPO

BAD_VALUES = (float("nan"), float("inf"), -float("inf"), 3e38)


# ---------------------------------------------------------------------------------------------------------
# A non-finite token never changes another token's output
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, rotated, k_blocks, rank", [
    (bits, rot, kb, rank) for bits, rot, kb, rank in itertools.product((4, 8, 16), (False, True), (1, 2), (0, 8))])
def test_nonfinite_token_does_not_leak_into_other_tokens(bits, rotated, k_blocks, rank):
    """reference.quant_linear (the CPU serving path and the simulation): with NaN / +-inf / 3e38 in one token of a
    batch, every other token's output is bit-identical to the same batch with a clean token there. Where the whole
    path is integer (quantized activations, no low-rank branch) it also equals the token's single-row result bit
    for bit; float GEMMs (16-bit activations, the low-rank branch) may round differently at another batch size."""
    gen = torch.Generator().manual_seed(0)
    n, k = 96, 256
    w = fit_rtn(torch.randn(n, k, generator=gen) * 0.05, fmt.CODES["ternary"], 64)
    w_int = fmt.int_weights(w.codes, w.group_scale, w.group_offset, w.code).float()
    left = right = lowrank_a = lowrank_b = None
    if rotated:
        left = block_diagonal_orthogonal(16, k_blocks, gen) if k_blocks > 1 else random_orthogonal(16, gen)
        right = random_orthogonal(16, gen)
    if rank:
        lowrank_a = torch.randn(n, rank, generator=gen).half()
        lowrank_b = torch.randn(rank, k, generator=gen).half()
    bias = torch.randn(n, generator=gen)

    def layer(x):
        return quant_linear(x, w_int, w.row_scale, block_row_sums(w_int, k_blocks), left, right, bits, 0.9,
                            lowrank_a, lowrank_b, bias)

    x = torch.randn(5, k, generator=gen) * 2
    clean = layer(x)
    others = [0, 1, 3, 4]
    for bad in BAD_VALUES:
        xb = x.clone()
        xb[2, 7] = bad
        y = layer(xb)
        assert torch.equal(y[others], clean[others]), bad
        for i in others:
            single = layer(x[i:i + 1])[0]
            if bits < 16 and not rank:
                assert torch.equal(y[i], single)
            else:
                torch.testing.assert_close(y[i], single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))


def test_nonfinite_token_does_not_leak_through_the_vllm_layer():
    """TwlaLinearMethod.apply on a fused q/k/v vLLM layer (per-linear transforms, low-rank branch, bias)."""
    from .test_linear_method import build, load, rotation_for, shard_tensors

    gen = torch.Generator().manual_seed(1)
    k, parts = 256, [128, 64, 64]
    rots = [rotation_for(k, gen) for _ in parts]
    spec = fmt.LayerSpec(act_bits=4, act_clip=0.9, rotation=(16, 16), lowrank_rank=4)
    with vllm_layer_env():
        layer, names = build("qkv", k, parts, 64, spec, True)
        load(layer, "qkv", names, {nm: shard_tensors(n, k, 64, rot, True, gen, rank=4)[1]
                                   for nm, n, rot in zip(names, parts, rots)})
        x = torch.randn(6, k, generator=gen)
        clean = layer.quant_method.apply(layer, x, layer.bias)
        for bad in BAD_VALUES:
            xb = x.clone()
            xb[3] = bad  # the whole token
            y = layer.quant_method.apply(layer, xb, layer.bias)
            assert torch.equal(y[[0, 1, 2, 4, 5]], clean[[0, 1, 2, 4, 5]]), bad


def test_nonfinite_token_does_not_leak_in_triton_kernels():
    """The Triton act_quant + GEMV / tensor-core GEMM under the interpreter (tests/triton_nonfinite.py)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "tests.triton_nonfinite"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "0 leaked" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count("ok ") == 16


# ---------------------------------------------------------------------------------------------------------
# Config fuzz: any quantization_config is a checkpoint config or a FormatError naming the key
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_qconfig(synthetic_dirs) -> dict:
    with open(os.path.join(synthetic_dirs["qwen2"], "config.json")) as f:
        return json.load(f)["quantization_config"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["re:(", "re:.*", "ternary", "int4", "binary", "Linear", "group",
                                               "token", "kronecker", "float32", "input", "int32-bytelane"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def mutated_configs(draw, base: dict):
    """`base` with 1-3 mutations: a node replaced by a random JSON value, deleted, or given an unknown key."""
    d = copy.deepcopy(base)
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        path = draw(st.sampled_from(paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            name = draw(st.text(min_size=1, max_size=8))
            parent[name] = draw(JSON_VALUES)
            path = path[:-1] + (name,)
        touched.append(path)
    return d, touched


def test_config_fuzz_gives_a_checkpoint_config_or_a_format_error_naming_the_key(valid_qconfig):
    from twla_vllm import ct_vocab

    def edited(path, value):
        d = copy.deepcopy(valid_qconfig)
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return d, [path]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated_configs(valid_qconfig))
    @example(edited(("ignore", 0), "re:("))  # found by this test: an invalid regex raised re.error
    @example(edited(("weight", "code"), []))  # found by this test: an unhashable code raised TypeError
    @example(edited(("format_version",), True))  # found by this test: True passed as version 1
    @example(edited(("layers", "model.layers.0.mlp.up_proj", "rotation"), [2**70, 1]))
    @example(edited(("config_groups", "a8", "targets"), "model.layers.0.mlp.up_proj"))
    @example(edited(("transform_config", "config_groups"), {"k": {"type": "kronecker", "apply": [{}]}}))
    def check(case):
        d, touched = case
        try:
            cfg = fmt.CheckpointConfig.from_dict(d)
            ct_vocab.validate(cfg, d)  # what validate_checkpoint adds on top
        except fmt.FormatError as e:
            message = str(e)
            names = {str(part) for path in touched for part in path if not isinstance(part, int)}  # keys
            assert any(repr(n)[1:-1] in message or n in message for n in names), (message, touched)

    check()


# ---------------------------------------------------------------------------------------------------------
# A killed quantizer: nothing half-written at --out, and the resumed run gives the same bytes
# ---------------------------------------------------------------------------------------------------------
def _tiny_recipe():
    from twla_offline.recipe import Recipe

    return Recipe(group_size=64, nsamples=2, seqlen=64, kotms_iters=3, allocation="uniform", clip_search=False,
                  batch_size=2, amp_seqlen=64)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from twla_offline.synthetic import char_tokenizer, tiny_config

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_config("llama", 98)), dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("dense") / "tiny-llama")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _killed_at(monkeypatch, module, name, when):
    """Replace module.name by a wrapper that raises KeyboardInterrupt (a kill) when when(call_number) is true."""
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if when(calls[0], *args):
            raise KeyboardInterrupt(f"simulated kill in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _files(d: str) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_killed_quantizer_resumes_to_the_same_bytes_and_leaves_nothing_half_written(tiny_dense, tmp_path):
    """One run killed three times -- in block 0's KOTMS (nothing worth resuming: OUT.work/ goes), in the middle
    of block 1 (after its KOTMS, between two linears' GPTQ), and while the checkpoint's tensors are written --
    then run to the end, equals an uninterrupted run byte for byte. After each kill --out does not exist and no
    temporary directory is left beside it."""
    from twla_offline import export, pipeline
    from twla_offline.cli import PROGRESS, quantize

    whole = quantize(tiny_dense, str(tmp_path / "whole"), _tiny_recipe(), evaluate_after=False)["checkpoint"]
    out = tmp_path / "out"
    progress = out.parent / "out.work" / PROGRESS

    def blocks_done() -> int:
        return json.loads(progress.read_text())["next_block"] if progress.exists() else 0

    def check_killed(work_kept: bool) -> None:
        assert not out.exists()
        assert sorted(os.listdir(tmp_path)) == ["out.work", "whole"] if work_kept else ["whole"]
        if work_kept:
            assert not [f for f in os.listdir(out.parent / "out.work") if ".tmp" in f]

    kills = [
        (pipeline, "learn_kronecker_rotation", lambda n, *a: n == 1, False),  # block 0's first transform
        (pipeline, "gptq_quantize", lambda n, *a: blocks_done() == 1 and n >= 10, True),  # mid block 1
        (export, "_save_sharded", lambda n, d, tensors: blocks_done() == 2, True),  # writing model.safetensors
    ]
    for module, name, when, work_kept in kills:
        with pytest.MonkeyPatch.context() as mp:
            _killed_at(mp, module, name, when)
            with pytest.raises(KeyboardInterrupt, match=name):
                quantize(tiny_dense, str(out), _tiny_recipe(), evaluate_after=False)
        check_killed(work_kept)
    assert blocks_done() == 2  # the export kill came after every block was saved
    quantize(tiny_dense, str(out), _tiny_recipe(), evaluate_after=False)
    assert _files(str(out)) == _files(whole)
    assert sorted(os.listdir(tmp_path)) == ["out", "whole"]
