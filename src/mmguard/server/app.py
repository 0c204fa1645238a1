"""The FastAPI application: ``create_app(guard, settings)``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..conversation import Conversation
from ..images import ImageLimits
from ..policy import Policy, PolicyError, load_policy
from .batcher import Batcher, GuardLike, Outcome, QueueFull, WorkSpec
from .categories import merge_verdict_results, moderation_result
from .errors import APIError, error_body, error_response, validation_message
from .inputs import ImageFetcher, conversation_from_messages, normalize_messages, prepare_moderation
from .metrics import Metrics
from .schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModerationRequest,
    ModerationResponse,
    RunShieldRequest,
    RunShieldResponse,
    Shield,
    ShieldList,
)
from .settings import ServerSettings

__all__ = ["SHIELD_USER_MESSAGE", "ServerState", "create_app"]

log = logging.getLogger("mmguard.server")
access_log = logging.getLogger("mmguard.server.access")

SHIELD_USER_MESSAGE = "I can't answer that. Can I help with something else?"  # llama-stack's canned message
_PUBLIC_PATHS = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503, 504)
}
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServerState:
    """What the routes share: the guard, settings, batcher, metrics, image fetcher."""

    def __init__(self, guard: GuardLike, settings: ServerSettings) -> None:
        self.guard = guard
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.watch_image_encodings(getattr(guard, "engine", None))  # a FastEngine exports its counters
        self.batcher = Batcher(
            guard,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            fail_closed=settings.fail_closed,
            metrics=self.metrics,
        )
        self.fetcher = ImageFetcher(settings)
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.ready = False
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in settings.api_keys)

    @property
    def threshold(self) -> float | None:
        return self.settings.threshold

    def key_ok(self, presented: str) -> bool:
        """Constant-time comparison against every configured key (no early exit, no length leak)."""
        digest = hashlib.sha256(presented.encode()).digest()
        ok = False
        for ref in self._key_digests:
            ok |= hmac.compare_digest(digest, ref)
        return ok

    async def judge(self, specs: list[WorkSpec]) -> list[Outcome]:
        """Queue ``specs``, wait for their verdicts; 429 / 503 / 504 as OpenAI-style errors."""
        try:
            futures = self.batcher.submit(specs)
        except QueueFull as err:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                f"the server's queue is full; retry after {err.retry_after}s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(err.retry_after)},
            ) from None
        except RuntimeError:
            raise APIError(
                503,
                "the server is not ready",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "1"},
            ) from None
        try:
            outcomes = list(await asyncio.wait_for(asyncio.gather(*futures), self.settings.request_timeout_s))
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            self.metrics.rejected.labels("timeout").inc()
            raise APIError(
                504,
                f"request timed out after {self.settings.request_timeout_s:g}s",
                type="server_error",
                code="timeout",
            ) from None
        failed = [o for o in outcomes if o.verdict is None]
        if failed:
            raise APIError(
                503,
                f"the model failed: {failed[0].error}",
                type="server_error",
                code="model_error",
                headers={"Retry-After": "1"},
            )
        for o in outcomes:
            v = o.verdict
            assert v is not None
            self.metrics.verdicts.labels(v.label).inc()
            self.metrics.items.labels("image" if v.has_image else "text").inc()
            for code in v.codes:
                self.metrics.verdict_categories.labels(code).inc()
        return outcomes


def _route_label(path: str) -> str:
    if path.startswith("/v1/shields/"):
        return "/v1/shields/{identifier}"
    known = {
        "/v1/moderations",
        "/v1/openai/v1/moderations",
        "/v1/guard/classify",
        "/v1/safety/run-shield",
        "/v1/shields",
        "/v1/models",
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

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            public = path in _PUBLIC_PATHS or (path == "/metrics" and settings.metrics_public)
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
            declared = headers.get("content-length")
            limit = settings.max_body_bytes
            too_big = error_body(
                f"request body is larger than the limit of {limit} bytes", code="body_too_large"
            )
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                await self._reply(send_wrapper, 413, too_big, {"connection": "close"})
                return
            # read the whole body (bounded) before the app sees it
            chunks: list[bytes] = []
            size = 0
            more = scope["method"] in ("POST", "PUT", "PATCH")
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await self._reply(send_wrapper, 413, too_big, {"connection": "close"})
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(path)
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


def _content_for_log(conv: Conversation) -> list[dict[str, Any]]:
    return [{"role": t.role, "text": t.text[:2000], "image": t.image is not None} for t in conv.turns]


def _resolve_policy(state: ServerState, spec: Any, exclude: list[str]) -> tuple[Policy | None, Any, Policy]:
    """(policy to pass or None, batching key, the active policy after exclusions)."""
    try:
        if spec is None or spec == "default":
            policy, key = None, None
            base = state.guard.policy
        else:
            policy = load_policy(spec)
            key = json.dumps(policy.to_dict(), sort_keys=True)
            base = policy
        active = base.exclude(exclude) if exclude else base
    except PolicyError as err:
        raise APIError.bad_request(str(err), param="exclude" if "exclude" in str(err) else "policy") from None
    return policy, key, active


def create_app(guard: GuardLike, settings: ServerSettings | None = None) -> FastAPI:
    """The moderation server for ``guard`` (run it with uvicorn; the lifespan starts the batcher)."""
    settings = settings or ServerSettings()
    state = ServerState(guard, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        previous_threads: int | None = None
        if settings.torch_threads is not None:
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, settings.torch_threads))
        await state.batcher.start()
        try:
            if settings.warmup:
                await state.batcher.run_sync(lambda: guard.classify_batch([Conversation.prompt("warm-up")]))
            state.ready = True
            log.info("ready", extra={"model": settings.model_id})
        except Exception:
            log.exception("warm-up failed; the server stays not ready (/readyz answers 503)")
        try:
            yield
        finally:
            state.ready = False
            await state.batcher.stop()
            if previous_threads is not None:
                import torch

                torch.set_num_threads(previous_threads)

    app = FastAPI(
        title="mmguard moderation server",
        version=__version__,
        description="Llama Guard 3 Vision as a service: OpenAI-compatible moderations, full verdicts, "
        "llama-stack safety shields. Errors use OpenAI's error object.",
        lifespan=lifespan,
    )
    app.state.mmguard = state

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.log["error_code"] = exc.code
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(list(exc.errors()))
        request.state.log["error_code"] = code
        return JSONResponse(error_body(message, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        status = exc.status_code if exc.status_code < 500 else 400
        return JSONResponse(
            error_body(str(exc.detail), param=None, code=code),
            status_code=status,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(
            error_body("internal server error", type="server_error", code="internal_error"), status_code=500
        )

    # -- probes ------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness (model loaded, warm, batcher running)")
    async def readyz() -> JSONResponse:
        ready = state.ready and state.batcher.running
        body = {
            "status": "ready" if ready else "not_ready",
            "queue_depth": state.batcher.depth,
            "max_queue": settings.max_queue,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        state.metrics.queue_depth.set(state.batcher.depth)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["openai"], summary="The served model")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0, "owned_by": "mmguard"}],
        }

    # -- OpenAI moderations -----------------------------------------------------------------------
    async def moderations(body: ModerationRequest, request: Request) -> JSONResponse:
        names = body.category_names or settings.category_names
        raw: Any = (
            body.input
            if isinstance(body.input, str)
            else [x if isinstance(x, str) else x.model_dump() for x in body.input]
        )
        pending = await prepare_moderation(raw, settings, state.limits, state.fetcher)
        items = await asyncio.to_thread(pending.decode, state.limits)
        specs: list[WorkSpec] = []
        owners: list[int] = []
        for idx, item in enumerate(items):
            for conv in item.conversations:
                specs.append(
                    WorkSpec(
                        conv, threshold=state.threshold, always_scores=settings.category_scores == "always"
                    )
                )
                owners.append(idx)
        outcomes = await state.judge(specs)
        active = state.guard.policy.active_codes
        per_item: list[list[dict[str, Any]]] = [[] for _ in items]
        any_fail_closed = False
        for owner, outcome in zip(owners, outcomes, strict=True):
            assert outcome.verdict is not None
            any_fail_closed |= outcome.fail_closed
            per_item[owner].append(
                moderation_result(
                    outcome.verdict,
                    active,
                    names=names,
                    has_text=items[owner].has_text,
                    fail_closed=outcome.fail_closed,
                )
            )
        results = [r[0] if len(r) == 1 else merge_verdict_results(r) for r in per_item]
        log_extra = request.state.log
        log_extra.update(
            items=len(results),
            flagged=sum(r["flagged"] for r in results),
            images=sum(v.verdict.has_image for v in outcomes if v.verdict),
        )
        if settings.log_content:
            log_extra["content"] = [_content_for_log(s.conversation) for s in specs]
        headers = {"x-mmguard-fail-closed": "true"} if any_fail_closed else {}
        return JSONResponse(
            {"id": f"modr-{uuid.uuid4().hex}", "model": settings.model_id, "results": results},
            headers=headers,
        )

    app.post(
        "/v1/moderations",
        tags=["openai"],
        summary="Classify text and images (OpenAI-compatible)",
        response_model=ModerationResponse,
        responses=_ERRORS,
    )(moderations)
    app.post("/v1/openai/v1/moderations", include_in_schema=False)(moderations)  # llama-stack's route

    # -- full verdicts ----------------------------------------------------------------------------
    @app.post(
        "/v1/guard/classify",
        tags=["mmguard"],
        summary="Judge a conversation; the full verdict",
        response_model=ClassifyResponse,
        responses=_ERRORS,
    )
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        policy, key, active = _resolve_policy(state, body.policy, body.exclude)
        messages = await normalize_messages(body.messages, state.limits, state.fetcher, lenient_roles=False)
        conv = await asyncio.to_thread(conversation_from_messages, messages, state.limits, body.role)
        threshold = body.threshold if body.threshold is not None else state.threshold
        always = (body.category_scores or settings.category_scores) == "always"
        spec = WorkSpec(
            conv,
            policy=policy,
            policy_key=key,
            exclude=tuple(body.exclude),
            threshold=threshold,
            always_scores=always,
        )
        (outcome,) = await state.judge([spec])
        verdict = outcome.verdict
        assert verdict is not None
        request.state.log.update(
            items=1, flagged=int(verdict.is_unsafe), codes=list(verdict.codes), images=int(verdict.has_image)
        )
        if settings.log_content:
            request.state.log["content"] = _content_for_log(conv)
        out = ClassifyResponse(
            id=f"guard-{uuid.uuid4().hex}",
            model=settings.model_id,
            policy={
                "name": active.name,
                "active_codes": list(active.active_codes),
                "excluded": sorted(active.excluded),
            },
            verdict=verdict.to_dict(),
            fail_closed=outcome.fail_closed,
        )
        return JSONResponse(
            out.model_dump(), headers={"x-mmguard-fail-closed": "true"} if outcome.fail_closed else {}
        )

    # -- llama-stack ------------------------------------------------------------------------------
    def _shield(identifier: str) -> Shield:
        return Shield(
            identifier=identifier, provider_resource_id=settings.model_id, provider_id="mmguard", params={}
        )

    @app.get("/v1/shields", tags=["llama-stack"], summary="List shields", response_model=ShieldList)
    async def list_shields() -> ShieldList:
        return ShieldList(data=[_shield(s) for s in settings.all_shield_ids])

    @app.get(
        "/v1/shields/{identifier:path}",
        tags=["llama-stack"],
        summary="Get a shield",
        response_model=Shield,
        responses=_ERRORS,
    )
    async def get_shield(identifier: str) -> Shield:
        if identifier not in settings.all_shield_ids:
            raise APIError(
                404,
                f"shield {identifier!r} not found; shields: {', '.join(settings.all_shield_ids)}",
                param="identifier",
                code="shield_not_found",
            )
        return _shield(identifier)

    @app.post(
        "/v1/safety/run-shield",
        tags=["llama-stack"],
        summary="Run a shield (llama-stack Safety API)",
        response_model=RunShieldResponse,
        responses={**_ERRORS, 404: {"model": ErrorResponse}},
    )
    async def run_shield(body: RunShieldRequest, request: Request) -> JSONResponse:
        if body.shield_id not in settings.all_shield_ids:
            raise APIError(
                404,
                f"shield {body.shield_id!r} not found; shields: {', '.join(settings.all_shield_ids)}",
                param="shield_id",
                code="shield_not_found",
            )
        params = body.params or {}
        exclude = params.get("excluded_categories", [])
        if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
            raise APIError.bad_request(
                "params.excluded_categories must be a list of codes", param="params.excluded_categories"
            )
        _, _, active = _resolve_policy(state, None, exclude)
        messages = await normalize_messages(body.messages, state.limits, state.fetcher, lenient_roles=True)
        conv = await asyncio.to_thread(conversation_from_messages, messages, state.limits, None)
        (outcome,) = await state.judge(
            [
                WorkSpec(
                    conv,
                    exclude=tuple(exclude),
                    threshold=state.threshold,
                    always_scores=settings.category_scores == "always",
                )
            ]
        )
        verdict = outcome.verdict
        assert verdict is not None
        request.state.log.update(items=1, flagged=int(verdict.is_unsafe), codes=list(verdict.codes))
        if settings.log_content:
            request.state.log["content"] = _content_for_log(conv)
        if not verdict.is_unsafe:
            return JSONResponse({"violation": None})
        metadata: dict[str, Any] = {
            "violation_type": ",".join(verdict.codes),
            "unsafe_probability": verdict.unsafe_probability,
            "category_scores": {
                c: float(verdict.category_probabilities.get(c, 0.0)) for c in active.active_codes
            },
        }
        if outcome.fail_closed:
            metadata["fail_closed"] = True
        return JSONResponse(
            {
                "violation": {
                    "violation_level": "error",
                    "user_message": SHIELD_USER_MESSAGE,
                    "metadata": metadata,
                }
            }
        )

    app.add_middleware(GatewayMiddleware, state=state)  # type: ignore[arg-type]
    return app
