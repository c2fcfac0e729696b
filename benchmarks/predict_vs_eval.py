"""Seconds per LoRA: `loralens predict` vs measuring the same label by running the finetuned model.

    python benchmarks/predict_vs_eval.py --zoo /work/zoos/skills-lm-500 --run RUN_DIR --num 32

- predict (files): ``load_lora`` of each PEFT folder + one batched forward of the trained LoL
  model (what ``loralens predict`` does after start-up), per LoRA;
- predict (store): the same LoRAs read from a packed store (memory-mapped) + forward, per LoRA;
- evaluate: what the zoo builder does to get ``eval_loss``/``task_acc``: load the adapter onto the
  base model with PEFT and run the held-out evaluation set and the challenge set through it
  (teacher-forced losses and greedy exact match), per LoRA; the measured ``eval_loss`` is checked
  against labels.csv.

Both sides run in this one process with the same torch threads, one after the other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import loralens as ll
from loralens.learn.runs.folder import load_run
from loralens.store import LoRAStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--run", required=True, help="a run directory trained on this zoo's layers")
    ap.add_argument("--store", default=None, help="a packed store of the zoo (optional)")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--eval-num", type=int, default=8, help="adapters evaluated by running them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    labels = pd.read_csv(zoo / "labels.csv", converters={0: str}).set_index("adapter")
    names = sorted(p.name for p in (zoo / "adapters").iterdir() if p.name in labels.index)
    names = names[: args.num]
    run = load_run(args.run)
    result: dict = {"zoo": str(zoo), "run": args.run, "threads": args.threads}

    run.predict_loras([ll.load_lora(zoo / "adapters" / names[0])])  # warm-up
    t = time.perf_counter()
    loras = [ll.load_lora(zoo / "adapters" / n) for n in names]
    pred = run.predict_loras(loras)
    result["predict_files_s_per_lora"] = (time.perf_counter() - t) / len(names)
    result["n_predict"] = len(names)

    if args.store:
        store = LoRAStore(args.store)
        rows = [store.row_of(n) for n in names]
        t = time.perf_counter()
        out = run.raw(store.batch(rows, pad_ranks=run.spec.ranks))
        result["predict_store_s_per_lora"] = (time.perf_counter() - t) / len(names)
        np.testing.assert_allclose(run.task.decode(out), pred, rtol=1e-4, atol=1e-5)

    # evaluate by running the finetuned model, as the skills-lm zoo builder measures labels
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from loralens.zoo.preset import get_preset
    from loralens.zoo.presets import skills_data as data

    manifest = json.loads((zoo / "zoo.json").read_text())
    preset = get_preset(manifest["preset"])
    preset.opts, preset.seed = preset.options(manifest["options"]), int(manifest["seed"])
    opts = preset.opts
    preset._eval = data.make_examples(preset.seed, "eval", int(opts["eval_per_source"]))
    preset._challenge = data.make_examples(
        preset.seed, "challenge", int(opts["challenge_per_source"]), level="hard"
    )
    base = LlamaForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    measured, times = [], []
    for n in names[: args.eval_num]:
        t = time.perf_counter()
        model = PeftModel.from_pretrained(base, zoo / "adapters" / n).eval()
        lab = preset._evaluate(model, 1)[0]
        times.append(time.perf_counter() - t)
        base = model.unload()
        measured.append((lab["eval_loss"], float(labels.loc[n, "eval_loss"])))
    result["evaluate_s_per_lora"] = float(np.mean(times))
    result["n_evaluate"] = len(times)
    result["eval_loss_max_abs_diff_vs_labels"] = float(max(abs(a - b) for a, b in measured))
    result["n_eval_examples"] = len(preset._eval) + len(preset._challenge)
    result["speedup_files"] = result["evaluate_s_per_lora"] / result["predict_files_s_per_lora"]
    if "predict_store_s_per_lora" in result:
        result["speedup_store"] = result["evaluate_s_per_lora"] / result["predict_store_s_per_lora"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
