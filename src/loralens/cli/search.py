"""`loralens embed`, `index` (and `index verify`) and `search`: invariant embeddings of LoRAs
and nearest-adapter search."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from loralens.cli.common import EXIT_USAGE, console, echo_json, fail, num, user_errors
from loralens.cli.options import AsJson, OptionalStore, Overwrite, Store

commands = typer.Typer()


class _BuildUnlessVerify(TyperGroup):
    """`loralens index ...` builds an index; `loralens index verify PATH` checks one."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = ["build", *args]
        return super().parse_args(ctx, args)


index_app = typer.Typer(
    cls=_BuildUnlessVerify,
    help="Index a store's LoRA embeddings for search (`index verify PATH` checks one).",
)


def _run_and_rest(items: list[str], unsupervised: bool, what: str) -> tuple[str | None, list[str]]:
    """RUN then the rest, or (None, all) with --unsupervised."""
    if unsupervised:
        return None, items
    if not items:
        fail(f"give a run directory, or --unsupervised, then {what}", code=EXIT_USAGE)
    return items[0], items[1:]


@commands.command(
    epilog="Examples:\n\n"
    "  loralens embed runs/glnet --data zoo.store --out emb.npy\n\n"
    "  loralens embed runs/w2t my_adapter/ other.safetensors --out two.npy\n\n"
    "  loralens embed --unsupervised --data zoo.store --out spectral.npy   (no labels needed)"
)
def embed(
    items: list[str] = typer.Argument(None, help="RUN (unless --unsupervised), then adapters."),
    data: OptionalStore = None,
    unsupervised: bool = typer.Option(
        False,
        "--unsupervised",
        help="Spectral features (log relative singular values, log norms): no run.",
    ),
    out: str = typer.Option(..., help="Output .npy (N x D float32); OUT.json lists the rows."),
    overwrite: Overwrite = False,
) -> None:
    """Invariant embeddings of LoRAs: a trained model's representation before its head."""
    from loralens.search.embed import embed as embed_loras
    from loralens.search.embed import embedding_outputs, save_embeddings

    run, adapters = _run_and_rest(list(items or []), unsupervised, "--data STORE or adapters")
    if bool(data) == bool(adapters):
        fail("give either --data STORE or adapter files, not both", code=EXIT_USAGE)
    with user_errors():
        embedding_outputs(out, overwrite)  # refused before the work, not after
        names, vectors, desc = embed_loras(run=run, data=data, adapters=adapters)
        side = save_embeddings(out, names, vectors, desc, overwrite=overwrite)
    typer.echo(f"wrote {out} ({vectors.shape[0]} x {vectors.shape[1]}) and {side}")


@index_app.command(
    "build",
    epilog="Examples:\n\n"
    "  loralens index runs/w2t --data zoo.store --out zoo.idx\n\n"
    "  loralens index --unsupervised --data zoo.store --out zoo.idx\n\n"
    "  loralens index verify zoo.idx   (check an index: exit 0 ok, 1 damaged)",
)
def index(
    data: Store,
    run: str = typer.Argument(None, help="A run directory (omit with --unsupervised)."),
    unsupervised: bool = typer.Option(
        False, "--unsupervised", help="Index spectral features: no run needed."
    ),
    out: str = typer.Option(..., help="The index folder to write."),
    approximate: bool = typer.Option(
        None,
        "--approximate/--exact",
        help="HNSW graph or exact search (default: HNSW above 50,000 LoRAs if hnswlib is here).",
    ),
    overwrite: Overwrite = False,
    seed: int = typer.Option(0, help="Seed of the HNSW graph and of its recall sample."),
) -> None:
    """Index a store's LoRA embeddings for `loralens search` (the same as `loralens index
    build`); --overwrite replaces an index folder only."""
    from loralens.search.index import build_index

    if bool(run) == unsupervised:
        fail("give a run directory or --unsupervised (one of them)", code=EXIT_USAGE)
    with user_errors():
        meta = build_index(
            data, out, run=run, approximate=approximate, overwrite=overwrite, seed=seed
        )
    line = f"indexed {meta['n']} LoRAs ({meta['dim']} dims, {meta['backend']}) into {out}"
    if "recall_at_10_vs_exact" in meta:
        line += f"; recall@10 vs exact {meta['recall_at_10_vs_exact']:.3f}"
    typer.echo(line)


@index_app.command(
    "verify",
    epilog="Examples:\n\n  loralens index verify zoo.idx",
)
def verify(
    path: str = typer.Argument(..., help="An index folder written by `loralens index`."),
    as_json: AsJson = False,
) -> None:
    """Check an index as search would read it: its record's schema, the size and sha256 of its
    vectors (and graph), finite vectors, its run's checkpoint. Exit 0 when whole, 1 (naming
    the damaged file) when not."""
    from loralens.search.index import verify_index

    with user_errors():
        found = verify_index(path)
    if as_json:
        echo_json(found)
    else:
        typer.echo(f"{path}: ok ({found['n']} LoRAs, {found['dim']} dims, {found['backend']})")


@commands.command(
    epilog="Examples:\n\n"
    "  loralens search zoo.idx my_adapter/ -k 5\n\n"
    "  loralens search zoo.idx uploads/*.safetensors --json > neighbours.json"
)
def search(
    index_dir: str = typer.Argument(..., help="An index folder written by `loralens index`."),
    adapters: list[str] = typer.Argument(..., help="Query adapters: PEFT folders or LoRA files."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Neighbours per query."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='A JSON list of {"query", "neighbors": [{"adapter", "distance", ...}]}.',
    ),
) -> None:
    """The nearest adapters of the index to each query, with distances and labels."""
    from rich.table import Table

    from loralens.search.index import search as search_index

    with user_errors():
        rows = search_index(index_dir, adapters, k=k)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        table = Table(title=f"nearest to {row['query']}", title_justify="left")
        table.add_column("adapter")
        table.add_column("distance", justify="right")
        for nb in row["neighbors"]:
            table.add_row(str(nb["adapter"]), num(nb["distance"], ".4g"))
        console().print(table)
