"""The router's HTTP server: aiohttp's low-level server (requests dispatched by a dictionary
look-up, no Application) in front of pooled keep-alive upstream connections (upstream.py).

One process, one event loop. Per request: check the client key, read the body (bounded), parse
it once (orjson) for `model`/`stream`, pick a chain (selection.py), take a slot on the first
backend of the chain that is in rotation (up, or starting: not yet healthy since the router
started) and not full (state.py), or wait in the queue for one; send the request with `model`
rewritten, and relay the answer. A failure before the first byte reaches the client (refused,
timed out, 5xx, connection dropped) moves the request on to the next backend of the chain; after
the first byte nothing is retried: the client's connection is cut so that it sees the stream
end early.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

import orjson
from aiohttp import web

from clusterctl.router.config import RouteTable
from clusterctl.router.deadline import Deadlines
from clusterctl.router.keys import ClientKeys, KeyFileError, read_upstream_key
from clusterctl.router.metrics import CONTENT_TYPE, NONE, Metrics
from clusterctl.router.selection import Selection, Selector, UnknownModel, parse_classifier_answer, prompt_texts
from clusterctl.router.state import BackendState, Dispatcher, Exhausted, NoBackend
from clusterctl.router.upstream import BodyBroken, Disconnected, Pool, Response, UpstreamError
from clusterctl.router.validate import AUTO

PROXY_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
USAGE_TAIL = 8192
"""Bytes of the end of a stream kept to find the usage report in its last events."""
RELAY_HIGH_WATER = 1 << 20
"""Bytes waiting to be sent to a client above which a stream's upstream is not read until they went."""
CLASSIFIER_PROMPT = ("You route requests to the right model. Answer with exactly one of these task types and "
                     "nothing else: {routes}.")

_JSON = "application/json"
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class JsonLog:
    """JSON lines (access log and events) to a binary stream, stderr by default.

    Lines written while the event loop runs are batched: one write per loop iteration."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop that flushes the lines (looked up when not set)."""

    def write(self, record: dict[str, Any]) -> None:
        self._pending.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if self._scheduled:
            return
        loop = self.loop
        if loop is None or loop.is_closed():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        stream = self._stream if self._stream is not None else sys.stderr.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass

    def event(self, name: str, **fields: Any) -> None:
        self.write({"ts": round(time.time(), 3), "event": name, **fields})


def error_body(message: str, type_: str, code: str | None = None, **extra: Any) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code, **extra}})


