"""twla_vllm: serve TWLA (ternary-weight, low-bit-activation) checkpoints with vLLM.

vLLM loads `register` through the `vllm.general_plugins` entry point in every process it starts
(front end, engine core, each worker); it must stay cheap and idempotent.
"""

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """Register quantization method `twla` and the `torch.ops.twla` ops with vLLM."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from . import ops  # noqa: F401  (defines torch.ops.twla.*)
    from .config import TwlaConfig

    register_quantization_config("twla")(TwlaConfig)
    _REGISTERED = True
