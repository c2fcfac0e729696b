"""`loralens convert` (a LoRA in another format) and `loralens resize` (a LoRA at a lower rank)."""

from __future__ import annotations

import typer

from loralens.cli.common import console, echo_json, fail, num, user_errors
from loralens.cli.options import AsJson, share

commands = typer.Typer()
_TO_HELP = (
    "Output format: peft (a folder; any model, and the one for language-model LoRAs), or kohya "
    "or diffusers (a .safetensors file; Stable Diffusion and Flux pipeline LoRAs only)."
)


@commands.command(
    epilog="Examples:\n\n"
    "  loralens convert my_lora.safetensors peft_adapter/ --to peft\n\n"
    "  loralens convert peft_adapter/ pytorch_lora_weights.safetensors --to diffusers  "
    "(a diffusion LoRA)\n\n"
    "  loralens convert gpt2_lora.bin gpt2_adapter/ --to peft  (a language-model LoRA)",
)
def convert(
    src: str = typer.Argument(..., help="A LoRA: PEFT folder or .safetensors/.bin file."),
    out: str = typer.Argument(..., help="Where to write it (must not exist)."),
    to: str = typer.Option(..., "--to", help=_TO_HELP),
    as_json: AsJson = False,
) -> None:
    """Write a LoRA in another format (peft, kohya, diffusers), exactly.

    Each layer's rank and alpha are written as read, LyCORIS layers (LoHa, LoKr, LoCon-Tucker)
    as plain LoRA at their exact rank, module names as the target library loads them. kohya
    and diffusers files hold diffusion-pipeline LoRAs (UNet, text encoders, transformer): a
    language-model LoRA (GPT-2, Llama, ...) converts to peft only. A PEFT folder adapts one
    model, so a LoRA of a UNet and its text encoders converts to kohya or diffusers only.
    """
    from loralens.formats import convert as convert_lora
    from loralens.formats.convert import WRITERS

    if to not in WRITERS:
        fail(f"--to must be one of {', '.join(WRITERS)}, got {to!r}", 2)
    with user_errors():
        path = convert_lora(src, out, to=to)
    if as_json:
        echo_json({"source": src, "out": str(path), "format": to})
    else:
        typer.echo(f"wrote {path} ({to})")


@commands.command(
    epilog="Examples:\n\n"
    "  loralens resize my_lora.safetensors small.safetensors --rank 16\n\n"
    "  loralens resize adapter/ adapter_099/ --energy 0.99 --json",
)
def resize(
    src: str = typer.Argument(..., help="A LoRA: PEFT folder or .safetensors/.bin file."),
    out: str = typer.Argument(..., help="Where to write it (must not exist)."),
    rank: int = typer.Option(
        None, "--rank", min=1, help="Keep this many singular values per layer."
    ),
    energy: float = typer.Option(
        None,
        "--energy",
        callback=share,
        help="Keep the fewest singular values holding this share of |dW|_F^2 (0 to 1].",
    ),
    to: str = typer.Option(None, "--to", help=_TO_HELP + " Default: the input's format."),
    as_json: AsJson = False,
) -> None:
    """Resize a LoRA to a lower rank, optimally, reporting each layer's error.

    Each layer's delta W becomes its best rank-k approximation (Eckart-Young), computed from the
    factors (QR + SVD of an r x r core; no delta W is formed); the table shows each layer's
    Frobenius error, the root-sum-square of the dropped singular values.
    """
    from loralens.resize import resize_file

    if (rank is None) == (energy is None):
        fail("give exactly one of --rank and --energy", 2)
    with user_errors():
        path, rows = resize_file(src, out, rank=rank, energy=energy, to=to)
    if as_json:
        echo_json({"source": src, "out": str(path), "layers": rows})
        return
    from rich.table import Table

    table = Table(title=f"{src} -> {path}", title_justify="left")
    for column in ("layer", "out x in", "rank", "new rank", "|dW|_F", "error", "rel. error"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['shape'][0]}x{r['shape'][1]}",
            str(r["rank"]),
            str(r["new_rank"]),
            num(r["fro_norm"]),
            num(r["error"]),
            num(r["rel_error"]),
        )
    console().print(table)
