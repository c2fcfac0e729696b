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
wait
if have digits-subsets-500; then
  pack digits-subsets-500
  loralens benchmark --data "$OUT/digits-subsets-500.store" --targets 'class_*' \
    --targets dataset_size --seeds "$SEEDS" --epochs "$EPOCHS" $T --out "$OUT/bench-subsets" \
    >"$OUT/bench-subsets.log" 2>&1 &
fi

# 2. Rank generalization: train on rank-4 LoRAs only, evaluate on ranks 1, 2, 8, 16.
if have skills-lm-ranks; then
  pack skills-lm-ranks
  for m in mlp-svd mlp-dense glnet; do
    for s in $(seq 0 $((SEEDS - 1))); do
      run="$OUT/ranks/$m/seed$s"
      loralens train --data "$OUT/skills-lm-ranks.store" --target eval_loss --model "$m" \
        --where 'rank == 4' --seed "$s" --epochs "$EPOCHS" $T --out "$run" --quiet >/dev/null
      for r in 1 2 8 16; do
        loralens evaluate "$run" --data "$OUT/skills-lm-ranks.store" --where "rank == $r" \
          --out "$run/rank$r" >/dev/null
      done
    done
  done &
fi
wait

# 3. Transfer to the base variant: models trained on skills-lm-500, evaluated on LoRAs of the
#    variant base (same family: continued pretraining on a shifted mix).
if have skills-lm-500 && have skills-lm-variant; then
  pack skills-lm-variant
  for m in mlp mlp-oalign mlp-svd mlp-dense glnet; do
    for s in $(seq 0 $((SEEDS - 1))); do
      run="$OUT/bench-skills-lm/runs/eval_loss/$m/seed$s"
      [ -d "$run" ] && loralens evaluate "$run" --data "$OUT/skills-lm-variant.store" \
        --out "$OUT/transfer/$m/seed$s" >/dev/null
    done
  done
fi

# 4. Predict vs evaluate speed.
if have skills-lm-500; then
  python3 benchmarks/predict_vs_eval.py --zoo "$ZOOS/skills-lm-500" \
    --run "$OUT/bench-skills-lm/runs/eval_loss/glnet/seed0" --store "$OUT/skills-lm-500.store" \
    --num 64 --eval-num 8 --out "$OUT/predict_vs_eval.json" >/dev/null 2>&1
fi
python3 benchmarks/summarize_paper.py "$OUT" >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
