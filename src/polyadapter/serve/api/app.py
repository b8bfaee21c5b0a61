"""The FastAPI app over an :class:`~polyadapter.serve.Engine`: OpenAI's completions,
chat and models endpoints (``openai_routes``), vLLM's adapter load/unload endpoints
(``admin_routes``), health and Prometheus metrics. Thin by design: routes validate,
map OpenAI fields to a setup and :class:`SamplingParams`, and stream from handles;
keys, queue limits and metrics live here, batching and paging in the engine."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from . import admin_routes, errors, openai_routes
from .auth import Keys
from .errors import APIError
from .metrics import Metrics


@dataclass
class Settings:
    model_id: str                        # the base's name in the API's ``model`` field
    model_root: str = ""                 # where the base came from (``/v1/models``' root)
    keys: Keys = field(default_factory=Keys)
    max_queue: int = 64                  # requests waiting behind a full running batch before 429
    adapter_dirs: list[Path] = field(default_factory=list)   # where load_lora_adapter may read folders
    store_dir: Path | None = None        # the store (its adapters load by ``store:REF``)


class Admission:
    """Requests accepted and not finished; beyond the engine's running batch plus
    ``max_queue`` waiting, new requests get 429 with Retry-After."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0
        self._lock = threading.Lock()

    def enter(self, n: int) -> None:
        with self._lock:
            if self.in_flight + n > self.limit:
                raise APIError(429, f"the server is full ({self.in_flight} requests in flight, limit "
                                    f"{self.limit}); retry shortly", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
            self.in_flight += n

    def leave(self, n: int) -> None:
        with self._lock:
            self.in_flight -= n


@dataclass
class Server:
    engine: object
    settings: Settings
    admission: Admission
    metrics: Metrics
    started: float = field(default_factory=time.time)
    aliases: dict = field(default_factory=dict)   # ``NAME@VERSION`` -> the engine's adapter name
    settling: set = field(default_factory=set)    # tasks that free admission slots when requests end


def create_app(engine, settings: Settings) -> FastAPI:
    admission = Admission(engine.scheduler.max_num_seqs + settings.max_queue)
    server = Server(engine, settings, admission, Metrics(engine, admission))
    app = FastAPI(title="polyadapter", version=_version(),
                  description="OpenAI-compatible API over one base model and many adapters")
    app.state.server = server
    errors.install(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)

    @app.get("/health")
    def health():
        if not engine.healthy:
            return JSONResponse({"status": "error", "error": "the engine is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _version() -> str:
    from ..._version import __version__
    return __version__
