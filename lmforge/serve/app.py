"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat page over one checkpoint.

    lmforge serve --checkpoint runs/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (the tokenizer's chat template;
`stream: true` sends server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
`/health` (scheduler counters) and `/` (the chat page). Request handlers only check requests and
relay events: one background thread runs the model for every request (`scheduler.py`).
"""

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.runtime import resolve_device
from lmforge.model import load_model
from lmforge.serve.protocol import (
    ApiError,
    GenRequest,
    Kind,
    ModelInfo,
    chunk,
    error_body,
    new_id,
    parse_json,
    parse_request,
    response,
    sse,
    usage,
)
from lmforge.serve.scheduler import Delta, Event, Failed, Job, Scheduler, SchedulerBusy
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import stop_token_ids

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def create_app(model: nn.Module, tokenizer: Tokenizer, name: str, max_batch: int = 16,
               max_concurrent: int = 64) -> Any:
    """A FastAPI app serving `model` as `name`; its scheduler thread runs while the app is up
    (`app.state.scheduler` exposes it, e.g. to tests). No `from __future__ import annotations` in this
    module: FastAPI reads the route functions' annotations, and their types are imported here, locally."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                           f"{model.cfg.vocab_size}")
    if model.cfg.arch == "encdec" or model.cfg.prefix_lm:  # the scheduler prefills causally, decoder-only
        kind = "an encoder-decoder (model.arch='encdec')" if model.cfg.arch == "encdec" else "a prefix LM"
        raise LmforgeError(f"serve does not run {kind} yet: its scheduler decodes causal decoder-only models; "
                           "use lmforge generate, chat or eval for this checkpoint")
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_concurrent=max_concurrent)
    info = ModelInfo(name, tokenizer, scheduler.context, stop_token_ids(tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "lmforge", "max_model_len": info.context_length}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                **dataclasses.asdict(scheduler.stats)}

    async def generate(kind: Kind, request: Request) -> Any:
        req = parse_request(kind, parse_json(await request.body()), info)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(req.prompt_ids, req.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), req.stop)
        try:
            scheduler.submit(job)
        except SchedulerBusy as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        rid = new_id(kind)
        if req.stream:
            return StreamingResponse(stream(kind, rid, req, job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(kind, rid, job, events, request)

    async def stream(kind: Kind, rid: str, req: GenRequest, job: Job,
                     events: asyncio.Queue[Event]) -> AsyncIterator[str]:
        """SSE events until the job ends; if the client goes away first, the job is cancelled (slot freed)."""
        done = False
        try:
            if kind == "chat":
                yield sse(chunk(kind, rid, name, text="", role=True))
            while True:
                ev = await events.get()
                if isinstance(ev, Delta):
                    yield sse(chunk(kind, rid, name, text=ev.text))
                    continue
                done = True
                if isinstance(ev, Failed):
                    yield sse(error_body(ev.message, "server_error"))
                else:
                    yield sse(chunk(kind, rid, name, finish_reason=ev.finish_reason))
                    if req.include_usage:
                        yield sse(chunk(kind, rid, name, usage_counts=usage(ev.prompt_tokens, ev.completion_tokens)))
                yield sse("[DONE]")
                return
        finally:
            if not done:
                scheduler.cancel(job)

    async def collect(kind: Kind, rid: str, job: Job, events: asyncio.Queue[Event], request: Request) -> Any:
        pieces = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(job)
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if isinstance(ev, Delta):
                    pieces.append(ev.text)
                elif isinstance(ev, Failed):
                    return JSONResponse(error_body(ev.message, "server_error"), status_code=500)
                else:
                    return response(kind, rid, name, "".join(pieces), ev.finish_reason, ev.prompt_tokens,
                                    ev.completion_tokens)
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate("chat", request)

    return app


class BackgroundServer:
    """uvicorn serving an app from a daemon thread (tests and benchmarks); port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="lmforge-uvicorn", daemon=True)
        self.host, self.port = host, port

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class ServeConfig:
    checkpoint: str = option(help="model directory (config.json + model.safetensors + tokenizer.json)")
    tokenizer: str = option("", "tokenizer directory; empty uses the checkpoint's")
    name: str = option("", "model name clients ask for; empty uses the checkpoint directory's name")
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "TCP port")
    max_batch: int = option(16, "most requests decoded together (KV cache rows, each max_seq_len long)")
    max_concurrent: int = option(64, "most requests running or waiting; more get HTTP 429")
    device: str = option("auto", "auto, cpu, cuda, ...")


def serve_cmd(cfg: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn: pip install 'lmforge[serve]'") from None

    model = load_model(cfg.checkpoint, device=resolve_device(cfg.device))
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.checkpoint)
    name = cfg.name or Path(cfg.checkpoint).resolve().name
    app = create_app(model, tokenizer, name, cfg.max_batch, cfg.max_concurrent)
    print(f"serving '{name}' on http://{cfg.host}:{cfg.port} (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
