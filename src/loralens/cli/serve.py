"""`loralens serve` (the screening service and its page) and `loralens screen` (the same
screening for a folder of adapters)."""

from __future__ import annotations

import ipaddress

import typer

from loralens.cli.common import EXIT_USAGE, fail, user_errors
from loralens.cli.options import (
    Overwrite,
    WorkerMemory,
    positive_finite,
    time_limit_option,
    workers_option,
)

commands = typer.Typer()

SERVE_EXTRA = "the service needs its extra: pip install 'loralens[serve]'"


def is_loopback(host: str) -> bool:
    """True for names and addresses only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@commands.command(
    epilog="Examples:\n\n"
    "  loralens serve runs/glnet runs/membership   (or: --runs runs/glnet runs/membership)\n\n"
    "  LORALENS_SERVE_TOKEN=secret loralens serve runs/glnet --host 0.0.0.0\n\n"
    "Then open http://127.0.0.1:8000/ or POST a file: curl -F file=@my_lora.safetensors "
    "http://127.0.0.1:8000/api/screen"
)
def serve(
    run_args: list[str] = typer.Argument(
        None, metavar="[RUN...]", help="Run directories (of `loralens train`) to predict with."
    ),
    runs: list[str] = typer.Option(
        None, help="The same run directories as an option: --runs A B ..."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind; not loopback needs --token."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    max_upload_mb: float = typer.Option(
        512, callback=positive_finite, help="Largest upload accepted, in MB."
    ),
    max_concurrent: int = workers_option(
        None, "Worker processes screening at once (default: CPU count)"
    ),
    max_queue: int = typer.Option(
        None,
        min=0,
        help="Uploads waiting for a worker beyond those (default: 2x workers); more get 503.",
    ),
    time_limit: float = time_limit_option(
        "Seconds an upload may take to arrive, and again to screen."
    ),
    token: str = typer.Option(
        None,
        envvar="LORALENS_SERVE_TOKEN",
        help="Bearer token required on every API call (or set LORALENS_SERVE_TOKEN).",
    ),
    worker_memory_mb: WorkerMemory = 4096,
) -> None:
    """Serve a web page and an API that screen uploaded LoRA adapters.

    An upload (a .safetensors file, or a .zip/.tar of a PEFT folder) is read in a worker
    process with a time and memory limit, never executed; the answer is its inspect report,
    sanity flags and each run's prediction. Binds 127.0.0.1 unless --host says otherwise; a
    bind other than loopback requires --token.
    """
    runs = [*(runs or []), *(run_args or [])]  # `--runs A B`: B arrives as an argument
    if not runs:
        fail("give the run directories to predict with: loralens serve RUN [RUN...]", EXIT_USAGE)
    if not is_loopback(host) and not token:
        fail(f"--host {host} is reachable from other machines: set --token too", EXIT_USAGE)
    try:
        import uvicorn

        from loralens.serve.app import ServeConfig, Service, create_app
    except ImportError:
        fail(SERVE_EXTRA, EXIT_USAGE)
    config = ServeConfig(
        runs=list(runs),
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_queue=max_queue,
        time_limit_s=time_limit,
        token=token or None,
        worker_memory_mb=worker_memory_mb or None,
        allowed_hosts=["127.0.0.1", "localhost", "[::1]", host] if is_loopback(host) else None,
    )
    if max_concurrent:
        config.max_concurrent = max_concurrent
    service = Service(config)
    typer.echo(f"loading {len(runs)} run(s) in {config.max_concurrent} worker(s) ...", err=True)
    try:
        service.start()
    except RuntimeError as e:
        fail(str(e))
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"screening at http://{shown}:{port}/ (Ctrl-C stops)", err=True)
    try:
        uvicorn.run(
            create_app(service),
            host=host,
            port=port,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=config.capacity + 64,
            timeout_graceful_shutdown=int(time_limit) + 5,
            log_level="warning",
        )
    finally:
        service.close()


@commands.command(
    epilog="Examples:\n\n"
    "  loralens screen hub-mirror/ --runs runs/glnet runs/membership --out report.jsonl\n\n"
    "  loralens screen uploads/ --runs runs/glnet --out report.jsonl --html report.html\n\n"
    "  loralens screen /shared/hub/ --runs /shared/runs/glnet --out report.jsonl --ray auto  "
    "(on a Ray cluster; see docs/clusters.md)\n\n"
    "Run it again after an interruption: adapters already in the report are skipped."
)
def screen(
    paths: list[str] = typer.Argument(
        ...,
        metavar="DIR",
        help="The folder of adapters (then any further run directories of --runs).",
    ),
    runs: list[str] = typer.Option(..., help="Run directories to predict with: --runs A B ..."),
    out: str = typer.Option(
        ..., help="The report: one JSON line per adapter, appended to a report already there."
    ),
    html: str = typer.Option(None, help="Also write the whole report as one HTML page."),
    overwrite: Overwrite = False,
    workers: int = workers_option(
        1, "Worker processes screening at once, no more than adapters (with --ray: unused)"
    ),
    time_limit: float = time_limit_option("Seconds one adapter may take."),
    worker_memory_mb: WorkerMemory = 4096,
    ray: str = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help="One Ray task per adapter: 'local' starts a Ray on this machine, 'auto' joins "
        "RAY_ADDRESS (or the Ray running here), HOST:PORT joins that cluster (DIR and the runs "
        "at the same paths on every node). Exit 1 if a task failed (its worker died after Ray's "
        "retries, or it raised): a rerun screens its adapter again. Needs pip install 'loralens\\[ray]'.",
    ),
) -> None:
    """Screen every adapter in a folder (PEFT folders, .safetensors files, .zip/.tar archives)
    like `loralens serve` does: inspect report, flags and each run's prediction, one JSON line
    each. Resumable; a file that cannot be read gets an error line and the batch goes on; so
    do named pipes, devices and links leading out of the folder, at once. --out is resumed
    when it is a screen report and refused when it is anything else; --html is replaced only
    with --overwrite and only when it is a loralens report."""
    from functools import partial
    from pathlib import Path

    from rich.markup import escape

    from loralens.cli.common import progress
    from loralens.learn.runs.standing import standing_line
    from loralens.screening import load_screening_runs
    from loralens.serve.batch import fit_marks, screen_folder
    from loralens.serve.ray_screen import screen_folder_ray
    from loralens.serve.report import html_replaces, write_html

    folder, runs = paths[0], [*runs, *paths[1:]]  # `--runs A B`: B arrives as an argument
    with user_errors():
        replace_html = html_replaces(Path(html), overwrite) if html else False
    with progress() as bar:
        task = bar.add_task("screening", total=None)

        def started(summary) -> None:
            bar.update(task, total=summary.found, completed=summary.skipped)

        def finished(record) -> None:
            bar.advance(task)
            if "error" in record:
                bar.console.print(f"[yellow]{record['error']}[/yellow]", soft_wrap=True)
            for mark in fit_marks(record):
                bar.console.print(f"! {escape(record['path'])}: {escape(mark)}", soft_wrap=True)

        run = (
            partial(screen_folder_ray, address=ray)
            if ray
            else partial(screen_folder, workers=workers)
        )
        with user_errors():
            try:
                summary = run(
                    folder,
                    runs,
                    out,
                    time_limit_s=time_limit,
                    worker_memory_mb=worker_memory_mb or None,
                    on_start=started,
                    on_result=finished,
                )
            except RuntimeError as e:  # a worker that could not start
                fail(str(e))
    with user_errors():
        loaded = load_screening_runs(runs)
        if html:
            summaries = [r.summary() for r in loaded]
            write_html(Path(out), Path(html), summaries, replace=replace_html)
    typer.echo(
        f"{summary.found} adapter(s) in {folder}: {summary.screened} screened "
        f"({summary.errors} could not be), {summary.skipped} already in {out}; "
        f"{summary.flagged} flagged by a run's fit check, {summary.misfit} not fitting a run "
        "(marked ! above)" + (f"; wrote {html}" if html else "")
    )
    for srun in loaded:
        typer.echo(f"{srun.name}: {standing_line(srun.run.standing)}")
    if summary.lost:
        fail(
            f"{summary.lost} adapter(s) not screened, their Ray task failed (lines of status "
            f"503 in {out}); the same command screens them again"
        )
