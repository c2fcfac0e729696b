#!/usr/bin/env bash
# The paper's experiments on our zoos (benchmarks/BENCHMARKS.md, "Learning on our zoos").
#
#   bash benchmarks/paper_tables.sh [ZOOS_DIR] [OUT_DIR] [SEEDS] [EPOCHS]
#
# ZOOS_DIR holds the zoos (skills-lm-500, skills-lm-ranks, skills-lm-variant, digits-dreambooth-500,
# digits-subsets-500); missing ones are skipped, partial ones are packed as they are. Every
# training uses one torch thread (small models; fastest on a shared CPU).
set -uo pipefail
ZOOS=${1:-/work/zoos}
OUT=${2:-runs/paper}
SEEDS=${3:-3}
EPOCHS=${4:-60}
mkdir -p "$OUT"
T="--threads 1"

have() { [ -f "$ZOOS/$1/labels.csv" ] && [ "$(wc -l <"$ZOOS/$1/labels.csv")" -gt 20 ]; }
pack() { loralens pack "$ZOOS/$1" --out "$OUT/$1.store" --overwrite --skip-bad --json >"$OUT/$1.pack.json"; }

# 1. The paper's tables: all five models on every label family.
if have skills-lm-500; then
  pack skills-lm-500
  loralens benchmark --data "$OUT/skills-lm-500.store" --targets eval_loss --targets task_acc \
    --targets 'src_*' --seeds "$SEEDS" --epochs "$EPOCHS" $T --out "$OUT/bench-skills-lm" \
    >"$OUT/bench-skills-lm.log" 2>&1 &
fi
if have digits-dreambooth-500; then
  pack digits-dreambooth-500
  loralens benchmark --data "$OUT/digits-dreambooth-500.store" --targets clip_score \
    --targets 'attr_*' --seeds "$SEEDS" --epochs "$EPOCHS" $T --out "$OUT/bench-dreambooth" \
    >"$OUT/bench-dreambooth.log" 2>&1 &
fi
if have digits-subsets-500; then
  pack digits-subsets-500
  loralens benchmark --data "$OUT/digits-subsets-500.store" --targets 'class_*' \
    --targets dataset_size --seeds "$SEEDS" --epochs "$EPOCHS" $T --out "$OUT/bench-subsets" \
    >"$OUT/bench-subsets.log" 2>&1 &
fi
wait

# 2.+3. Rank generalization and transfer: the eval_loss runs above (trained on rank-4 LoRAs of
#    the base model) are evaluated by summarize_paper.py on the skills-lm-ranks LoRAs of every
#    rank and on the LoRAs of the base variant (same family: continued pretraining on a shifted
#    mix), next to a hyperparameters-only reference.
have skills-lm-ranks && pack skills-lm-ranks
have skills-lm-variant && pack skills-lm-variant

# 4. Predict vs evaluate speed.
if have skills-lm-500; then
  python3 benchmarks/predict_vs_eval.py --zoo "$ZOOS/skills-lm-500" \
    --run "$OUT/bench-skills-lm/runs/eval_loss/glnet/seed0" --store "$OUT/skills-lm-500.store" \
    --num 64 --eval-num 8 --out "$OUT/predict_vs_eval.json" >/dev/null 2>&1
fi
python3 benchmarks/summarize_paper.py "$OUT" >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
