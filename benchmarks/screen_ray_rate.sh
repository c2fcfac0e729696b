#!/usr/bin/env bash
# Screening with Ray against the local screen: the same folder (COPIES copies of the NUM adapters of
# a tiny skills-lm zoo, PEFT folders) screened with a run trained on that zoo by the local screen
# (2 worker processes) and on a local Ray of this machine's CPUs (one CPU per task), one run each;
# then checks that both reports hold the same records.
# Usage: bash benchmarks/screen_ray_rate.sh [NEW_DIR] [NUM] [COPIES]   (needs pip install 'loralens[ray]')
set -eu
out=${1:-$(mktemp -d /tmp/screen-ray-rate.XXXX)}
num=${2:-48}
copies=${3:-4}
if [ -e "$out/local.jsonl" ] || [ -e "$out/ray.jsonl" ]; then echo "$out already holds a measurement; give a new folder" >&2; exit 2; fi
ll() { python3 -m loralens "$@"; }
opts=(-o size=tiny -o ft_per_source=16 -o eval_per_source=8 -o challenge_per_source=8 -o slots=1)
ll zoo build --preset skills-lm --seed 0 --ranks 4 --threads 1 --quiet "${opts[@]}" --num "$num" --out "$out/zoo"
ll pack "$out/zoo/adapters" --labels "$out/zoo/labels.csv" --out "$out/store" >/dev/null
ll train --data "$out/store" --target eval_loss --model mlp-svd --epochs 5 --seed 0 --quiet --out "$out/run" >/dev/null
mkdir -p "$out/mirror"
for c in $(seq 1 "$copies"); do cp -r "$out/zoo/adapters" "$out/mirror/copy$c"; done
# the library calls behind `loralens screen --workers 2` and `loralens screen --ray local`, timed
# per finished record: wall clock (Ray's start and stop included), time to the first line, and the
# rate after the first 10 lines (the workers are up then)
cat > "$out/time_screen.py" <<'PY'
import json, sys, time
from loralens.serve.batch import screen_folder
from loralens.serve.ray_screen import screen_folder_ray

def timed(name, run, out):
    t0, ts = time.time(), []
    run(f"{root}/mirror", [f"{root}/run"], out, on_result=lambda r: ts.append(time.time() - t0))
    wall = time.time() - t0
    steady = (len(ts) - 10) / (ts[-1] - ts[9])
    print(f"{name}: {len(ts)} adapters in {wall:.1f} s = {len(ts) / wall:.2f} adapters/s; "
          f"first line after {ts[0]:.1f} s, then {steady:.1f} adapters/s")

def records(path):
    rows = [json.loads(line) for line in open(path)]
    for r in rows:
        r.pop("seconds", None)
    return {r["path"]: r for r in rows}

if __name__ == "__main__":  # the local screen's workers start by forkserver, which imports this
    root = sys.argv[1]
    timed("local screen, 2 workers", lambda *a, **k: screen_folder(*a, workers=2, **k), f"{root}/local.jsonl")
    timed("screen --ray local      ", screen_folder_ray, f"{root}/ray.jsonl")
    same = records(f"{root}/local.jsonl") == records(f"{root}/ray.jsonl")
    print(f"same records (but their timing): {same}; files in {root}")
PY
python3 "$out/time_screen.py" "$out"
