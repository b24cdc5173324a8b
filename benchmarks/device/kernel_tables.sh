#!/bin/bash
# Device, after setup.sh: bash benchmarks/device/kernel_tables.sh MODE (tables + logs -> $OUT); MODE is one of
#   check    GPU check of every Triton kernel against its torch reference (1 seed)
#   ternary  the op table at decode and prefill sizes with the launch rules flipped (PDL, late sums)
#   g64      ternary group 64 (the Qwen preset's gate/up) at M = 2..8 with late sums flipped (KERNEL_NOTES v21)
#   branch   int4 r32 and binary r16 op tables with the branch columns, then the act_quant sweep
#   small    int4 and binary group 128 at M = 2, 4 with late sums flipped (never timed there: KERNEL_NOTES v21)
#   sweep    the branch's x·Bᵀ launch (K-chunks, step) at M = 64 and 2048, never swept on the tensor-core path
#   words    the packed GEMM (whole-word unpack) at M = 16..128 for each code and gate_up's 4096->28672, with
#            the gemm columns on the other weight layouts (KERNEL_NOTES v24-v27)
#   words-sweep  the M = 8 and 64 tile sweeps on up and gate_up (16-token tiles against the GEMV; 128-code K tiles)
#   chunks-sweep the same with every column on the 8-row x VW-word chunks (TWLA_WEIGHT_LAYOUT=chunks; v28)
#   left-first   act_quant with the left factor applied first (one token permute; KERNEL_NOTES v30) beside the
#            served order in the act_quant sweep (M = 1, 64, 2048, 8192), then the quick GPU check (has its cases)
#   decode   M = 1 and 8 on the four Llama-3-8B shapes with --sweep: M = 1 as one gemv_quant launch (act_quant in
#            the GEMV's prologue; KERNEL_NOTES v31) beside the served two launches, its tiles and programs per SM,
#            and the GEMV's own tiles (BN rows, BP words a chunk, warps) at M = 1 and 8
#   chunk-words  the chunks column with a row's words kept 4, 8 and 16 together (TWLA_CHUNK_WORDS; ternary g32's own
#            VW is 2): does a wider run per row win the GEMV back and keep the M = 64 GEMM's gain (v28 outcome)
#   words-branch int4 r32 (TwinQuant's shape) with the branch columns at decode, M = 64 and prefill
#   layout   the op tables with the matmul on each weight layout (row-major as served, 8-row x VW-word chunks;
#            KERNEL_NOTES v27, v28): ternary g32 at M = 1, 8, 64, 2048, the quick GPU check, then
#            gate_up at M = 1, 64
#            and int4 g128
#   all      check, branch, small, sweep in that order, as one background chain that outlives the call (a plain `&` job does not):
#            OUT=/tmp/outk setsid nohup bash /tmp/repo/benchmarks/device/kernel_tables.sh all > /tmp/chain.log \
#              2>&1 < /dev/null & disown        ... then copy /tmp/outk/* to $OUT in later calls
cd /tmp/repo && export PYTHONPATH=/tmp/twsite PYTHONUNBUFFERED=1
T0=$(date +%s)
k() { local name=$1 limit=$2; shift 2
  timeout $limit python3 benchmarks/kernels.py "$@" --json $OUT/kernels_$name.json > /tmp/k_$name.log 2>&1
  echo "== $name rc $? at $(( $(date +%s) - T0 )) s"; cp /tmp/k_$name.log $OUT/; tail -30 /tmp/k_$name.log; }
case $1 in
  check)
    python3 -m tests.triton_check --gpu --seeds 1 > /tmp/tc.log 2>&1
    echo "tc rc $?" >> /tmp/tc.log; cp /tmp/tc.log $OUT/; echo "== GPU check at $(( $(date +%s) - T0 )) s"
    grep -a -E "^FAIL|passed,|Traceback|Error|tc rc" /tmp/tc.log | tail -8 ;;
  ternary) k ternary 300 --ms 1,4,8,16,64,256 ;;
  g64) k ternary_g64 200 --group-size 64 --ms 2,4,8 ;;
  branch)
    k int4_g128_r32 200 --code int4 --group-size 128 --lowrank 32 --ms 1,8,64,2048
    k binary_g128_r16 200 --code binary --group-size 128 --lowrank 16 --ms 1,8,16,64
    k act_quant_sweep 200 --act-quant-sweep --ms 1,64,2048,8192 ;;
  small)
    k int4_g128_m2_4 150 --code int4 --group-size 128 --ms 2,4
    k binary_g128_m2_4 150 --code binary --group-size 128 --ms 2,4 ;;
  sweep) k lowrank_sweep_int4_g128_r32_m64 400 --code int4 --group-size 128 --lowrank 32 --lowrank-sweep --ms 64,2048 ;;
  layout)
    k layout_ternary_g32 200 --ms 1,8,64,2048
    python3 -m tests.triton_check --gpu --quick > /tmp/tcq.log 2>&1
    echo "tc rc $?" >> /tmp/tcq.log; cp /tmp/tcq.log $OUT/; echo "== quick GPU check at $(( $(date +%s) - T0 )) s"
    grep -a -E "^FAIL|passed,|Traceback|Error|tc rc" /tmp/tcq.log | tail -8
    k layout_gate_up_ternary_g32 100 --shapes 4096:28672 --ms 1,64
    k layout_int4_g128 150 --code int4 --group-size 128 --ms 1,8,64 ;;
  words)
    k words_ternary_g32 200 --ms 16,64,128
    k words_gate_up_ternary_g32 150 --shapes 4096:28672 --ms 16,64,128
    k words_int4_g128 150 --code int4 --group-size 128 --ms 16,64,128
    k words_binary_g128 150 --code binary --group-size 128 --ms 16,64,128 ;;
  words-branch) k words_int4_g128_r32 200 --code int4 --group-size 128 --lowrank 32 --ms 8,64,2048 ;;
  words-sweep) k words_sweep_ternary_g32 400 --shapes 4096:14336,4096:28672 --ms 8,64 --sweep ;;
  left-first)
    k act_quant_left_first 200 --act-quant-sweep --ms 1,64,2048,8192
    python3 -m tests.triton_check --gpu --quick > /tmp/tcq.log 2>&1
    echo "tc rc $?" >> /tmp/tcq.log; cp /tmp/tcq.log $OUT/; echo "== quick GPU check at $(( $(date +%s) - T0 )) s"
    grep -a -E "^FAIL|passed,|Traceback|Error|tc rc" /tmp/tcq.log | tail -8 ;;
  decode) k decode_sweep_ternary_g32 420 --ms 1,8 --sweep --shapes 4096:4096,4096:14336,14336:4096,4096:28672 ;;
  chunks-sweep) TWLA_WEIGHT_LAYOUT=chunks k chunks_sweep_ternary_g32 400 --shapes 4096:14336,4096:28672 --ms 8,64 \
    --sweep ;;
  chunk-words) for vw in 4 8 16; do TWLA_CHUNK_WORDS=$vw k chunk_words${vw}_ternary_g32 150 --ms 1,8,64 \
    --shapes 4096:4096,14336:4096,4096:28672; done ;;
  all) for t in check branch small sweep; do bash "$0" $t; done ;;
  *) echo "usage: $0 check|ternary|g64|branch|small|sweep|words|words-branch|words-sweep|chunks-sweep|chunk-words|\
left-first|decode|layout|all" >&2
     exit 2 ;;
esac
