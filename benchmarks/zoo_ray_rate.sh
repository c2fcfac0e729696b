#!/usr/bin/env bash
# The overhead of Ray on a zoo build: the same zoo (skills-lm, tiny base, one LoRA at a time) built
# by two `--shard` processes (1 thread each) and by `--ray local` (a local Ray of this machine's
# CPUs, 1 CPU per task), wall clock from start to a finished zoo, one run each.
# Usage: bash benchmarks/zoo_ray_rate.sh [NEW_DIR] [NUM]   (needs pip install 'loralens[ray]')
set -eu
out=${1:-$(mktemp -d /tmp/zoo-ray-rate.XXXX)}
num=${2:-48}
if [ -e "$out/shard0" ] || [ -e "$out/ray" ]; then echo "$out already holds a measurement; give a new folder" >&2; exit 2; fi
opts=(-o size=tiny -o ft_per_source=16 -o eval_per_source=8 -o challenge_per_source=8 -o slots=1)
common=(--preset skills-lm --seed 0 --ranks 4 --threads 1 --quiet "${opts[@]}")
loralens zoo build "${common[@]}" --num 1 --out "$out/warm"  # pretrain (or load) the cached base once
rate() { python3 -c "n, s = $1, $2; print(f'{n} LoRAs in {s:.1f} s: {n * 3600 / s:.0f} LoRAs/hour')"; }

t0=$(date +%s.%N)
for i in 0 1; do loralens zoo build "${common[@]}" --num "$num" --shard "$i/2" --out "$out/shard$i" & done
wait
t1=$(date +%s.%N)
echo "two --shard processes: $(rate "$num" "$t1 - $t0")"

t0=$(date +%s.%N)
loralens zoo build "${common[@]}" --num "$num" --ray local --out "$out/ray"
t1=$(date +%s.%N)
echo "--ray local:           $(rate "$num" "$t1 - $t0")  (Ray start and stop included; zoos in $out)"
