"""Preset ``causal-lm`` (generic mode): LoRAs of any transformers causal LM on a text corpus.

``loralens zoo build --base-model NAME_OR_PATH --text-file FILE`` (or ``--dataset NAME[:CONFIG]``
for a Hugging Face dataset with a ``text`` column). The text is tokenized with the model's
tokenizer (or, for a model without one, e.g. a random-init model saved from a config, with raw
bytes modulo the vocabulary), cut into blocks of ``block_size`` tokens, a held-out fraction kept
for evaluation, and the training blocks split into ``parts`` contiguous parts. Each LoRA is a
PEFT LoRA (PEFT's default target modules for the architecture unless ``targets`` is given)
trained with the standard PEFT recipe (one LoRA at a time; on CUDA when available) on a random
subset of the parts, with random lr, weight decay, epochs, batch size, dropout and init seed.

Labels: the hyperparameters, ``part_<j>`` (1 = part used), ``train_loss`` (mean loss on the
LoRA's own training blocks after training) and ``eval_loss`` (held-out blocks).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loralens.errors import InputError, SettingsError
from loralens.zoo.preset import (
    HPARAM_COLUMNS,
    OnDone,
    Preset,
    derive_seed,
    index_rng,
    register_preset,
    sample_lora_hparams,
)

BATCH_SIZES = (4, 8, 16)
EPOCHS = (1, 2, 3)


@register_preset
class CausalLM(Preset):
    """LoRAs of any transformers causal LM on a user's text (generic mode)."""

    name = "causal-lm"
    uses_cuda = True
    default_options: Mapping[str, Any] = {
        "base_model": "",
        "text_file": "",
        "dataset": "",
        "targets": "",  # comma-separated module names; empty = PEFT's default for the model type
        "block_size": 64,
        "parts": 8,
        "eval_fraction": 0.1,
        "max_blocks": 4096,
        "lr_min": 1e-5,
        "lr_max": 1e-3,
        "micro_batch": 4,
    }

    def __init__(self) -> None:
        self.model = None
        self.opts: dict[str, Any] = {}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def prepare(self, cache_dir: Path, seed: int, options: Mapping[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.opts, self.seed = dict(options), int(seed)
        if not self.opts["base_model"]:
            raise SettingsError("causal-lm needs --base-model NAME_OR_PATH")
        if bool(self.opts["text_file"]) == bool(self.opts["dataset"]):
            raise SettingsError("causal-lm needs exactly one of --text-file FILE or --dataset NAME")
        # safetensors only: a base model that ships only a pickled pytorch_model.bin is refused
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.opts["base_model"], use_safetensors=True
            )
        except OSError as err:
            raise SettingsError(f"--base-model {self.opts['base_model']}: {err}") from err
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        blocks = self._blocks(self._text())
        g = torch.Generator().manual_seed(derive_seed(seed, "causal-lm-split"))
        perm = torch.randperm(len(blocks), generator=g)
        n_eval = max(1, round(len(blocks) * float(self.opts["eval_fraction"])))
        if len(blocks) - n_eval < int(self.opts["parts"]):
            raise SettingsError(
                f"text too short: {len(blocks)} blocks of {self.opts['block_size']} tokens "
                f"for {self.opts['parts']} parts plus a held-out set"
            )
        self.eval_blocks = blocks[perm[:n_eval].sort().values]
        train = blocks[perm[n_eval:].sort().values]
        self.parts = list(torch.tensor_split(train, int(self.opts["parts"])))
        self._base_labels = {"eval_loss": self._loss(self.model, self.eval_blocks)}

    def _text(self) -> str:
        if self.opts["text_file"]:
            return Path(self.opts["text_file"]).read_text(encoding="utf-8", errors="replace")
        try:
            from datasets import load_dataset  # optional dependency, only for --dataset
        except ImportError as err:
            raise SettingsError(
                "--dataset needs the `datasets` package (pip install datasets); or use --text-file"
            ) from err

        name, _, config = str(self.opts["dataset"]).partition(":")
        ds = load_dataset(name, config or None, split="train")
        return "\n\n".join(ds["text"][: 20 * int(self.opts["max_blocks"])])

    def _blocks(self, text: str) -> torch.Tensor:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.opts["base_model"])
            ids = tok(text, return_attention_mask=False)["input_ids"]
            self.tokenizer = "model"
        except (OSError, ValueError, TypeError):
            ids = []
        if not ids:  # no tokenizer, or one without a vocabulary (an empty one loads for GPT-2)
            vocab = int(self.model.config.vocab_size)
            ids = [b % vocab for b in text.encode("utf-8")]
            self.tokenizer = f"bytes mod {vocab}"
        bs = int(self.opts["block_size"])
        n = min(len(ids) // bs, int(self.opts["max_blocks"]))
        if n < 2:
            raise InputError(f"text too short: {len(ids)} tokens, need at least {2 * bs}")
        return torch.tensor(ids[: n * bs], dtype=torch.long).view(n, bs)

    def save_base(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)

    def base_labels(self) -> dict[str, Any]:
        return dict(self._base_labels)

    def manifest_info(self) -> dict[str, Any]:
        return {
            "base_model": self.opts["base_model"],
            "tokenizer": self.tokenizer,
            "train_blocks_per_part": [len(p) for p in self.parts],
            "eval_blocks": len(self.eval_blocks),
        }

    def sample_config(self, seed: int, index: int, ranks: Sequence[int]) -> dict[str, Any]:
        rng = index_rng(seed, index, self.name)
        cfg = sample_lora_hparams(rng, self.opts, ranks, EPOCHS, BATCH_SIZES)
        used = [int(rng.random() < 0.5) for _ in range(int(self.opts["parts"]))]
        if not any(used):
            used[rng.randrange(len(used))] = 1
        cfg.update({f"part_{j}": u for j, u in enumerate(used)})
        return cfg

    def label_columns(self, options: Mapping[str, Any]) -> list[str]:
        hyper = list(HPARAM_COLUMNS)
        parts = [f"part_{j}" for j in range(int(options["parts"]))]
        return [*hyper, *parts, "train_loss", "eval_loss"]

    def binary_columns(self, options: Mapping[str, Any]) -> list[str]:
        return [f"part_{j}" for j in range(int(options["parts"]))]

    def _loss(self, model, blocks: torch.Tensor) -> float:
        total, n = 0.0, 0
        mb = int(self.opts["micro_batch"])
        with torch.no_grad():
            for s in range(0, len(blocks), mb):
                x = blocks[s : s + mb].to(self.device)
                total += float(model(input_ids=x, labels=x).loss) * len(x)
                n += len(x)
        return total / max(n, 1)

    def train(self, configs, out_dirs, on_done: OnDone | None = None) -> list[dict[str, Any]]:
        from peft import LoraConfig, get_peft_model

        results = []
        targets = [t for t in str(self.opts["targets"]).split(",") if t] or None
        for k, (cfg, out_dir) in enumerate(zip(configs, out_dirs)):
            data = torch.cat([p for j, p in enumerate(self.parts) if cfg[f"part_{j}"]])
            torch.manual_seed(cfg["init_seed"])
            lcfg = LoraConfig(
                r=cfg["rank"],
                lora_alpha=cfg["lora_alpha"],
                lora_dropout=cfg["lora_dropout"],
                target_modules=targets,
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():  # PEFT reads a deprecated transformers attribute
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                pm = get_peft_model(self.model, lcfg)
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            g = torch.Generator().manual_seed(derive_seed(cfg["init_seed"], "data"))
            bs, mb = cfg["batch_size"], min(int(self.opts["micro_batch"]), cfg["batch_size"])
            steps = max(1, cfg["epochs"] * len(data) // bs)
            order = torch.cat(
                [torch.randperm(len(data), generator=g) for _ in range(cfg["epochs"] + 1)]
            )
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t, steps=steps: max(0.0, 1 - t / steps)
            )
            pm.train()
            for step in range(steps):
                batch = data[order[step * bs : (step + 1) * bs]]
                for s in range(0, len(batch), mb):
                    x = batch[s : s + mb].to(self.device)
                    (pm(input_ids=x, labels=x).loss * len(x) / len(batch)).backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            pm.eval()
            labels = {
                "train_loss": self._loss(pm, data),
                "eval_loss": self._loss(pm, self.eval_blocks),
            }
            pm.save_pretrained(str(out_dir))
            self.model = pm.unload()  # the base again, LoRA layers removed, weights untouched
            results.append(labels)
            if on_done:
                on_done(k, labels)
        return results
