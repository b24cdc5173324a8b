from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")  # checkpoints are regenerated at fixed paths


@contextlib.contextmanager
def vllm_layer_env(tp_rank: int = 0, tp_size: int = 1):
    """Build vLLM linear layers outside an engine, as rank `tp_rank` of a simulated TP group."""
    import twla_vllm

    twla_vllm.register()
    import vllm.model_executor.layers.linear as L
    import vllm.model_executor.parameter as P
    from vllm.config import VllmConfig, set_current_vllm_config

    patches = [mock.patch.object(m, f, return_value=v) for m in (L, P)
               for f, v in (("get_tensor_model_parallel_rank", tp_rank),
                            ("get_tensor_model_parallel_world_size", tp_size))
               if hasattr(m, f)]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(set_current_vllm_config(VllmConfig()))
        yield


@pytest.fixture(scope="session")
def synthetic_dirs(tmp_path_factory):
    """Synthetic TWLA checkpoints (Llama and Qwen2), written once per test session; Llama's activations use two
    ranges per transform block (format key act_blocks), Qwen2's one."""
    from twla_offline.synthetic import make_synthetic_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_synthetic_checkpoint(str(root / arch), arch=arch, seed=1 + i, act_ranges=2 if i == 0 else 1)
            for i, arch in enumerate(("llama", "qwen2"))}


@pytest.fixture
def rng(request):
    """A generator seeded afresh each run (tests hold for any draw), or from TWLA_TEST_SEED; the seed is printed
    with a failure ("Captured rng seed") so that the failing draw can be replayed."""
    seed = int(os.environ.get("TWLA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.add_report_section("call", "rng seed", f"TWLA_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
