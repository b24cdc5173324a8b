#!/bin/bash
# Device, after setup.sh and the GPU vLLM pieces in /tmp/chunks (deps.tar, vllm.txz.part*, device-install.sh,
# env.sh from ../shared/gpu-vllm/prepare.sh; one carried call per piece): install vLLM into /tmp/site, then the
# serving table with the decode-step profile. Run as a background chain (setsid nohup ... &), poll with
#   cat /tmp/serve.log; cp /tmp/serve-bench/*.json $OUT/
# Usage: bash benchmarks/device/serve_table.sh [methods]   (default bf16,fp8,twla,bwla,twinquant)
cd /tmp/repo && export PYTHONPATH=/tmp/twsite
bash /tmp/chunks/device-install.sh || exit 1
source /tmp/chunks/env.sh
python3 benchmarks/serve.py --methods ${1:-bf16,fp8,twla,bwla,twinquant} --profile --json /tmp/serve-bench/serve.json
