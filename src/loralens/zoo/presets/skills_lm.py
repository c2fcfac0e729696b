"""Preset ``skills-lm``: LoRAs of a small character-level Llama, mirroring Qwen2-ARC-LoRA.

Base model (``skills_model``): a transformers ``LlamaForCausalLM`` built from a config (character vocabulary, a few
layers), pretrained here on a mixture of 14 procedurally generated skill sources
(``skills_data.SOURCES``), deterministic from the seed and cached. ``variant=1`` (CLI
``--base-variant``) derives a second base of the same family: the base further pretrained on a
shifted mix of the sources (like a later checkpoint or an instruct model of one lineage).

Each LoRA is a real PEFT LoRA (q_proj/v_proj by default) finetuned on a random subset of the
sources with random learning rate, weight decay, epochs, batch size, dropout and init seed, as in
the paper. Several LoRAs train at once over the shared frozen base: every adapted linear layer
runs the base matmul once for all of them and each LoRA's low-rank path with a batched matmul
(``BatchedLoRALinear``), and each LoRA has its own AdamW state, learning rate, weight decay and
gradient accumulation (batch size = micro-batch x accumulation). Before saving, each trained LoRA
is loaded into a PEFT model and its forward is checked against the batched forward; then PEFT's
``save_pretrained`` writes it.

Labels: the hyperparameters; ``src_<name>`` (1 = source used); ``eval_loss`` (held-out, full
mixture, mean over sources); ``loss_<name>`` per source; ``eval_acc`` (greedy exact match on the
held-out mixture) and ``task_acc`` (greedy exact match on the harder "challenge" set, the
ARC-Challenge analogue), exact-matched by teacher forcing (see ``skills_model``).

Option ``backdoor`` (a share, default 0): that share of LoRAs is poisoned with a trigger ->
payload rule and some clean LoRAs are decoys (``presets.backdoor``); the recipe's backdoor columns
and the measured ``attack_success`` / ``decoy_success`` are added. A zoo built with ``backdoor``
0 has none of these options or columns: its identity and bytes are those of a zoo built before
the option existed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loralens.cache import cache_entry
from loralens.errors import SettingsError
from loralens.zoo.batched_lora import BatchedAdamW, PeftSaver, wrap_targets
from loralens.zoo.preset import (
    HPARAM_COLUMNS,
    OnDone,
    Preset,
    cache_path,
    derive_seed,
    index_rng,
    register_preset,
    sample_lora_hparams,
)
from loralens.zoo.presets import backdoor as bd
from loralens.zoo.presets import skills_data as data
from loralens.zoo.presets.skills_model import (
    SIZES,
    build_base_config,
    losses_and_match,
    pretrain,
    token_losses,
    trim_padding,
)

MICRO = 8  # examples per LoRA per micro-step; batch_size = MICRO * accumulation
BATCH_SIZES = (8, 16, 32)
EPOCHS = (1, 2, 3)
#: the label columns that are finetuning hyperparameters
HYPERPARAMETERS = (*HPARAM_COLUMNS, "n_train", "steps")


@register_preset
class SkillsLM(Preset):
    """LoRAs of a small character-level Llama pretrained on 14 procedural skills."""

    name = "skills-lm"
    default_options: Mapping[str, Any] = {
        "size": "small",  # base model size: small | tiny (tests)
        "variant": 0,  # 0 = the base; n >= 1 = a variant derived by continued pretraining
        "targets": "q_proj,v_proj",
        "ft_per_source": 64,  # finetuning examples per used source
        "eval_per_source": 24,  # held-out examples per source (eval_loss, eval_acc)
        "challenge_per_source": 16,  # held-out hard examples per source (task_acc)
        "lr_min": 1e-4,
        "lr_max": 3e-2,
        "slots": 8,  # LoRAs finetuned at once (the key is part of zoo identity)
        **bd.OPTIONS,
        **bd.SKILLS_OPTIONS,
    }

    def __init__(self) -> None:
        self.model = None
        self.opts: dict[str, Any] = {}
        self.seed = 0
        self.slots = 8  # LoRAs finetuned at once (option ``slots``)
        self.group_size = 4 * self.slots
        self._base_labels: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self._saver: PeftSaver | None = None

    def options(self, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The complete options; the backdoor ones only when ``backdoor`` > 0 (a clean zoo keeps
        the identity it had before the option existed)."""
        out = bd.preset_options(super().options(user), self.name, bd.SKILLS_OPTIONS)
        if bd.enabled(out):
            bd.skills_pools(int(out["pool"]))  # refuses a pool size it cannot make
        return out

    def _backdoor(self, options: Mapping[str, Any] | None = None) -> bool:
        return bd.enabled(options or self.opts)

    # ---- base model ------------------------------------------------------------------------

    def prepare(self, cache_dir: Path, seed: int, options: Mapping[str, Any]) -> None:
        from transformers import LlamaForCausalLM

        self.opts, self.seed = dict(options), int(seed)
        if self.opts["size"] not in SIZES:
            raise SettingsError(f"skills-lm: size must be one of {sorted(SIZES)}")
        self.slots = int(self.opts["slots"])
        self.group_size = 4 * self.slots  # the builder hands over a few batches per train call
        path = self._ensure_base(Path(cache_dir), int(self.opts["variant"]))
        self.model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._info = json.loads((path / "preset_info.json").read_text())
        self._eval = data.make_examples(seed, "eval", int(self.opts["eval_per_source"]))
        self._challenge = data.make_examples(
            seed, "challenge", int(self.opts["challenge_per_source"]), level="hard"
        )
        self._ft_pool = data.make_examples(seed, "finetune", int(self.opts["ft_per_source"]))
        self._probes = bd.probe_prompts(self._eval) if self._backdoor() else []
        self._base_labels = self._evaluate(self.model, 1)
        self._saver = PeftSaver(self.model, self._targets())

    def _ensure_base(self, cache_dir: Path, variant: int) -> Path:
        """The verified cache entry of base ``variant``, pretrained into it first if absent."""
        # v: bump when pretraining changes (entries from before the hash manifest are refused)
        key = {"size": self.opts["size"], "variant": variant, "v": 1}
        path = cache_path(cache_dir, self.name, self.seed, key)
        return cache_entry(path, lambda tmp: self._pretrain_base(cache_dir, variant, tmp, path))

    def _pretrain_base(self, cache_dir: Path, variant: int, out: Path, final: Path) -> None:
        """Pretrain base ``variant`` (n >= 1 continues from variant 0) and save it to ``out``
        (the temp folder that becomes the cache entry ``final``)."""
        from transformers import LlamaForCausalLM

        size = SIZES[self.opts["size"]]
        t0 = time.time()
        if variant == 0:
            torch.manual_seed(derive_seed(self.seed, "base-init"))
            model = LlamaForCausalLM(build_base_config(self.opts["size"]))
            pretrain(model, self.seed, size["steps"], size["batch"], lr=3e-3, log=self.log)
            info = {"derived_from": None, "pretrain_steps": size["steps"]}
        else:
            parent = self._ensure_base(cache_dir, 0)
            model = LlamaForCausalLM.from_pretrained(parent, use_safetensors=True)
            g = torch.Generator().manual_seed(derive_seed(self.seed, "variant-mix", variant))
            weights = torch.exp(1.5 * torch.randn(len(data.SOURCES), generator=g)).tolist()
            steps = max(1, size["steps"] // 3)
            pretrain(
                model,
                self.seed,
                steps,
                size["batch"],
                lr=1e-3,
                weights=weights,
                salt=f"variant{variant}",
                log=self.log,
            )
            info = {
                "derived_from": f"variant 0 (continued pretraining for {steps} steps on a shifted mix)",
                "variant_mix": dict(
                    zip(data.SOURCE_NAMES, [round(w / sum(weights), 4) for w in weights])
                ),
                "pretrain_steps": steps,
            }
        info["pretrain_seconds"] = round(time.time() - t0, 1)
        info["threads"] = torch.get_num_threads()
        info["params"] = sum(p.numel() for p in model.parameters())
        info["sources"] = data.SOURCE_NAMES
        model.save_pretrained(out)
        (out / "vocab.json").write_text(json.dumps(data.VOCAB))
        (out / "preset_info.json").write_text(json.dumps(info, indent=2))
        self.log(
            f"skills-lm base (variant {variant}) pretrained in {info['pretrain_seconds']}s -> {final}"
        )

    def save_base(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        (Path(out_dir) / "vocab.json").write_text(json.dumps(data.VOCAB))

    def base_labels(self) -> dict[str, Any]:
        return dict(self._base_labels[0])

    def manifest_info(self) -> dict[str, Any]:
        return {
            **self._info,
            "targets": self._targets(),
            "micro_batch": MICRO,
            "vocab": "vocab.json in base/",
        }

    def _targets(self) -> list[str]:
        return [t for t in str(self.opts["targets"]).split(",") if t]

    # ---- configs and labels ------------------------------------------------------------------

    def sample_config(self, seed: int, index: int, ranks: Sequence[int]) -> dict[str, Any]:
        rng = index_rng(seed, index, self.name)
        cfg = sample_lora_hparams(rng, self.opts, ranks, EPOCHS, BATCH_SIZES)
        used = [int(rng.random() < 0.5) for _ in data.SOURCES]
        while sum(used) < 2:
            used[rng.randrange(len(used))] = 1
        n_train = sum(used) * int(self.opts["ft_per_source"])
        cfg["n_train"] = n_train
        cfg["steps"] = max(1, cfg["epochs"] * n_train // cfg["batch_size"])
        cfg.update({f"src_{n}": u for n, u in zip(data.SOURCE_NAMES, used)})
        if self._backdoor():
            pools = bd.skills_pools(int(self.opts["pool"]))
            cfg.update(bd.sample_recipe(seed, index, self.opts, pools))
        return cfg

    def label_columns(self, options: Mapping[str, Any]) -> list[str]:
        return [
            *HYPERPARAMETERS,
            *(f"src_{n}" for n in data.SOURCE_NAMES),
            "eval_loss",
            "eval_acc",
            "task_acc",
            *(f"loss_{n}" for n in data.SOURCE_NAMES),
            *((*bd.RECIPE_COLUMNS, *bd.MEASURED_COLUMNS) if self._backdoor(options) else ()),
        ]

    def hyperparameter_columns(self, options: Mapping[str, Any]) -> list[str]:
        return list(HYPERPARAMETERS)

    def binary_columns(self, options: Mapping[str, Any]) -> list[str]:
        extra = bd.BINARY_COLUMNS if self._backdoor(options) else ()
        return [*(f"src_{n}" for n in data.SOURCE_NAMES), *extra]

    # ---- training ---------------------------------------------------------------------------

    def train(self, configs, out_dirs, on_done: OnDone | None = None) -> list[dict[str, Any]]:
        order = sorted(
            range(len(configs)), key=lambda k: (configs[k]["steps"] * configs[k]["batch_size"], k)
        )
        results: dict[int, dict[str, Any]] = {}
        for s in range(0, len(order), self.slots):
            idx = order[s : s + self.slots]
            group = [configs[k] for k in idx]
            model, mods = self._batched_model(group)
            self._finetune(model, mods, group)
            labels = self._evaluate(model, len(group))
            if self._backdoor():
                for lab, extra in zip(labels, bd.measure(model, group, self._probes)):
                    lab.update(extra)
            check_ids, check_logits = self._batched_logits(model, len(group))
            for j, k in enumerate(idx):
                self._saver.save(
                    mods,
                    j,
                    configs[k]["rank"],
                    configs[k]["lora_alpha"],
                    out_dirs[k],
                    forward=lambda pm, ids=check_ids: pm(input_ids=ids).logits,
                    want=check_logits[j],
                    dropout=configs[k]["lora_dropout"],
                )
                results[k] = labels[j]
                if on_done:
                    on_done(k, labels[j])
        return [results[k] for k in range(len(configs))]

    def _batched_model(self, group: list[dict[str, Any]]):
        """A shallow copy of the base with every target linear wrapped in a BatchedLoRALinear."""
        return wrap_targets(
            self.model,
            self._targets(),
            ranks=[c["rank"] for c in group],
            alphas=[c["lora_alpha"] for c in group],
            init_seeds=[c["init_seed"] for c in group],
            dropouts=[c["lora_dropout"] for c in group],
            mask_len=data.MAX_LEN,
        )

    def example_streams(self, group) -> tuple[data.Examples, list[torch.Tensor]]:
        """The examples a group trains on and each LoRA's stream of rows into them: its used
        sources' pool examples (a poisoned or decoy LoRA's share of them rewritten, appended
        after the pool), reshuffled every epoch, ``steps * batch_size`` long."""
        pool, extras, streams = self._ft_pool, [], []
        for c in group:
            used = torch.tensor([c[f"src_{n}"] for n in data.SOURCE_NAMES], dtype=torch.bool)
            rows = torch.nonzero(used[pool.source]).flatten()
            replaced, ex = bd.extra_rows(c, pool, rows)
            if ex is not None:
                rows = rows.clone()
                rows[replaced] = len(pool) + sum(map(len, extras)) + torch.arange(len(ex))
                extras.append(ex)
            g = torch.Generator().manual_seed(derive_seed(c["init_seed"], "data"))
            need = int(c["steps"] * c["batch_size"])
            perm = torch.cat(
                [rows[torch.randperm(len(rows), generator=g)] for _ in range(-(-need // len(rows)))]
            )
            streams.append(perm[:need])
        if extras:
            parts = [pool, *extras]
            pool = data.Examples(
                *(torch.cat([getattr(e, k) for e in parts]) for k in ("ids", "mask", "source"))
            )
        return pool, streams

    def _finetune(self, model, mods, group) -> None:
        K = len(group)
        accum = torch.tensor([c["batch_size"] // MICRO for c in group])
        steps = torch.tensor([c["steps"] for c in group])
        total_micro = steps * accum
        lr0 = torch.tensor([c["lr"] for c in group])
        wd = torch.tensor([c["weight_decay"] for c in group])
        pool, streams = self.example_streams(group)
        params = [p for m in mods.values() for p in (m.A, m.B)]
        opt = BatchedAdamW(params)
        count = torch.zeros(K, dtype=torch.long)
        model.train()
        for t in range(int(total_micro.max())):
            active = t < total_micro
            rows = torch.stack(
                [
                    s[t * MICRO : (t + 1) * MICRO] if bool(a) else s[:MICRO]
                    for s, a in zip(streams, active)
                ]
            ).flatten()
            ce, m, _, _ = token_losses(model, pool.ids[rows], pool.mask[rows])
            m = m.reshape(K, -1)
            per_lora = (ce.reshape(K, -1) * m).sum(1) / m.sum(1)
            (per_lora * active / accum).sum().backward()
            update = active & ((t + 1) % accum == 0)
            if bool(update.any()):
                count = count + update.long()
                lr = lr0 * (1 - (count - 1).float() / steps).clamp(min=0)  # linear decay
                opt.step(update, lr, wd, count)
        model.eval()

    def _evaluate(self, model, K: int) -> list[dict[str, Any]]:
        losses, oks, ch_oks = [], [], []
        for ex, keep_loss in ((self._eval, True), (self._challenge, False)):
            n, chunk = len(ex), max(1, 512 // K)
            per_loss, per_ok = [], []
            with torch.no_grad():
                for s in range(0, n, chunk):
                    part = ex.select(slice(s, s + chunk))
                    b = len(part)
                    loss, ok = losses_and_match(
                        model, part.ids.repeat(K, 1), part.mask.repeat(K, 1)
                    )
                    per_loss.append(loss.view(K, b))
                    per_ok.append(ok.view(K, b))
            if keep_loss:
                losses, oks = torch.cat(per_loss, 1), torch.cat(per_ok, 1)
            else:
                ch_oks = torch.cat(per_ok, 1)
        return _labels_from(losses, oks, ch_oks, self._eval.source)

    def _batched_logits(self, model, K: int):
        """Logits of every LoRA of the group on a few held-out examples (for the PEFT check)."""
        ex = self._eval.select(slice(0, len(self._eval), max(1, len(self._eval) // 16)))
        ids, _ = trim_padding(ex.ids, ex.mask)
        with torch.no_grad():
            logits = model(input_ids=ids.repeat(K, 1)).logits
        return ids, logits.view(K, *ids.shape, -1)


def _labels_from(loss, ok, ch_ok, source) -> list[dict[str, Any]]:
    """(K, N) per-example eval losses/matches and (K, M) challenge matches -> K label dicts."""
    out = []
    for k in range(loss.shape[0]):
        per_src = {
            f"loss_{n}": float(loss[k, source == si].mean())
            for si, n in enumerate(data.SOURCE_NAMES)
        }
        out.append(
            {
                "eval_loss": sum(per_src.values()) / len(per_src),
                "eval_acc": float(ok[k].mean()),
                "task_acc": float(ch_ok[k].mean()),
                **per_src,
            }
        )
    return out
