#!/bin/bash
# Device, after the 18 pieces: join and convert the GGUF once, then one background process per group of the BWLA
# ladder's rows, e.g.  bash benchmarks/device/qwen_rows.sh okt,bwla twla
# Each group writes /tmp/acc_<group>.json row by row and logs to /tmp/rows_<group>.log; poll.sh copies them out.
# The work runs detached (setsid) from the snapshot setup.sh made: a plain `cmd &` dies when the device call ends.
set -e
if [ "$1" != "--detached" ]; then
  setsid nohup bash /tmp/repo/benchmarks/device/qwen_rows.sh --detached "$@" > /tmp/rows.log 2>&1 < /dev/null &
  disown
  echo "converting, then rows: $*"
  exit 0
fi
shift
G=/tmp/twla/qwen2.5-coder-1.5b.gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
mkdir -p "$(dirname $G)"
[ -f $G ] || { cat /tmp/q/q.part* > $G.tmp && mv $G.tmp $G; }
[ "$(stat -c %s $G)" = 1117320768 ] || { echo "$G: $(stat -c %s $G) bytes, expected 1117320768"; exit 1; }
export PYTHONPATH=/tmp/twsite TWLA_CACHE=/tmp/twla HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
cd /tmp/repo
python3 -c "from twla_offline.models import resolve_model; resolve_model('qwen2.5-coder-1.5b')"
for rows in "$@"; do
  OMP_NUM_THREADS=4 python3 benchmarks/accuracy_bwla.py --model qwen2.5-coder-1.5b --windows 32 --ladder bwla \
    --device cuda --rows $rows --json /tmp/acc_${rows//,/_}.json > /tmp/rows_${rows//,/_}.log 2>&1 &
done
wait
