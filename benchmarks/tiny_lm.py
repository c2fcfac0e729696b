"""A tiny random-init byte-level language model and a structured corpus, for generic-mode zoos.

    python benchmarks/tiny_lm.py OUT_DIR --width 48 --layers 3 --seed 0 [--arch llama]

writes OUT_DIR/base (GPT2LMHeadModel, or with ``--arch llama`` a LlamaForCausalLM with grouped
key/value heads, so its ``k_proj``/``v_proj`` are narrower than ``q_proj``; safetensors, with a
256-token byte-level tokenizer: a folder without one gets an empty tokenizer from transformers 5,
which tokenizes to nothing)
and OUT_DIR/corpus.txt: 8 contiguous parts of different synthetic kinds of text (sums, word
lists, counting, mirrored strings, ...), so the causal-lm preset's parts differ and a LoRA's
held-out eval_loss depends on which parts it was trained on.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def make_base(path: Path, width: int, layers: int, seed: int, arch: str = "gpt2") -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=256, max_position_embeddings=128, hidden_size=width,
            intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=256, n_positions=128, n_embd=width, n_layer=layers, n_head=4,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(path, safe_serialization=True)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def make_corpus(path: Path, seed: int, size: int = 40000) -> None:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "lorem", "ipsum", "dolor", "amet", "sit"]

    def sums() -> str:
        pairs = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(5)]
        return " ".join(f"{a}+{b}={a + b}" for a, b in pairs)

    def mirror() -> str:
        s = "".join(rng.choice("xyzw") for _ in range(20))
        return s + "|" + s[::-1]

    kinds = [
        sums,
        lambda: " ".join(rng.choice(words) for _ in range(12)),
        lambda: "".join(rng.choice("abc") for _ in range(60)),
        lambda: " ".join(str(i) for i in range(rng.randint(0, 50), rng.randint(51, 80))),
        mirror,
        lambda: " ".join(w.upper() for w in rng.sample(words, 6)),
        lambda: "".join(chr(rng.randint(33, 126)) for _ in range(50)),
        lambda: " ".join(f"{w}{len(w)}" for w in rng.sample(words, 8)),
    ]
    parts = []
    for kind in kinds:
        lines: list[str] = []
        while sum(map(len, lines)) < size:
            lines.append(kind())
        parts.append("\n".join(lines))
    path.write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    make_base(a.out / "base", a.width, a.layers, a.seed, a.arch)
    make_corpus(a.out / "corpus.txt", a.seed)


if __name__ == "__main__":
    main()
