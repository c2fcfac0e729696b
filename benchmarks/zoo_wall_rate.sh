#!/usr/bin/env bash
# Wall-clock skills-lm zoo throughput on this machine: 2 shard processes x 1 thread, finished
# adapters counted at t=60 s and t=300 s. Usage: bash benchmarks/zoo_wall_rate.sh [NEW_DIR]
set -u
out=${1:-$(mktemp -d /tmp/zoo-rate.XXXX)}
if [ -e "$out/tp0" ] || [ -e "$out/tp1" ]; then echo "$out already holds a measurement; give a new folder" >&2; exit 2; fi
count() { echo $(( $(ls "$out/tp0/adapters" 2>/dev/null | wc -l) + $(ls "$out/tp1/adapters" 2>/dev/null | wc -l) )); }
for i in 0 1; do
  loralens zoo build --preset skills-lm --num 2000 --seed 0 --ranks 4 --shard "$i/2" --threads 1 \
    --out "$out/tp$i" > "$out/tp$i.log" 2>&1 &
  pids[i]=$!
done
sleep 60; a=$(count)
sleep 240; b=$(count)
kill -9 "${pids[@]}"
echo "t=60s: $a  t=300s: $b  steady rate: $(( (b - a) * 3600 / 240 )) LoRAs/hour  (zoos in $out)"
