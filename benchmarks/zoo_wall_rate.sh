#!/usr/bin/env bash
# Wall-clock zoo throughput: 2 shard processes x 1 thread, count finished adapters at t=60 s and t=300 s.
set -u
OUT=${OUT:-/tmp/zoo-rate}; rm -rf "$OUT"; mkdir -p "$OUT"
for i in 0 1; do
  loralens zoo build --preset skills-lm --num 2000 --seed 0 --ranks 4 --shard $i/2 --threads 1 --out ${OUT:-/tmp/zoo-rate}/tp$i > ${OUT:-/tmp/zoo-rate}/tp$i.log 2>&1 &
  pids[$i]=$!
done
sleep 60; a=$(( $(ls ${OUT:-/tmp/zoo-rate}/tp0/adapters 2>/dev/null | wc -l) + $(ls ${OUT:-/tmp/zoo-rate}/tp1/adapters 2>/dev/null | wc -l) ))
sleep 240; b=$(( $(ls ${OUT:-/tmp/zoo-rate}/tp0/adapters 2>/dev/null | wc -l) + $(ls ${OUT:-/tmp/zoo-rate}/tp1/adapters 2>/dev/null | wc -l) ))
kill -9 ${pids[0]} ${pids[1]}
echo "t=60s: $a  t=300s: $b  steady rate: $(( (b - a) * 3600 / 240 )) LoRAs/hour"
