"""The gateway in front of every route (pure ASGI): request ids, API keys, the body's size and time limits,
metrics and the JSON access log. The server and the guardrail proxy both run behind it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import error_body
from .request_limits import CLIENT_GONE, REQUEST_DEADLINE, REQUEST_TEXT, TextBudget
from .state import ServerState

__all__ = ["DOCS_ASSETS", "GatewayMiddleware", "route_label"]

access_log = logging.getLogger("mmguard.server.access")

# routes open without an API key; routes that need the model (503 while it loads)
_PUBLIC_PATHS = {"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json"}
DOCS_ASSETS = "/docs/assets"  # Swagger UI's files, served locally
_MODEL_ROUTES = {"/v1/moderations", "/v1/openai/v1/moderations", "/v1/guard/classify", "/v1/safety/run-shield"}
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_label(path: str) -> str:
    """The metrics label of a path: the route's template, or ``other`` (labels stay few whatever clients send)."""
    if path.startswith("/v1/shields/"):
        return "/v1/shields/{identifier}"
    known = {
        "/v1/moderations",
        "/v1/openai/v1/moderations",
        "/v1/guard/classify",
        "/v1/safety/run-shield",
        "/v1/shields",
        "/v1/models",
        "/v1/chat/completions",  # the proxy's routes (it shares this middleware)
        "/v1/responses",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/redoc",
    }
    return path if path in known else "other"


class GatewayMiddleware:
    """Request ids, API keys, the body size limit, metrics and the JSON access log (pure ASGI)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.inflight = 0  # bytes of request bodies admitted and not yet answered (max_inflight_bytes)

    def _admit(self, cost: int) -> bool:
        """Take ``cost`` bytes of ``max_inflight_bytes`` if they are free (the caller gives them back)."""
        if self.inflight + cost > self.state.settings.max_inflight_bytes and self.inflight > 0:
            self.state.metrics.rejected.labels("busy").inc()
            return False
        self.inflight += cost
        return True

    async def _reply_busy(self, send: Send) -> None:
        mib = self.state.settings.max_inflight_bytes // (1024 * 1024)
        busy = error_body(f"the server holds {mib} MiB of requests already (--max-inflight-mb); retry shortly",
                          type="requests", code="server_busy")
        await self._reply(send, 429, busy, {"retry-after": "1", "connection": "close"})

    async def _reply(self, send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        raw = json.dumps(body).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": raw})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.state.settings
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope.get("method") == "POST" and "json" not in headers.get("content-type", ""):
            # every POST route takes JSON: read it as JSON whatever the client declared (curl -d sends a
            # form type), so a bad body gets the JSON error rather than a confusing type error
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        request_id = headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["log"] = {}
        path = scope.get("path", "")
        status_holder = {"status": 500}
        admitted = 0  # bytes this request holds of max_inflight_bytes

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            public = (
                path in _PUBLIC_PATHS
                or path.startswith(DOCS_ASSETS + "/")
                or (path == "/metrics" and settings.metrics_public)
            )
            if settings.api_keys and not public:
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not token.strip() or not self.state.key_ok(token.strip()):
                    msg = (
                        "missing API key: send 'Authorization: Bearer <key>'"
                        if not auth
                        else "incorrect API key provided"
                    )
                    await self._reply(
                        send_wrapper,
                        401,
                        error_body(msg, code="invalid_api_key"),
                        {"www-authenticate": "Bearer"},
                    )
                    return
            if self.state.guard is None and path in _MODEL_ROUTES:
                loading = self.state.load_error is None
                message = "the model is still loading; retry shortly" if loading else "the model could not be loaded"
                await self._reply(
                    send_wrapper,
                    503,
                    error_body(message, type="server_error", code="model_loading" if loading else "not_ready"),
                    {"retry-after": "5"} if loading else {},
                )
                return
            declared = headers.get("content-length")
            limit = settings.max_body_bytes
            too_big = error_body(
                f"request body is larger than the limit of {limit} bytes", code="body_too_large"
            )
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                await self._reply(send_wrapper, 413, too_big, {"connection": "close"})
                return
            # admission by the bytes held at once: every request costs several times its body while it waits
            # and runs, and nothing else bounded how many the server took (6 concurrent 25 MB image requests:
            # +775 MB; 512 queued ones would have held about 16 GB)
            known = declared is not None and declared.strip().isdigit()
            # a body of unknown length (chunked) is counted as it arrives, from 64 KiB
            cost = min(max(int(declared) if known else 64 * 1024, 1), settings.max_inflight_bytes)
            if not self._admit(cost):  # a request alone is always admitted (cost at most the budget)
                await self._reply_busy(send_wrapper)
                return
            admitted = cost
            # read the whole body, bounded in size and in total time (a body trickled byte by byte must not
            # hold a connection forever), before the app sees it
            chunks: list[bytes] = []
            more = scope["method"] in ("POST", "PUT", "PATCH")

            async def read_body() -> str | None:
                size = 0
                nonlocal more, admitted
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return "disconnect"
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return "too_big"
                    if size > admitted:  # a chunked body past what it was admitted with
                        if not self._admit(size - admitted):
                            return "busy"
                        admitted = size
                    chunks.append(chunk)
                    more = message.get("more_body", False)
                return None

            try:
                problem = await asyncio.wait_for(read_body(), settings.body_timeout_s)
            except asyncio.TimeoutError:
                problem = "timeout"
            if problem == "disconnect":
                return
            if problem == "too_big":
                await self._reply(send_wrapper, 413, too_big, {"connection": "close"})
                return
            if problem == "busy":
                await self._reply_busy(send_wrapper)
                return
            if problem == "timeout":
                slow = error_body(
                    f"the request body was not received within {settings.body_timeout_s:g}s",
                    code="body_timeout",
                )
                await self._reply(send_wrapper, 408, slow, {"connection": "close"})
                return
            body = b"".join(chunks)
            scope["state"]["raw_body"] = body  # for the JSON error handler's diagnosis
            REQUEST_DEADLINE.set(time.monotonic() + settings.request_timeout_s)
            REQUEST_TEXT.set(TextBudget(settings.max_text_chars))
            gone = asyncio.Event()
            CLIENT_GONE.set(gone)
            sent = False

            async def watch() -> None:  # the client leaving: its queued work need not run (it ran before)
                try:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                except Exception:  # the server's channel closed under it: the request is over either way
                    pass
                gone.set()

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()  # the watcher reads the connection; the app learns of a disconnect from it
                return {"type": "http.disconnect"}

            watcher = asyncio.create_task(watch())
            try:
                await self.app(scope, replay, send_wrapper)
            finally:
                watcher.cancel()
        finally:
            self.inflight -= admitted
            elapsed = time.perf_counter() - start
            route = route_label(path)
            status = status_holder["status"]
            self.state.metrics.requests.labels(route, str(status)).inc()
            self.state.metrics.latency.labels(route).observe(elapsed)
            if route not in ("/metrics", "/healthz", "/readyz"):
                extra = {
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "path": path,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    **scope["state"].get("log", {}),
                }
                access_log.info("request", extra=extra)
