#!/bin/bash
# Device: progress of background jobs (rows, GPU check), and what they wrote so far -> $OUT.
cp /tmp/acc_*.json /tmp/*.log "$OUT"/ 2>/dev/null || true
for f in /tmp/rows*.log; do
  echo "== $f"; grep -a -E "ppl .*x\)|Error|Traceback" "$f" | tail -6
  tail -c 300 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -1
done
[ -f /tmp/tc.log ] && echo "== GPU check: $(grep -a -c '^ok' /tmp/tc.log) ok, $(grep -a -c '^FAIL' /tmp/tc.log) FAIL; $(grep -a 'passed,' /tmp/tc.log)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
