#!/usr/bin/env bash
# The paper's experiments on our zoos (benchmarks/BENCHMARKS.md, "Learning on our zoos").
#
#   bash benchmarks/paper_tables.sh [ZOOS_DIR] [OUT_DIR] [SEEDS] [EPOCHS]
#
# ZOOS_DIR holds the zoos, built by the commands in BENCHMARKS.md:
#   skills-lm-2000           LoRAs 0..1999, rank 4                      (training zoo)
#   skills-lm-ranks-heldout  LoRAs 2000..2399, ranks 1,2,4,8,16 (--first 2000: unseen recipes)
#   skills-lm-variant        LoRAs 0..499 of the base variant (--base-variant 1)
#   digits-dreambooth-1000, digits-subsets-1000
# Missing zoos are skipped. Each training uses one torch thread; the zoos' benchmarks run
# side by side, one per core. Stores and benchmark tables already in OUT_DIR are kept (delete
# them to redo a step), so a rerun resumes.
set -uo pipefail
ZOOS=${1:-/work/zoos}
OUT=${2:-runs/paper}
SEEDS=${3:-3}
EPOCHS=${4:-60}
mkdir -p "$OUT"
B="--seeds $SEEDS --epochs $EPOCHS --threads 1"

have() { [ -f "$ZOOS/$1/labels.csv" ] && [ "$(wc -l <"$ZOOS/$1/labels.csv")" -gt 20 ]; }
pack() { [ -d "$OUT/$2.store" ] || ! have "$1" || loralens pack "$ZOOS/$1" --out "$OUT/$2.store" --overwrite --skip-bad --json >"$OUT/$2.pack.json"; }

pack skills-lm-2000 skills-lm
pack skills-lm-ranks-heldout ranks
pack skills-lm-variant variant
pack digits-dreambooth-1000 dreambooth
pack digits-subsets-1000 subsets

# 1. The paper's tables: every model (the five and w2t) on every label family.
bench() {
  local name=$1; shift
  [ -d "$OUT/$name.store" ] && [ ! -f "$OUT/bench-$name/benchmark.json" ] || return 0
  loralens benchmark --data "$OUT/$name.store" "$@" $B --out "$OUT/bench-$name" >"$OUT/bench-$name.log" 2>&1
}
bench skills-lm --targets eval_loss --targets task_acc --targets 'src_*' &
{ bench dreambooth --targets clip_score --targets 'attr_*'
  bench subsets --targets 'class_*' --targets dataset_size; } &
wait

# 2.+3. Rank generalization and transfer: the eval_loss runs above (trained on rank-4 LoRAs of
#    the base model) evaluated on the held-out ranks zoo and on the base variant's LoRAs.
# 4. Predict vs evaluate speed.
if [ -d "$OUT/skills-lm.store" ]; then
  python3 benchmarks/predict_vs_eval.py --zoo "$ZOOS/skills-lm-2000" \
    --run "$OUT/bench-skills-lm/runs/eval_loss/glnet/seed0" --store "$OUT/skills-lm.store" \
    --num 64 --eval-num 8 --out "$OUT/predict_vs_eval.json" >/dev/null 2>&1
fi
python3 benchmarks/summarize_paper.py "$OUT" >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
