#!/bin/bash
# Device, one call per piece (carry .gpu-carry/q/q.partNN): bash benchmarks/device/piece.sh NN
cp .gpu-carry/q/q.part$1 /tmp/q/ && echo "pieces: $(ls /tmp/q | wc -l) of 18, $(cat /tmp/q/* | wc -c) of 1117320768 bytes"
