#!/bin/bash
# Device, after setup.sh: one lease's plan, most decisive first (leases are short and starts often refused): act_quant
# with its left factor first beside the served order (`kernel_tables.sh left-first`: the act_quant sweep's "L" cells
# and the quick GPU check, ~4 min, KERNEL_NOTES v30); M = 1 in one launch and the GEMV's tiles at M = 1 and 8 (`decode`,
# ~4-6 min: ~60 Triton compiles, v31); then the serving table for [methods] (default: every mode;
# e.g. bf16,twla,twla+fq,twla+wide,twla+lf,twla+chunks+cw8 serves v29-v31's switches beside the default, ~2.5 min a
# method; `none`: no serving and no vLLM pieces to carry; /tmp/chunks/methods, written by a later call, narrows them
# once the tables are read), once the third carried call has put vllm.txz.part01 in /tmp/chunks (and touched
# part01.done); then the chunks column with 4, 8 and 16 words of a row together (`kernel_tables.sh chunk-words`,
# ~3 min, v28 outcome), the full GPU check and the M = 8 / 64 tile sweeps on the chunked layout (`chunks-sweep`).
# The serving table (~2.5 min a method, both step profiles) comes before chunk-words: a 30-minute lease rarely
# reaches the end, and the served numbers are what the targets are about.
#   call 1 (carry .gpu-carry/whl, deps.tar, device-install.sh, env.sh): mkdir -p /tmp/chunks /tmp/outk && cp
#     .gpu-carry/{deps.tar,device-install.sh,env.sh} /tmp/chunks/ && bash benchmarks/device/setup.sh && (OUT=/tmp/outk
#     setsid nohup bash /tmp/repo/benchmarks/device/words_chain.sh [methods] > /tmp/chain.log 2>&1 < /dev/null &
#     disown)
#   call 2 (carry vllm.txz.part00): cp it to /tmp/chunks;  call 3 (part01): cp it, touch /tmp/chunks/part01.done
#   then poll back to back (the machine goes after 30 s idle): tail /tmp/chain.log; cp /tmp/outk/* $OUT/;
#   cp /tmp/serve-bench/*.json $OUT/  (a call returns a limited number of files: copy the logs /tmp/k_*.log too)
cd /tmp/repo
if [ "$1" != none ]; then  # vLLM installs (CPU only) while the op tables run
  ( while [ ! -f /tmp/chunks/part01.done ]; do sleep 5; done
    bash /tmp/chunks/device-install.sh > /tmp/install.log 2>&1 && touch /tmp/chunks/installed ) &
fi
bash benchmarks/device/kernel_tables.sh left-first
bash benchmarks/device/kernel_tables.sh decode
wait
if [ "$1" != none ]; then  # a later call may narrow the methods by writing them to /tmp/chunks/methods
  M=${1:-bf16,fp8,twla,bwla,twinquant}; [ -s /tmp/chunks/methods ] && M=$(cat /tmp/chunks/methods)
  bash benchmarks/device/serve_table.sh "$M" > /tmp/serve.log 2>&1
  echo "== serve rc $?"; tail -25 /tmp/serve.log
fi
bash benchmarks/device/kernel_tables.sh chunk-words
bash benchmarks/device/kernel_tables.sh check
bash benchmarks/device/kernel_tables.sh chunks-sweep
