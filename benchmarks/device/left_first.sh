#!/bin/bash
# Device, one short call after setup.sh (KERNEL_NOTES v30): act_quant's left-first order in the act_quant sweep at
# M = 1, 2048, 8192 (the op table after it runs until the timeout), then the GPU check's left-first cases only.
# Output under $OUT.
cd /tmp/repo && export PYTHONPATH=/tmp/twsite:/tmp/repo PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/kernels.py --act-quant-sweep --ms 1,2048,8192 --shapes 14336:4096 \
  > $OUT/act_quant_left_first.log 2>&1
echo "sweep rc $?"; grep -a "^| " $OUT/act_quant_left_first.log | tail -8
timeout 60 python3 - <<'PY' 2>&1 | tee $OUT/left_first_check.log
import torch
from tests import triton_check as tc
gen = torch.Generator().manual_seed(7)
for c in [c for c in tc.gpu_cases() if c.left_first]:
    print("FAIL" if (f := tc.check_case(c, "cuda", gen)) else "ok  ", c, "; ".join(f), flush=True)
PY
