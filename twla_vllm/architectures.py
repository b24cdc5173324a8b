"""Which model architectures TWLA quantizes and serves, checked from config.json before any weight loads.

The quantizer walks decoder layers with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` (transforms per
input site, the head-local o_proj factor folded into v_proj, RMSNorm folding), and the plugin's fused q/k/v and
gate/up handling follows vLLM's Llama/Qwen2 modules. Those are the architectures tested end to end; any other
fails with a message naming it, offline before the model loads and in vLLM when the engine is configured.
Torch-free: `twla-quantize` checks this before importing anything heavy.
"""

from __future__ import annotations

from typing import Any

# architecture (config.json "architectures") -> model_type
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
LAYOUT = "decoder layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj"


class UnsupportedArchitecture(ValueError):
    """A model whose architecture TWLA does not quantize or serve; the message names it."""


def check_architecture(architectures: list[str] | None, model_type: str | None, source: str) -> None:
    """Raise UnsupportedArchitecture unless the model is one of SUPPORTED_ARCHITECTURES."""
    archs = list(architectures or [])
    if any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return
    supported = ", ".join(f"{a} ({t})" for a, t in SUPPORTED_ARCHITECTURES.items())
    named = f"architecture {', '.join(archs)}" if archs else "no 'architectures' entry"
    raise UnsupportedArchitecture(f"{source}: {named} (model_type {model_type!r}) is not supported by TWLA; "
                                  f"supported: {supported} -- {LAYOUT}")


def check_config(config: dict[str, Any], source: str) -> None:
    """`check_architecture` on a config.json dict."""
    check_architecture(config.get("architectures"), config.get("model_type"), source)
