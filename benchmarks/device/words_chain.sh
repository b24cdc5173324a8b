#!/bin/bash
# Device, after setup.sh (session 27's one-lease plan): GPU check, the whole-word unpack tables, then, once the
# third carried call has put vllm.txz.part01 in /tmp/chunks (and touched part01.done), the serving table.
#   OUT=/tmp/outk setsid nohup bash benchmarks/device/words_chain.sh bf16,twla,twinquant > /tmp/chain.log 2>&1 \
#     < /dev/null & disown
cd /tmp/repo
bash benchmarks/device/kernel_tables.sh check
bash benchmarks/device/kernel_tables.sh words
while [ ! -f /tmp/chunks/part01.done ]; do sleep 5; done
bash benchmarks/device/serve_table.sh "$1" > /tmp/serve.log 2>&1
echo "== serve rc $?"; tail -25 /tmp/serve.log
