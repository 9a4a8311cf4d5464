"""Text from a remote OpenAI-compatible endpoint: the "public API" route of the seeds (Alpaca's teacher, LLM judges).

`RemoteClient` posts `/completions` or `/chat/completions` requests to any server that speaks the OpenAI API
(`lmforge serve`, vLLM, OpenAI itself). What makes it usable for thousands of requests:
- retries with exponential backoff on rate limits (429), overload (5xx) and dropped connections, honouring
  the server's `Retry-After`; any other 4xx is the caller's mistake and fails at once with the server's message;
- a client-side rate limit (requests per minute), shared by the worker threads that send requests concurrently;
- a local cache (SQLite, keyed by the SHA-256 of the endpoint and the request body, never the key), so a rerun
  or a resumed run pays only for what it has not asked yet. Requests carry a seed, so a cached answer is the one
  the same request would get again from a server that honours seeds.
The API key comes from an environment variable (`--api.key_env`), never from the command line or a config file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def default_cache_path() -> str:
    """~/.cache/lmforge/api.sqlite, under $XDG_CACHE_HOME when set (where HF and pip keep their caches too)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lmforge", "api.sqlite")


@dataclass
class ApiConfig:
    """How to talk to an OpenAI-compatible endpoint (the URL itself is the command's `--teacher-url`/`--judge-url`)."""

    model: str = option("", "model id sent with each request; empty = the first id the server's /models lists")
    key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key (sent as a Bearer token; "
                                            "none is sent when the variable is unset, as local servers need none)")
    timeout: float = option(120.0, "seconds to wait for one response")
    max_retries: int = option(6, "retries of a request that failed with 408/409/429/5xx or a dropped connection")
    backoff: float = option(1.0, "first retry waits this many seconds, doubling each time (capped at 60 s); a "
                                 "Retry-After header from the server wins")
    requests_per_minute: float = option(0.0, "client-side rate limit over all concurrent requests; 0 = none")
    concurrency: int = option(4, "requests in flight at once")
    cache: str = option("default", "SQLite cache of responses: default = ~/.cache/lmforge/api.sqlite, a path, or "
                                   "'off'")

    def __post_init__(self) -> None:
        require(self.timeout > 0, "api.timeout", self.timeout, "> 0")
        require(self.max_retries >= 0, "api.max_retries", self.max_retries, ">= 0")
        require(self.backoff >= 0, "api.backoff", self.backoff, ">= 0")
        require(self.requests_per_minute >= 0, "api.requests_per_minute", self.requests_per_minute, ">= 0")
        require(self.concurrency >= 1, "api.concurrency", self.concurrency, ">= 1")


class RateLimiter:
    """At most `per_minute` starts per minute, spaced evenly; thread-safe. The clock is injectable for tests."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class ResponseCache:
    """request key -> response JSON in one SQLite file (safe across threads and concurrent processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise LmforgeError(f"{self.path}: cannot open the API response cache ({e}); pass --api.cache off or "
                               "another path") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _server_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read().decode("utf-8", "replace"))
        detail = body.get("error", body)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:300]
    except (ValueError, OSError, AttributeError):
        return error.reason if isinstance(error.reason, str) else ""


class RemoteClient:
    """Posts OpenAI API requests to `base_url` (e.g. http://host:8000/v1) with retries, rate limit and cache."""

    def __init__(self, base_url: str, cfg: ApiConfig | None = None, sleep: Callable[[float], None] = time.sleep
                 ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise LmforgeError(f"endpoint URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.cfg = cfg or ApiConfig()
        self.sleep = sleep
        self.limiter = RateLimiter(self.cfg.requests_per_minute, sleep=sleep)
        cache = self.cfg.cache
        self.cache = None if cache == "off" else ResponseCache(default_cache_path() if cache == "default" else cache)
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}
        self._stats_lock = threading.Lock()
        self._model = self.cfg.model

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.key_env, "") if self.cfg.key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.cfg.max_retries + 1):
            self.limiter.wait()
            self._count("requests")
            request = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
            wait = min(60.0, self.cfg.backoff * 2 ** attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS:
                    raise LmforgeError(f"{method} {url}: HTTP {e.code}: {_server_message(e)}") from None
                problem = f"HTTP {e.code}: {_server_message(e)}"
                asked = _retry_after(e)
                wait = wait if asked is None else asked
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                problem = str(getattr(e, "reason", e))
            except ValueError as e:
                raise LmforgeError(f"{method} {url}: the response is not JSON ({e})") from None
            if attempt == self.cfg.max_retries:
                raise LmforgeError(f"{method} {url}: gave up after {attempt + 1} tries: {problem}")
            self._count("retries")
            self.sleep(wait)
        raise AssertionError("unreachable")

    @property
    def model(self) -> str:
        """The model id to request: the configured one, else the first the server lists (asked once)."""
        if not self._model:
            listed = self._send("GET", "/models").get("data") or []
            if not listed or "id" not in listed[0]:
                raise LmforgeError(f"GET {self.base_url}/models lists no model; pass --api.model")
            self._model = str(listed[0]["id"])
        return self._model

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, answered from the cache when the same endpoint got the same body before."""
        body = {"model": self.model, **body}
        key = hashlib.sha256(json.dumps([self.base_url + path, body], sort_keys=True).encode()).hexdigest()
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self._count("cache_hits")
                return cached
        response = self._send("POST", path, body)
        if self.cache is not None:
            self.cache.put(key, response)
        return response

    def map(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Many requests, `concurrency` in flight, answers in request order."""
        self.model  # noqa: B018 - resolve the model id once, before the threads start
        if self.cfg.concurrency == 1 or len(bodies) <= 1:
            return [self.post(path, b) for b in bodies]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(lambda b: self.post(path, b), bodies))

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def choice_text(response: dict[str, Any], kind: Literal["completions", "chat"]) -> str:
    """The first choice's text of a /completions or /chat/completions response (a clear error if malformed)."""
    try:
        choice = response["choices"][0]
        text = choice["text"] if kind == "completions" else choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LmforgeError(f"the endpoint's {kind} response has no choices[0] text: "
                           f"{json.dumps(response)[:200]}") from None
    return text or ""


def sampling_body(temperature: float, top_p: float, max_tokens: int, seed: int | None) -> dict[str, Any]:
    """The sampling fields of a request (the OpenAI names), from lmforge's sampling settings."""
    body: dict[str, Any] = {"temperature": max(0.0, temperature), "top_p": top_p, "max_tokens": max_tokens}
    if seed is not None:
        body["seed"] = seed
    return body
