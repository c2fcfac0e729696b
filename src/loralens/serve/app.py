"""The screening service: a FastAPI app over a pool of worker processes.

``POST /api/screen`` takes one adapter upload and answers :func:`loralens.screening.
screen_adapter`'s report; ``GET /api/runs`` the runs' summaries; ``GET /api/health``; ``GET /``
the page. The server process never parses an upload: it streams the body to a temp folder of its
own (removed whatever happens) and hands the path to a worker, which has a time limit.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from loralens.serve import jobs
from loralens.serve.errors import Refused
from loralens.serve.report import asset
from loralens.serve.unpack import Limits
from loralens.serve.upload import receive_file
from loralens.serve.workers import TimeLimit, WorkerFailed, WorkerPool

#: the page's Content-Security-Policy: nothing but this server's own files
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ServeConfig:
    """How the service runs; sizes in bytes, times in seconds."""

    runs: list[str]
    max_upload_bytes: int = 512 * 2**20
    #: worker processes (screenings at once)
    max_concurrent: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: uploads that may wait for a worker beyond those; more get 503 + Retry-After
    max_queue: int | None = None
    time_limit_s: float = 60.0
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    worker_memory_mb: int | None = 4096
    #: Host headers accepted (None: any); a loopback server names its own, against DNS rebinding
    allowed_hosts: list[str] | None = None
    retry_after_s: int = 2

    @property
    def capacity(self) -> int:
        queue = self.max_queue if self.max_queue is not None else 2 * self.max_concurrent
        return self.max_concurrent + queue


class Service:
    """The workers, the temp folder and the count of screenings in flight."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pool: WorkerPool | None = None
        self.tmp_root: Path | None = None
        self.runs: list[dict[str, Any]] = []
        self.in_flight = 0
        #: screen requests answered (any status) since the start
        self.answered = 0

    def start(self) -> None:
        """Start the workers and load the runs (raises RuntimeError naming a run that fails)."""
        if self.pool is not None:
            return
        cfg = self.config
        self.tmp_root = Path(tempfile.mkdtemp(prefix="loralens-serve-"))
        self.pool = WorkerPool(
            cfg.max_concurrent,
            jobs.load_runs,
            (list(cfg.runs),),
            jobs.handle,
            memory_mb=cfg.worker_memory_mb,
            preload=jobs.PRELOAD,
        )
        try:
            self.pool.wait_ready()
            self.runs = self.pool.call(("runs",), cfg.time_limit_s)[1]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.tmp_root is not None:
            shutil.rmtree(self.tmp_root, ignore_errors=True)
            self.tmp_root = None

    async def screen(self, request: Request) -> dict[str, Any]:
        """Admit, receive, screen and clean up one upload."""
        cfg = self.config
        if self.in_flight >= cfg.capacity:
            raise Refused(
                503,
                f"busy: {self.in_flight} screenings in progress; retry later",
                {"Retry-After": str(cfg.retry_after_s)},
            )
        assert self.pool is not None and self.tmp_root is not None, "service not started"
        self.in_flight += 1
        workdir = Path(tempfile.mkdtemp(dir=self.tmp_root))
        try:
            upload = workdir / "upload"
            try:
                name = await asyncio.wait_for(
                    receive_file(request.headers, request.stream(), upload, cfg.max_upload_bytes),
                    cfg.time_limit_s,
                )
            except asyncio.TimeoutError:
                raise Refused(
                    408, f"the upload did not arrive within {cfg.time_limit_s:g} s"
                ) from None
            payload = ("upload", str(upload), name, str(workdir), cfg.limits)
            try:
                result = await anyio.to_thread.run_sync(self.pool.call, payload, cfg.time_limit_s)
            except TimeLimit as e:
                raise Refused(422, f"{name}: screening {e}; the file is refused") from None
            except WorkerFailed as e:
                raise Refused(500, f"{name}: screening failed: {e}") from None
            if result[0] == "refused":
                raise Refused(result[1], result[2])
            return result[1]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self.in_flight -= 1


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _SecurityHeaders:
    """Adds headers that keep the page and the API from being framed, sniffed or cached."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(service: Service) -> FastAPI:
    """The ASGI app; it starts ``service`` (unless started) and closes it with its lifespan."""
    cfg = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.close)

    def authorized(request: Request) -> None:
        if cfg.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.token}".encode()):
            raise Refused(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="loralens screening service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    api = [Depends(authorized)]

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), dict(e.headers or {}))

    @app.get("/api/health", dependencies=api)
    async def health() -> dict[str, Any]:
        from loralens import __version__

        return {
            "status": "ok",
            "version": __version__,
            "runs": len(service.runs),
            "workers": cfg.max_concurrent,
            "in_flight": service.in_flight,
            "answered": service.answered,
            "capacity": cfg.capacity,
            "max_upload_bytes": cfg.max_upload_bytes,
        }

    @app.get("/api/runs", dependencies=api)
    async def runs() -> list[dict[str, Any]]:
        return service.runs

    @app.post("/api/screen", dependencies=api)
    async def screen(request: Request) -> Response:
        try:
            return JSONResponse(await service.screen(request))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        finally:
            service.answered += 1  # every screen request, refused or not (the load test counts)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(asset("index.html"))

    app.mount("/static", StaticFiles(packages=[("loralens.serve", "static")]), name="static")
    app.add_middleware(_SecurityHeaders)
    if cfg.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.allowed_hosts)
    return app


__all__ = ["ServeConfig", "Service", "create_app"]
