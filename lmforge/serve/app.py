"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat page over one checkpoint.

    lmforge serve --checkpoint runs/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (the tokenizer's chat template;
`stream: true` sends server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info` (lm-evaluation-harness's remote tokenizer),
`/health` (scheduler counters) and `/` (the chat page). Request handlers only check requests and
relay events: one background thread runs the model for every request (`scheduler.py`); JSON parsing,
templating and tokenizing run in a small thread pool, so a long prompt never stalls the event loop.
What reaches a route at all (Host, Origin, API key, content type, body size, timeouts) is
`security.py`'s.
"""

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.runtime import resolve_device
from lmforge.model import load_model
from lmforge.model.quant import QUANTIZE_HELP, Quantize, apply_quantize
from lmforge.peft.io import load_adapter
from lmforge.peft.lora import set_adapter
from lmforge.serve.grammar import Grammars
from lmforge.serve.protocol import (
    Answer,
    ApiError,
    GenRequest,
    Kind,
    ModelInfo,
    detokenize,
    error_body,
    new_id,
    parse_json,
    parse_request,
    sse,
    tokenize,
    tokenizer_info,
)
from lmforge.serve.scheduler import Event, Job, Scheduler, SchedulerBusy
from lmforge.serve.security import DEFAULT_MAX_BODY_BYTES, Guard, Policy, timed_h11_protocol
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import stop_token_ids

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
PARSE_THREADS = 2  # requests parsed and tokenized at once (each may hold a few times --max-body-bytes)
API_KEY_ENV = "LMFORGE_API_KEY"


def create_app(model: nn.Module, tokenizer: Tokenizer, name: str, max_batch: int = 16,
               max_concurrent: int = 64, policy: Policy | None = None, prefix_cache: bool = True,
               prefill_chunk: int = 0, adapters: tuple[str, ...] = ()) -> Any:
    """A FastAPI app serving `model` as `name`, and each LoRA adapter loaded onto it (`adapters`, by
    `load_adapters`) under its own name; its scheduler thread runs while the app is up
    (`app.state.scheduler` exposes it, e.g. to tests). `policy` says who may call it (default: loopback
    names only, no API key, bodies up to 2 MiB). No `from __future__ import annotations` in this
    module: FastAPI reads the route functions' annotations, and their types are imported here, locally."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                           f"{model.cfg.vocab_size}")
    if name in adapters:
        raise LmforgeError(f"adapter name '{name}' is the base model's name; give the adapter another")
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_concurrent=max_concurrent,
                          prefix_cache=prefix_cache, prefill_chunk=prefill_chunk)
    if scheduler.prefix_cache_off:
        log.warning("serve: prefix caching is off for this model: %s", scheduler.prefix_cache_off)
    stops = stop_token_ids(tokenizer)
    info = ModelInfo(name, tokenizer, scheduler.context, stops, Grammars(tokenizer, model.cfg.vocab_size, stops),
                     adapters=tuple(adapters))
    parsers = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="lmforge-parse")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            parsers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, policy=policy or Policy())
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
    async def index() -> FileResponse:  # never inside another site's frame (clickjacking)
        return FileResponse(STATIC / "index.html", headers={"X-Frame-Options": "DENY",
                                                            "Content-Security-Policy": "frame-ancestors 'none'"})

    def model_card(model_id: str) -> dict[str, Any]:  # an adapter's card names its base as `parent` (as vLLM's)
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "lmforge",
                "max_model_len": info.context_length, "root": name, "parent": None if model_id == name else name,
                "prefix_caching": scheduler.prefix is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in (name, *adapters)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name and model_id not in adapters:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves {info.served()}",
                           param="model", code="model_not_found")
        return model_card(model_id)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        return tokenize(parse_json(await request.body()), info)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        return detokenize(parse_json(await request.body()), info)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(info)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                **dataclasses.asdict(scheduler.stats)}

    def parse(kind: Kind, raw: bytes) -> GenRequest:
        return parse_request(kind, parse_json(raw), info)

    async def generate(kind: Kind, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(parsers, parse, kind, await request.body())
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        jobs = req.jobs(lambda i, ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))
        if len(jobs) > scheduler.max_concurrent:
            raise ApiError(400, f"this request asks for {len(jobs)} choices (prompts x n); the server runs at most "
                                f"{scheduler.max_concurrent} at once", param="n")
        try:
            scheduler.submit_all(jobs)
        except SchedulerBusy as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        answer = Answer(req, new_id(kind), req.adapter or name, tokenizer)
        if req.stream:
            return StreamingResponse(stream(req, answer, jobs, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(answer, jobs, events, request)

    def cancel(jobs: list[Job]) -> None:
        for job in jobs:
            scheduler.cancel(job)

    async def stream(req: GenRequest, answer: Answer, jobs: list[Job],
                     events: asyncio.Queue[tuple[int, Event]]) -> AsyncIterator[str]:
        """SSE events until every choice ends; if the client goes away first, its jobs are cancelled (slots freed)."""
        try:
            for opening in answer.opening():
                yield sse(opening)
            while not answer.done:
                for piece in answer.add(*await events.get()):
                    yield sse(piece)
            if answer.error is not None:
                yield sse(error_body(answer.error, "server_error"))
            elif req.include_usage:
                yield sse(answer.usage_chunk())
            yield sse("[DONE]")
        finally:
            if answer.error is not None or not answer.done:
                cancel(jobs)

    async def collect(answer: Answer, jobs: list[Job], events: asyncio.Queue[tuple[int, Event]],
                      request: Request) -> Any:
        try:
            while not answer.done:
                try:
                    answer.add(*await asyncio.wait_for(events.get(), DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel(jobs)
                        return JSONResponse(error_body("client disconnected"), status_code=499)
            if answer.error is not None:
                cancel(jobs)
                return JSONResponse(error_body(answer.error, "server_error"), status_code=500)
            return answer.body()
        except asyncio.CancelledError:
            cancel(jobs)
            raise

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate("chat", request)

    return app


def uvicorn_config(app: Any, host: str, port: int, keep_alive_timeout: float = 5.0,
                   read_timeout: float = 30.0) -> Any:
    """uvicorn's settings for `app`: its h11 protocol with the read timeouts `security.py` adds."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=timed_h11_protocol(read_timeout),
                          timeout_keep_alive=keep_alive_timeout)  # typed int; fractions of a second work too


class BackgroundServer:
    """uvicorn serving an app from a daemon thread (tests and benchmarks); port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **timeouts: float) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, host, port, **timeouts))
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
    prefix_cache: bool = option(True, "reuse the keys and values of prompt prefixes earlier requests computed "
                                      "(16-token blocks, LRU); outputs are the same either way")
    prefill_chunk: int = option(512, "most prompt tokens prefilled per step, between decode steps, so a long "
                                     "prompt does not stall running streams; 0: whole prompts")
    adapter: list[str] = option(default_factory=list, help="LoRA adapters served beside the base model: NAME=DIR "
                                "...; a request whose model is NAME is answered by that adapter")
    quantize: Quantize = option("none", QUANTIZE_HELP)
    device: str = option("auto", "auto, cpu, cuda, ...")
    api_key: str = option("", f"require 'Authorization: Bearer KEY' on /v1/ routes (HTTP 401 otherwise); "
                              f"empty reads ${API_KEY_ENV}, which keeps the key out of the process list")
    allowed_hosts: list[str] = option(default_factory=list, help="Host header names accepted besides loopback "
                                      "and --host (comma list; '*' accepts any: only behind a proxy that checks)")
    max_body_bytes: int = option(DEFAULT_MAX_BODY_BYTES, "largest request body; larger ones get HTTP 413")
    keep_alive_timeout: float = option(5.0, "seconds an idle connection stays open between requests")
    read_timeout: float = option(30.0, "seconds a client may take to send a request's headers, and again its "
                                       "body; slower connections are closed")

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", self.port, "a TCP port in [0, 65535] (0 picks a free one)")
        require(self.max_body_bytes >= 1, "max_body_bytes", self.max_body_bytes, ">= 1")
        require(self.keep_alive_timeout > 0, "keep_alive_timeout", self.keep_alive_timeout, "> 0 seconds")
        require(self.read_timeout > 0, "read_timeout", self.read_timeout, "> 0 seconds")
        require(self.prefill_chunk >= 0, "prefill_chunk", self.prefill_chunk, ">= 0 tokens (0: whole prompts)")
        adapter_specs(self.adapter)


def adapter_specs(specs: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR ...` as {name: directory}; a malformed or repeated name is one ConfigError."""
    out: dict[str, str] = {}
    for spec in specs:
        adapter_name, eq, directory = spec.partition("=")
        require(bool(eq and adapter_name and directory) and "." not in adapter_name, "adapter", spec,
                "NAME=DIR with a name without dots")
        require(adapter_name not in out, "adapter", spec, f"a name used once ('{adapter_name}' is repeated)")
        out[adapter_name] = directory
    return out


def load_adapters(model: nn.Module, specs: list[str]) -> tuple[str, ...]:
    """Load each `NAME=DIR` LoRA adapter onto `model` (unmerged, none active: rows pick theirs per request)."""
    named = adapter_specs(specs)
    for adapter_name, directory in named.items():
        load_adapter(model, directory, adapter_name)
    if named:
        set_adapter(model, None)
    return tuple(named)


def policy_of(cfg: ServeConfig) -> Policy:
    """Who may call the server `cfg` describes; the API key comes from --api-key, else $LMFORGE_API_KEY."""
    return Policy(api_key=cfg.api_key or os.environ.get(API_KEY_ENV, ""), bound_host=cfg.host,
                  allowed_hosts=tuple(cfg.allowed_hosts), max_body_bytes=cfg.max_body_bytes)

def check_address(host: str, port: int) -> None:
    """Bind HOST:PORT once before the model loads, so a taken port or an unknown host is one line, at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind((host, port))
    except OSError as e:
        raise LmforgeError(f"cannot listen on host {host!r} port {port}: {e.strerror or e}") from None


def serve_cmd(cfg: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn: pip install 'lmforge[serve]'") from None

    check_address(cfg.host, cfg.port)
    model = load_model(cfg.checkpoint, device=resolve_device(cfg.device))
    adapters = load_adapters(model, cfg.adapter)
    apply_quantize(model, cfg.quantize, adapter=bool(adapters))
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.checkpoint)
    name = cfg.name or Path(cfg.checkpoint).resolve().name
    policy = policy_of(cfg)
    app = create_app(model, tokenizer, name, cfg.max_batch, cfg.max_concurrent, policy, cfg.prefix_cache,
                     cfg.prefill_chunk, adapters)
    served = ", ".join(repr(m) for m in (name, *adapters))
    print(f"serving {served} on http://{cfg.host}:{cfg.port} (chat page at /, API at /v1"
          f"{', API key required' if policy.api_key else ''})", flush=True)
    server = uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port, cfg.keep_alive_timeout, cfg.read_timeout))
    server.run()
    if not server.started:  # uvicorn logged why (e.g. the address is in use)
        raise LmforgeError(f"could not listen on {cfg.host}:{cfg.port}")
    return 0
