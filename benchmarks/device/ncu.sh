#!/bin/bash
# Device, after setup.sh: Nsight Compute counters of the served op's kernels (benchmarks/profile_kernels.py) -> $OUT
#   ncu_details.txt  every kernel of every case: speed of light, occupancy, warp states, memory, instructions
#   ncu_sass_<k>.csv per-SASS-instruction stall samples of one kernel: the packed GEMM at M = 64 (4096->14336),
#                    act_quant on down_proj's 14336-wide input at M = 2048
# (clocks left alone: --clock-control none, as the device README asks)
cd /tmp/repo && export PYTHONPATH=/tmp/twsite PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
echo "ncu: $NCU"; $NCU --version | tail -1
T0=$(date +%s)
timeout 400 $NCU --clock-control none --profile-from-start off --set full --print-details all --nvtx \
  python3 benchmarks/profile_kernels.py "$@" > $OUT/ncu_details.txt 2>&1
echo "== details rc $? at $(( $(date +%s) - T0 )) s, $(grep -c '==PROF== Profiling' $OUT/ncu_details.txt) kernels"
for kc in _gemm_kernel:ternary:4096:14336:64 _act_quant_kernel:ternary:14336:4096:2048; do
  k=${kc%%:*}
  timeout 200 $NCU --clock-control none --profile-from-start off --kernel-name regex:"$k" --launch-count 1 \
    --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
    python3 benchmarks/profile_kernels.py --cases ${kc#*:} > $OUT/ncu_sass$k.csv 2>&1
  echo "== sass $k rc $? at $(( $(date +%s) - T0 )) s, $(wc -l < $OUT/ncu_sass$k.csv) lines"
done
KEYS="==PROF==|== case|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Compute \(SM\) Thr|Memory Thr"
grep -a -E "$KEYS" $OUT/ncu_details.txt | head -150