def _error(status: int, message: str, type_: str, code: str | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return web.Response(status=status, body=error_body(message, type_, code, **extra), content_type=_JSON,
                        headers=headers)


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The request body; None when it is larger than `limit` bytes (it is then not read to its end)."""
    content = request.content
    parts: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def find_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the last `"usage": {...}` object in a JSON body or
    an SSE tail, read without parsing the rest."""
    end = len(data)
    while True:
        at = data.rfind(b'"usage"', 0, end)
        if at < 0:
            return None
        end = at
        if at > 0 and data[at - 1] == 0x5C:  # an escaped quote inside a string
            continue
        start = data.find(b"{", at + 7, at + 64)
        if start < 0 or data[at + 7:start].strip(b" \t\r\n:") != b"":
            continue  # "usage": null, or not a key
        depth, pos = 1, start + 1
        while depth:
            close = data.find(b"}", pos)
            if close < 0:
                return None
            opened = data.find(b"{", pos, close)
            if opened >= 0:
                depth += 1
                pos = opened + 1
            else:
                depth -= 1
                pos = close + 1
        try:
            usage = orjson.loads(data[start:pos])
        except orjson.JSONDecodeError:
            continue
        if not isinstance(usage, dict):
            continue
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return (p if isinstance(p, int) else 0, c if isinstance(c, int) else 0)


@dataclass(slots=True)
class _Outcome:
    """What one request did, for the access log and the metrics."""

    route: str = NONE
    backend: str = NONE
    started: float = 0.0
    status: int = 0
    ttfb: float | None = None
    bytes_sent: int = 0
    tokens_in: int | None = None
    tokens_out: int | None = None
    attempts: int = 0
    error: str | None = None
    prompt: str | None = None


@dataclass(slots=True)
class _Parsed:
    """A request to forward: its body parsed, as received, and where it goes."""

    body: dict[str, Any]
    raw: bytes
    selection: Selection


@dataclass(slots=True)
class _Failed:
    """An attempt that failed before the client saw a byte."""

    reason: str
    detail: str
    relay: web.Response | None = None
    retry_same: bool = False


def _upstream_base(url: str) -> str:
    """The backend URL without a trailing slash and without a trailing /v1 (paths carry it)."""
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base


class Router:
    def __init__(self, table: RouteTable, *, log: JsonLog | None = None) -> None:
        self.table = table
        self.log = log or JsonLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.selector = Selector(table)
        self.states = {name: BackendState(name, b, table.health) for name, b in table.backends.items()}
        self.dispatcher = Dispatcher(self.states, table.queue.size, table.queue.timeout,
                                     on_wait=lambda route: self.metrics.queued_request(route))
        self.metrics = Metrics(self._state_snapshot)
        self.keys = ClientKeys(None)
        self._pools = {name: Pool(_upstream_base(b.url), connect_timeout=b.connect_timeout)
                       for name, b in table.backends.items()}
        self._heads: dict[tuple[str, str], bytes] = {}
        self._deadlines = Deadlines()
        self._tasks: list[asyncio.Task[None]] = []
        self._routes = self._make_routes()
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None
        self.load_keys()

    # -- keys -------------------------------------------------------------------------------

    def load_keys(self) -> None:
        """Read the client keys and every upstream key; raises KeyFileError and then keeps the old ones."""
        keys = ClientKeys.from_file(self.table.api_keys_file)
        upstream = {name: read_upstream_key(b.api_key_file) if b.api_key_file else None
                    for name, b in self.table.backends.items()}
        self.keys = keys
        heads: dict[tuple[str, str], bytes] = {}
        for name, key in upstream.items():
            self.states[name].upstream_key = key
            headers = {"User-Agent": "clusterctl-router", "Content-Type": _JSON}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            pool = self._pools[name]
            for path in PROXY_PATHS:
                heads[(name, path)] = pool.request_head("POST", path, headers)
            check_headers = {"User-Agent": "clusterctl-router", "Connection": "close"}
            if key:
                check_headers["Authorization"] = f"Bearer {key}"
            health_path = self.table.backends[name].health_path
            if health_path is not None:
                heads[(name, "health")] = pool.request_head("GET", health_path, check_headers)
        self._heads = heads

    def reload_keys(self) -> bool:
        try:
            self.load_keys()
        except KeyFileError as exc:
            self.log.event("keys_reload_failed", error=str(exc))
            return False
        self.log.event("keys_reloaded", client_keys=len(self.keys) if self.keys.enabled else None)
        return True

    # -- lifecycle --------------------------------------------------------------------------

    def _make_routes(self) -> dict[tuple[str, str], _Handler]:
        """(method, path) -> handler; everything else goes to _not_found (404, or 405 on a known path)."""
        routes: dict[tuple[str, str], _Handler] = {("POST", path): self._proxy for path in PROXY_PATHS}
        for method in ("GET", "HEAD"):
            routes[(method, "/v1/models")] = self._models
            routes[(method, "/health")] = self._health
            routes[(method, "/metrics")] = self._metrics
        return routes

    def _dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """aiohttp's low-level server calls this for every request: a plain dictionary look-up
        (an Application's router, match info and Request cost more CPU than this needs)."""
        return self._routes.get((request.method, request.rel_url.path_safe), self._not_found)(request)

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Listen (port 0: any free port) and start the health checks; returns the port."""
        self._loop = self.log.loop = asyncio.get_running_loop()
        self._runner = web.ServerRunner(web.Server(self._dispatch, handler_cancellation=True, access_log=None,
                                                   keepalive_timeout=75.0))
        await self._runner.setup()
        host = host or self.table.listen_host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.table.listen_port if port is None else port))
        except OSError:
            sock.close()
            await self._runner.cleanup()
            raise
        self.port = int(sock.getsockname()[1])
        site = web.SockSite(self._runner, sock, backlog=2048)
        now = self._loop.time()
        for state in self.states.values():
            state.begin(now)  # not yet seen healthy: starting (state.py)
        await site.start()
        for state in self.states.values():
            self._tasks.append(asyncio.create_task(self._health_loop(state), name=f"health-{state.name}"))
        self.log.event("listening", host=host or self.table.listen_host, port=self.port,
                       backends=sorted(self.states), routes=sorted(self.table.routes))
        return self.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for pool in self._pools.values():
            pool.close()
        self.log.loop = None
        self.log.flush()

    # -- health -----------------------------------------------------------------------------

    def _state_snapshot(self) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
        depth = dict.fromkeys(self.table.routes, 0)
        depth.update(self.dispatcher.depths())
        return ({n: self._backend_state(s) for n, s in self.states.items()},
                {n: s.in_flight for n, s in self.states.items()}, depth)

    def _backend_state(self, state: BackendState) -> str:
        """starting, up or ejected, now (a starting backend's grace may just have ended)."""
        if self._loop is not None:
            state.still_starting(self._loop.time())
        return state.state

    async def _health_loop(self, state: BackendState) -> None:
        assert self._loop is not None
        interval = self.table.health.interval
        while True:
            try:
                if state.wants_check(self._loop.time()):
                    ok, reason = await self._check(state)
                    was_starting = state.up and state.starting
                    change = state.record_check(ok, self._loop.time(), reason)
                    if change is True:
                        if was_starting:
                            self._ready(state, "check")
                        else:
                            self.log.event("backend_recovered", backend=state.name)
                        self.dispatcher.pump()
                    elif change is False:
                        self._ejected(state, reason)
            except Exception as exc:  # a bug here must not stop the checks
                self.log.event("health_check_error", backend=state.name, error=type(exc).__name__)
            await asyncio.sleep(interval)

    async def _check(self, state: BackendState) -> tuple[bool, str]:
        """GET the health path on a new connection (a pooled one could hide a server that no
        longer accepts connections)."""
        pool = self._pools[state.name]
        conn = None
        try:
            async with asyncio.timeout(self.table.health.timeout):
                if (state.name, "health") not in self._heads:  # no HTTP health path: connecting is the check
                    await pool.probe()
                    return True, ""
                conn, resp = await pool.send(self._heads[(state.name, "health")], b"", fresh=True)
                await resp.head()
                await resp.read_all()
        except TimeoutError:
            return False, "health timeout"
        except UpstreamError as exc:
            return False, f"health {exc.reason}"
        finally:
            if conn is not None:
                conn.close()
        if 200 <= resp.status < 300:
            return True, ""
        return False, f"health HTTP {resp.status}"

    def _ejected(self, state: BackendState, reason: str) -> None:
        self.metrics.ejected(state.name)
        self.log.event("backend_ejected", backend=state.name, reason=reason,
                       cooldown_s=self.table.health.cooldown)

    def _ready(self, state: BackendState, via: str) -> None:
        """A starting backend was seen healthy for the first time (by a check or an answer)."""
        assert self._loop is not None
        self.log.event("backend_ready", backend=state.name, via=via,
                       after_s=round(self._loop.time() - state.started_at, 3))

    def _success(self, state: BackendState) -> None:
        if state.record_success():
            self._ready(state, "request")

    def _failure(self, state: BackendState, reason: str) -> None:
        assert self._loop is not None
        self.metrics.failure(state.name, reason)
        if state.record_failure(self._loop.time(), reason):
            self._ejected(state, reason)

    # -- small endpoints --------------------------------------------------------------------

    def _authorized(self, request: web.BaseRequest) -> bool:
        return self.keys.check_header(request.headers.get("Authorization"))

    def _unauthorized(self, request: web.BaseRequest, started: float) -> web.Response:
        outcome = _Outcome(status=401, error="unauthorized")
        self._finish(request, outcome, started)
        return _error(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                      "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        states = {name: self._backend_state(s) for name, s in self.states.items()}
        backends = {name: {"state": states[name], "up": states[name] == "up", "in_flight": s.in_flight,
                           "max_concurrency": s.max_concurrency, "consecutive_failures": s.failures,
                           "last_error": s.last_error}
                    for name, s in sorted(self.states.items())}
        routes = {}
        for name, chain in sorted(self.selector.routes.items()):
            up = [b for b in chain if states[b] == "up"]
            routes[name] = {"up": bool(up), "backends_up": up,
                            "backends_starting": [b for b in chain if states[b] == "starting"]}
        counts = {kind: sum(1 for v in states.values() if v == kind) for kind in ("up", "starting", "ejected")}
        if counts["up"] == len(states):
            status = "ok"
        elif counts["ejected"] == 0:
            status = "starting"
        else:
            status = "down" if counts["ejected"] == len(states) else "degraded"
        body = orjson.dumps({"status": status, "backends": backends, "routes": routes,
                             "queue_depth": self.dispatcher.depth})
        self._finish(request, _Outcome(status=200), started)
        return web.Response(body=body, content_type=_JSON)

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        if not self._authorized(request):
            return self._unauthorized(request, started)
        data = []
        if self.selector.auto_enabled:
            data.append({"id": AUTO, "object": "model", "created": 0, "owned_by": "clusterctl", "kind": "auto"})
        for name in sorted(self.selector.routes):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "clusterctl", "kind": "route",
                         "backends": list(self.selector.routes[name])})
        for name in sorted(self.states):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "clusterctl", "kind": "backend"})
        self._finish(request, _Outcome(status=200), started)
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=_JSON)

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        if not self._authorized(request):
            return self._unauthorized(request, started)
        self._finish(request, _Outcome(status=200), started)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _not_found(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        if not self._authorized(request):
            return self._unauthorized(request, started)
        known = {*PROXY_PATHS, "/v1/models", "/health", "/metrics"}
        if request.path in known:
            allowed = "POST" if request.path in PROXY_PATHS else "GET"
            self._finish(request, _Outcome(status=405, error="method not allowed"), started)
            return _error(405, f"{request.method} is not allowed on {request.path}; use {allowed}",
                          "invalid_request_error", "method_not_allowed", headers={"Allow": allowed})
        self._finish(request, _Outcome(status=404, error="no such path"), started)
        return _error(404, f"no such path: {request.path}", "invalid_request_error", "not_found")

    # -- the proxy --------------------------------------------------------------------------

    def _finish(self, request: web.BaseRequest, outcome: _Outcome, started: float, *, count: bool = False) -> None:
        """Access log line; metrics for the API paths only (not for /health, /metrics, ...)."""
        duration = time.perf_counter() - started
        if count:
            self.metrics.request(outcome.route, outcome.backend, outcome.status, outcome.ttfb, duration,
                                 outcome.tokens_in, outcome.tokens_out)
        if self.table.access_log:
            record: dict[str, Any] = {
                "ts": round(time.time(), 3), "method": request.method, "path": request.path,
                "route": outcome.route, "backend": outcome.backend, "status": outcome.status,
                "ttfb_ms": None if outcome.ttfb is None else round(outcome.ttfb * 1000, 3),
                "duration_ms": round(duration * 1000, 3), "bytes": outcome.bytes_sent,
                "tokens_in": outcome.tokens_in, "tokens_out": outcome.tokens_out,
            }
            if outcome.attempts > 1:
                record["attempts"] = outcome.attempts
            if outcome.error:
                record["error"] = outcome.error
            if outcome.prompt is not None:
                record["prompt"] = outcome.prompt
            self.log.write(record)

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = _Outcome(started=started)
        try:
            parsed = await self._read_request(request, outcome)
            if isinstance(parsed, _Parsed):
                response = await self._forward(request, parsed.body, parsed.raw, parsed.selection, outcome, started)
            else:
                response = parsed
        except asyncio.CancelledError:
            outcome.status = 499
            outcome.error = outcome.error or "client disconnected"
            self._finish(request, outcome, started, count=True)
            raise
        self._finish(request, outcome, started, count=True)
        return response

    def _reply(self, outcome: _Outcome, response: web.Response, error: str | None = None) -> web.Response:
        outcome.status = response.status
        outcome.error = error
        if outcome.route != NONE:
            response.headers["X-Clusterctl-Route"] = outcome.route
        return response

    async def _read_request(self, request: web.BaseRequest, outcome: _Outcome) -> _Parsed | web.Response:
        """Check the key, read and parse the body, pick the route: what to forward, or the error
        to answer with."""
        if not self.keys.check_header(request.headers.get("Authorization")):
            outcome.status = 401
            outcome.error = "unauthorized"
            return _error(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                          "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        limit = self.table.max_request_bytes
        too_large = _error(413, f"request body larger than {limit} bytes", "invalid_request_error",
                           "request_too_large") if (request.content_length or 0) > limit else None
        raw = b""
        if too_large is None:
            body_read = await _read_body(request, limit)
            if body_read is None:
                too_large = _error(413, f"request body larger than {limit} bytes", "invalid_request_error",
                                   "request_too_large")
            else:
                raw = body_read
        if too_large is not None:
            too_large.force_close()
            return self._reply(outcome, too_large, "request too large")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._reply(outcome, _error(400, "the request body is not valid JSON", "invalid_request_error",
                                               "invalid_json"), "invalid json")
        if not isinstance(body, dict):
            return self._reply(outcome, _error(400, "the request body must be a JSON object",
                                               "invalid_request_error", "invalid_json"), "invalid json")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            return self._reply(outcome, _error(400, "`model` must be a string", "invalid_request_error",
                                               "invalid_model", param="model"), "invalid model")
        if self.table.log_prompts:
            outcome.prompt = prompt_texts(body)[0]
        try:
            selection = self.selector.explicit(model, request.headers.get("X-Task-Type"))
        except UnknownModel as exc:
            return self._reply(outcome, _error(404, str(exc), "invalid_request_error", "model_not_found",
                                               param="X-Task-Type" if exc.header else "model",
                                               valid=exc.valid), "unknown model")
        if selection is None:
            selection = await self._auto(body)
        outcome.route = selection.route
        return _Parsed(body, raw, selection)

    async def _auto(self, body: dict[str, Any]) -> Selection:
        selection = self.selector.by_rules(body)
        if selection is None and self.table.classifier is not None:
            route = await self._classify(body)
            if route is not None:
                selection = self.selector.by_name(route, "classifier")
        if selection is None:
            selection = self.selector.fallback()
        self.metrics.auto_selection(selection.route, selection.via)
        return selection

    async def _classify(self, body: dict[str, Any]) -> str | None:
        """Ask the classifier backend for a route name; None on any failure."""
        cls = self.table.classifier
        assert cls is not None
        state = self.dispatcher.try_acquire((cls.backend,))
        if state is None:
            return None
        pool = self._pools[state.name]
        conn = None
        try:
            last_user, _ = prompt_texts(body)
            payload = orjson.dumps({
                "model": state.config.model, "stream": False, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": CLASSIFIER_PROMPT.format(routes=", ".join(cls.routes))},
                             {"role": "user", "content": last_user[-4000:]}]})
            try:
                async with asyncio.timeout(cls.timeout):
                    conn, up = await pool.send(self._heads[(state.name, "/v1/chat/completions")], payload)
                    await up.head()
                    data = await up.read_all()
            except TimeoutError:
                self._failure(state, "timeout")
                return None
            except UpstreamError as exc:
                self._failure(state, exc.reason)
                return None
            if up.status >= 500:
                self._failure(state, "http_5xx")
                return None
            self._success(state)
            if up.status != 200:
                return None
            try:
                answer = orjson.loads(data)["choices"][0]["message"]["content"]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                return None
            return parse_classifier_answer(answer, cls.routes) if isinstance(answer, str) else None
        finally:
            pool.release(conn)
            self.dispatcher.release(state)

    async def _forward(self, request: web.BaseRequest, body: dict[str, Any], raw: bytes, selection: Selection,
                       outcome: _Outcome, started: float) -> web.StreamResponse:
        stream = body.get("stream") is True
        path = request.path
        exclude: frozenset[str] = frozenset()
        failures: list[str] = []
        relay: web.Response | None = None
        relay_backend = NONE
        payloads: dict[str, bytes] = {}
        while True:
            try:
                state = (self.dispatcher.acquire_nowait(selection.chain, exclude)
                         or await self.dispatcher.acquire(selection.route, selection.chain, exclude))
            except NoBackend as exc:
                if isinstance(exc, Exhausted) and relay is not None:
                    outcome.backend = relay_backend
                    return self._reply(outcome, relay, "; ".join(failures))
                detail = f" ({'; '.join(failures)})" if failures else ""
                status = 502 if isinstance(exc, Exhausted) else 503
                message = f"route {selection.route!r}: {exc.reason}{detail}"
                return self._reply(outcome, _error(
                    status, message, "service_unavailable" if status == 503 else "bad_gateway",
                    "no_backend_available" if status == 503 else "upstream_failed", route=selection.route),
                    exc.reason)
            if exclude:
                self.metrics.retry(selection.route)
            outcome.attempts += 1
            outcome.backend = state.name
            upstream_model = state.config.model
            payload = payloads.get(upstream_model)
            if payload is None:
                if body.get("model") == upstream_model:
                    payload = raw
                else:
                    body["model"] = upstream_model
                    payload = orjson.dumps(body)
                payloads[upstream_model] = payload
            try:
                result = await self._attempt(request, state, path, payload, stream, selection, outcome, started)
                if isinstance(result, _Failed) and result.retry_same:
                    # a kept-alive connection the upstream had just closed: once more, on a new one
                    outcome.attempts += 1
                    result = await self._attempt(request, state, path, payload, stream, selection, outcome,
                                                 started, fresh=True)
            finally:
                self.dispatcher.release(state)
            if isinstance(result, _Failed):
                starting = state.up and state.starting
                self._failure(state, result.reason)
                failures.append(f"{state.name}{' (starting)' if starting else ''}: {result.detail}")
                relay = result.relay
                relay_backend = state.name
                exclude = exclude | {state.name}
                outcome.backend = NONE
                continue
            if not result.prepared:
                outcome.status = result.status
                try:
                    await result.prepare(request)
                    outcome.ttfb = time.perf_counter() - started
                    await result.write_eof()
                    outcome.bytes_sent = result.content_length or 0
                except ConnectionError:
                    outcome.status = 499
                    outcome.error = "client disconnected"
            return result

    async def _attempt(self, request: web.BaseRequest, state: BackendState, path: str, payload: bytes, stream: bool,
                       selection: Selection, outcome: _Outcome, started: float,
                       fresh: bool = False) -> web.StreamResponse | _Failed:
        """One try on one backend, covered by the backend's timeout (one timer for all of it). A
        failure before the first byte for the client is a _Failed for the caller to act on; a
        stream that fails after it is cut (see _stream_broke)."""
        assert self._loop is not None
        pool = self._pools[state.name]
        conn = None
        streamed: web.StreamResponse | None = None
        try:
            try:
                async with self._deadlines.at(self._loop.time() + state.config.timeout, self._loop):
                    head = self._heads[(state.name, path)]
                    conn, up = (None if fresh else pool.send_idle(head, payload)) or await pool.send(
                        head, payload, fresh=fresh)
                    await up.head()
                    status = up.status
                    if status >= 500 or not stream or status >= 300:
                        data = await up.read_all()
                    else:
                        data = await up.read_chunk()
                        if data:
                            streamed = web.StreamResponse(status=status, headers=self._stream_headers(
                                state.name, selection.route, up.headers.get("content-type", _JSON)))
                            return await self._relay_stream(request, state, up, data, streamed, selection,
                                                            outcome)
            except TimeoutError:
                if streamed is None or not streamed.prepared:
                    return _Failed("timeout", "timed out before the first byte")
                outcome.error = f"upstream stream timed out after {outcome.bytes_sent} bytes"
                self._stream_broke(request, state, selection, "timeout")
                return streamed
            except UpstreamError as exc:
                retry_same = isinstance(exc, Disconnected) and conn is not None and conn.reused
                # a body that broke before anything reached the client: as good as no answer
                reason = "disconnected" if isinstance(exc, BodyBroken) else exc.reason
                return _Failed(reason, str(exc), retry_same=retry_same)
            if status >= 500 or not stream or status >= 300:
                headers = {"Content-Type": up.headers.get("content-type", _JSON), "X-Clusterctl-Backend": state.name,
                           "X-Clusterctl-Route": selection.route}
                response = web.Response(status=status, body=data, headers=headers)
                if status >= 500:
                    return _Failed("http_5xx", f"HTTP {status}", relay=response)
                self._success(state)
                if status == 200:
                    usage = find_usage(data)
                    if usage is not None:
                        outcome.tokens_in, outcome.tokens_out = usage
                return response  # sent by the caller, once the upstream connection is back in the pool
            return _Failed("empty_stream", "stream ended before its first byte")
        finally:
            pool.release(conn)

    def _stream_headers(self, backend: str, route: str, content_type: str) -> dict[str, str]:
        return {"Content-Type": content_type, "Cache-Control": "no-cache", "X-Clusterctl-Backend": backend,
                "X-Clusterctl-Route": route}

    async def _relay_stream(self, request: web.BaseRequest, state: BackendState, up: Response, first: bytes,
                            response: web.StreamResponse, selection: Selection,
                            outcome: _Outcome) -> web.StreamResponse:
        """Send the stream's head and its bytes as they come (the caller's timeout covers it)."""
        outcome.status = up.status
        self._success(state)
        try:
            writer = await response.prepare(request)
            assert writer is not None
            if up.at_eof:  # the whole stream came at once: one write with the end of the body
                await response.write_eof(first)
            else:
                await writer.write(first)
        except ConnectionError:
            outcome.status = 499
            outcome.error = "client disconnected"
            return response
        outcome.ttfb = time.perf_counter() - outcome.started
        outcome.bytes_sent = len(first)
        tail = _Tail(first)
        transport = request.transport
        sent = len(first)
        last = b""

        def sink(data: bytes) -> bool:
            """Called from the upstream connection's read callback: one chunk to the client."""
            nonlocal sent
            if transport is None or transport.is_closing():
                return True  # the client is gone: relay() calls drain(), which says so
            try:
                transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            except (OSError, RuntimeError):  # not the upstream's fault: never let it reach its connection
                transport.abort()
                return True
            sent += len(data)
            tail.add(data)
            return transport.get_write_buffer_size() > RELAY_HIGH_WATER

        async def drain() -> None:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            await writer.drain()

        try:
            try:
                if not up.at_eof:
                    last = await up.relay(sink, drain)
            finally:
                outcome.bytes_sent = sent
        except UpstreamError as exc:
            outcome.error = f"upstream stream broke after {outcome.bytes_sent} bytes ({exc})"
            self._stream_broke(request, state, selection, exc.reason)
            return response
        except ConnectionError:
            outcome.status = 499
            outcome.error = "client disconnected"
            return response
        try:
            await response.write_eof(last)  # the last bytes with the end of the body
        except ConnectionError:
            outcome.status = 499
            outcome.error = "client disconnected"
            return response
        outcome.bytes_sent += len(last)
        if last:
            tail.add(last)
        usage = find_usage(tail.value())
        if usage is not None:
            outcome.tokens_in, outcome.tokens_out = usage
        return response

    def _stream_broke(self, request: web.BaseRequest, state: BackendState, selection: Selection, reason: str) -> None:
        """The upstream failed after the first byte: count it, and cut the client's connection so
        that it sees an incomplete response, not a clean end."""
        self._failure(state, reason)
        self.metrics.truncated_stream(selection.route, state.name)
        transport = request.transport
        if transport is not None:
            transport.abort()


class _Tail:
    """The last USAGE_TAIL bytes of a stream (where its usage report is), kept as the chunks that
    hold them so that a chunk costs no copy."""

    __slots__ = ("_chunks", "_size")

    def __init__(self, first: bytes) -> None:
        self._chunks = deque((first,))
        self._size = len(first)

    def add(self, chunk: bytes) -> None:
        chunks = self._chunks
        chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(chunks[0]) >= USAGE_TAIL:
            self._size -= len(chunks.popleft())

    def value(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return data[-USAGE_TAIL:]


def _use_uvloop() -> Callable[..., Any]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run
    return uvloop.run


async def serve_forever(router: Router, host: str | None, port: int | None) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP re-reads the key files."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, router.reload_keys)
    await router.start(host, port)
    # what exists now lives as long as the server: keep it out of the collector's scans, and
    # collect young objects less often (a request allocates a few hundred of them)
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        await stop.wait()
    finally:
        router.log.event("stopping")
        await router.stop()


def serve(table: RouteTable, host: str | None = None, port: int | None = None) -> None:
    router = Router(table)
    _use_uvloop()(serve_forever(router, host, port))
