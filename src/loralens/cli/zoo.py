"""`loralens zoo build`, `merge` and `samples`: datasets of real LoRA finetunes."""

from __future__ import annotations

from functools import partial

import typer

from loralens.cli.common import EXIT_USAGE, fail, user_errors

app = typer.Typer(help="Build datasets ('zoos') of real LoRA finetunes.", no_args_is_help=True)


def _parse_options(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option takes key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@app.command(
    "build",
    epilog="Examples:\n\n"
    "  loralens zoo build --preset skills-lm --num 500 --out zoos/skills-lm-500\n\n"
    "  loralens zoo build --preset skills-lm --num 2200 --first 2000 --ranks 1,2,4,8,16 "
    "--out zoos/ranks  (200 recipes unseen by a 2,000-LoRA zoo)\n\n"
    "  loralens zoo build --preset skills-lm --num 2000 --shard 0/2 --out zoos/s0 &  "
    "(and --shard 1/2 --out zoos/s1; then loralens zoo merge zoos/all zoos/s0 zoos/s1)\n\n"
    "  loralens zoo build --preset skills-lm --num 2000 --ray auto --out /shared/zoos/s  "
    "(on a Ray cluster; see docs/clusters.md)\n\n"
    "  loralens zoo build --base-model gpt2 --text-file corpus.txt --num 100 --out zoos/gpt2",
)
def build(
    out: str = typer.Option(..., help="Zoo folder (created, or resumed/extended if it exists)."),
    preset: str = typer.Option(
        None, help="Preset name (default skills-lm; causal-lm with --base-model)."
    ),
    num: int = typer.Option(16, help="Number of LoRAs (LoRA i depends only on seed and i)."),
    seed: int = typer.Option(0, help="Zoo seed (base model and every LoRA's hyperparameters)."),
    ranks: str = typer.Option("4", help="Comma-separated LoRA ranks to draw from, e.g. 1,2,4,8."),
    shard: str = typer.Option(None, help="i/k: build only the LoRAs with index % k == i."),
    first: int = typer.Option(
        0,
        help="Build LoRAs first..num-1 only: a held-out zoo whose recipes a zoo of "
        "--num FIRST (same seed) never saw.",
    ),
    cache_dir: str = typer.Option(
        None, help="Base model cache (default $LORALENS_CACHE or ~/.cache/loralens)."
    ),
    base_variant: int = typer.Option(
        None,
        help="skills-lm: use base variant N (the base further pretrained on a shifted mix).",
    ),
    base_model: str = typer.Option(
        None, help="Generic mode: any transformers causal LM (name or path)."
    ),
    text_file: str = typer.Option(None, help="Generic mode: a text file to finetune on."),
    dataset: str = typer.Option(
        None, help="Generic mode: a datasets name (or name:config) instead."
    ),
    option: list[str] = typer.Option(
        None, "--option", "-o", help="Preset option key=value (repeatable)."
    ),
    threads: int = typer.Option(
        1,
        help="Torch threads. 1 is fastest per core for these small models; use shards for more cores.",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", help="Print nothing but errors: no log lines, progress bars or summary."
    ),
    ray: str = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help="Build as Ray tasks: 'local' starts a Ray on this machine, 'auto' joins RAY_ADDRESS "
        "(or the Ray running here), HOST:PORT joins that cluster (OUT and --cache-dir on a shared "
        "filesystem). Needs pip install 'loralens\\[ray]'.",
    ),
    ray_gpus: float = typer.Option(
        0,
        "--ray-gpus",
        metavar="N",
        help="With --ray: GPUs each task asks for (1, or a fraction like 0.5 to run two tasks "
        "per GPU); for presets that train on CUDA (causal-lm).",
    ),
) -> None:
    """Build (or resume, or extend) a zoo of real PEFT LoRA finetunes with measured labels."""
    from loralens.zoo.builder import build_zoo
    from loralens.zoo.ray_build import build_zoo_ray

    opts: dict[str, str] = _parse_options(option)
    name = preset or ("causal-lm" if base_model else "skills-lm")
    if base_variant is not None:
        opts["variant"] = str(base_variant)
    for key, value in (
        ("base_model", base_model),
        ("text_file", text_file),
        ("dataset", dataset),
    ):
        if value is not None:
            opts[key] = value
    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise typer.BadParameter(f"--ranks takes integers like 1,2,4, got {ranks!r}") from None
    if ray_gpus and ray is None:
        fail("--ray-gpus asks Ray for GPUs: give --ray too", EXIT_USAGE)
    with user_errors():
        run = partial(build_zoo_ray, address=ray, gpus=ray_gpus) if ray else build_zoo
        run(
            name,
            num,
            out,
            seed=seed,
            ranks=rank_list,
            shard=shard,
            first=first,
            cache_dir=cache_dir,
            options=opts,
            threads=threads,
            quiet=quiet,
        )


@app.command(
    "merge",
    epilog="Example:\n\n  loralens zoo merge zoos/all zoos/shard0 zoos/shard1",
)
def merge(
    out: str = typer.Argument(..., help="The merged zoo folder (may already be a zoo)."),
    shards: list[str] = typer.Argument(..., help="Shard folders built with --shard."),
) -> None:
    """Join zoo shards; refuses shards with another preset, seed, options, ranks or base model."""
    from loralens.zoo.merge import merge_zoos

    with user_errors():
        merge_zoos(out, shards)


@app.command(
    "samples",
    epilog="Example:\n\n  loralens zoo samples zoos/digits-dreambooth-500 --adapter 000007 --out grid.png",
)
def samples(
    zoo: str = typer.Argument(..., help="A zoo folder of a digits preset."),
    adapter: str = typer.Option(
        ..., help="Adapter name in ZOO/adapters (e.g. 000007) or a folder."
    ),
    out: str = typer.Option("samples.png", help="PNG file to write."),
    prompt: list[str] = typer.Option(
        None,
        "--prompt",
        "-p",
        help="Prompt (repeatable; default: the adapter's own and a few others).",
    ),
    seeds: int = typer.Option(6, help="Sampling seeds (grid columns)."),
    steps: int = typer.Option(None, help="DDIM steps (default: the zoo's sample_steps)."),
    guidance: float = typer.Option(None, help="Classifier-free guidance (default: the zoo's)."),
    threads: int = typer.Option(
        1, help="Torch threads (1 is fastest for this small model on a busy CPU)."
    ),
) -> None:
    """A PNG grid of images generated with and without one LoRA from the same seeds."""
    import torch

    from loralens.zoo.samples import render_samples

    torch.set_num_threads(max(1, threads))
    with user_errors():
        info = render_samples(
            zoo, adapter, out, prompts=prompt, seeds=seeds, steps=steps, guidance=guidance
        )
    typer.echo(
        f"wrote {out} ({info['size'][1]}x{info['size'][0]}): {len(info['prompts'])} prompts x base/LoRA x {seeds} seeds"
    )
