"""The FastAPI application: ``create_app(guard, settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..conversation import Conversation
from ..policy import Policy, PolicyError, load_policy
from .batcher import GuardLike, WorkSpec
from .categories import merge_verdict_results, moderation_result
from .errors import APIError, error_body, error_response, validation_message
from .gateway import DOCS_ASSETS, GatewayMiddleware
from .inputs import (
    conversation_from_messages,
    normalize_messages,
    prepare_moderation,
)
from .schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModerationRequest,
    ModerationResponse,
    Readiness,
    RunShieldRequest,
    RunShieldResponse,
    Shield,
    ShieldList,
)
from .settings import ServerSettings
from .state import ServerState

__all__ = ["SHIELD_USER_MESSAGE", "ServerState", "create_app"]

log = logging.getLogger("mmguard.server")

SHIELD_USER_MESSAGE = "I can't answer that. Can I help with something else?"  # llama-stack's canned message
_ERROR_MEANINGS = {
    400: "Invalid request (the error's code says which rule was broken)",
    401: "Missing or incorrect API key",
    404: "Not found",
    408: "The request body was not received within the body timeout",
    413: "Request body too large",
    429: "Queue full; retry after the Retry-After seconds",
    503: "Model loading, not ready, or the model failed",
    504: "The request timed out",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": _ERROR_MEANINGS[code]}
    for code in (400, 401, 408, 413, 429, 503, 504)
}
_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's detail when the JSON decoder itself fails


def _content_for_log(conv: Conversation) -> list[dict[str, Any]]:
    return [{"role": t.role, "text": t.text[:2000], "image": t.image is not None} for t in conv.turns]


def _resolve_policy(
    state: ServerState, spec: Any, exclude: list[str], exclude_param: str = "exclude"
) -> tuple[Policy | None, Any, Policy]:
    """(policy to pass or None, batching key, the active policy after exclusions); 400 ``invalid_policy``."""
    try:
        if spec is None or spec == "default":
            policy, key = None, None
            assert state.guard is not None  # the middleware answers model_loading before
            base = state.guard.policy
        else:
            policy = load_policy(spec)
            key = json.dumps(policy.to_dict(), sort_keys=True)
            base = policy
    except PolicyError as err:
        raise APIError.bad_request(str(err), param="policy", code="invalid_policy") from None
    try:
        active = base.exclude(exclude) if exclude else base
    except PolicyError as err:
        raise APIError.bad_request(str(err), param=exclude_param, code="invalid_policy") from None
    return policy, key, active


def _json_problem(body: bytes) -> str:
    """Why the JSON decoder failed on ``body`` (only called on that error path)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return (
            f"request body is not valid JSON: it is not UTF-8 (byte 0x{body[err.start]:02X} at offset {err.start})"
        )
    try:
        json.loads(body)
    except RecursionError:
        return "request body is not valid JSON: it is nested too deeply to parse"
    except ValueError as err:
        return f"request body is not valid JSON: {err}"
    return "request body is not valid JSON"


def _swagger_assets() -> str | None:
    """The folder of Swagger UI's files when the swagger-ui-bundle package is installed (served locally)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def create_app(
    guard: GuardLike | None,
    settings: ServerSettings | None = None,
    *,
    loader: Callable[[], GuardLike] | None = None,
) -> FastAPI:
    """The moderation server for ``guard`` (run it with uvicorn; the lifespan starts the batcher).

    With ``guard=None`` and a ``loader``, the lifespan starts the loader in a background thread and the
    server answers at once: ``/readyz`` 503 ``loading`` and the model routes 503 ``model_loading`` until
    the guard is loaded and warm. A loader that raises leaves the server not ready (``load_error`` set).
    """
    if guard is None and loader is None:
        raise ValueError("create_app needs a guard or a loader")
    settings = settings or ServerSettings()
    state = ServerState(guard, settings)

    async def warm_up(loaded: GuardLike) -> None:
        try:
            if settings.warmup:
                await state.batcher.run_sync(lambda: loaded.classify_batch([Conversation.prompt("warm-up")]))
            state.ready = True
            log.info("ready", extra={"model": state.model_id})
        except Exception:
            log.exception("warm-up failed; the server stays not ready (/readyz answers 503)")

    async def load_in_background(load: Callable[[], GuardLike]) -> None:
        # a daemon thread, not the model executor: shutting down must not wait for a load to finish
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GuardLike] = loop.create_future()

        def settle(result: GuardLike | None, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                result = load()
            except BaseException as err:  # reported to the loop, never lost in the thread
                loop.call_soon_threadsafe(settle, None, err)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=run, name="mmguard-model-load", daemon=True).start()
        try:
            loaded = await done
        except Exception as err:
            state.load_error = f"{type(err).__name__}: {err}"
            log.error("model could not be loaded: %s", state.load_error)
            return
        state.attach(loaded)
        await warm_up(loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        previous_threads: int | None = None
        if settings.torch_threads is not None:
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, settings.torch_threads))
        await state.batcher.start()
        loading: asyncio.Task[None] | None = None
        if state.guard is not None:
            await warm_up(state.guard)
        else:
            assert loader is not None
            loading = asyncio.create_task(load_in_background(loader), name="mmguard-model-load")
            app.state.loading = loading
        try:
            yield
        finally:
            state.ready = False
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
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
        docs_url=None,  # served below from local files: the default loads Swagger UI from a CDN
        redoc_url=None,  # ReDoc only exists as a CDN script: off
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
        if exc.status_code == 400 and exc.detail == _PARSE_ERROR:
            message = _json_problem(request.scope.get("state", {}).get("raw_body", b""))
            request.state.log["error_code"] = "invalid_json"
            return JSONResponse(error_body(message, code="invalid_json"), status_code=400)
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

    assets = _swagger_assets()
    if assets is not None:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="swagger-ui-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url="/openapi.json",
                title="mmguard moderation server - Swagger UI",
                swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            )
    else:

        @app.get("/docs", include_in_schema=False)
        async def docs_missing() -> JSONResponse:
            message = (
                "Swagger UI is not installed on this server (pip install swagger-ui-bundle); "
                "the OpenAPI document is at /openapi.json"
            )
            return JSONResponse(error_body(message, code="not_found"), status_code=404)

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Readiness (model loaded, warm, batcher running)",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: loading, warming up or shutting down"}},
    )
    async def readyz() -> JSONResponse:
        ready = state.ready and state.batcher.running
        loading = state.guard is None and state.load_error is None
        body = {
            "status": "ready" if ready else "loading" if loading else "not_ready",
            "queue_depth": state.batcher.depth,
            "max_queue": settings.max_queue,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics (text exposition format)",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        state.metrics.queue_depth.set(state.batcher.depth)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["openai"], summary="The served model", responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": "mmguard",
                      "system_fingerprint": state.system_fingerprint}],
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
        assert state.guard is not None
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
            {"id": f"modr-{uuid.uuid4().hex}", "model": state.model_id, "results": results},
            headers=headers,
        )

    app.post(
        "/v1/moderations",
        tags=["openai"],
        summary="Classify text and images (OpenAI-compatible)",
        response_model=ModerationResponse,
        responses=_ERRORS,
    )(moderations)
    app.post(  # llama-stack's route
        "/v1/openai/v1/moderations",
        tags=["openai"],
        summary="The same moderation route, at llama-stack's path",
        response_model=ModerationResponse,
        responses=_ERRORS,
        operation_id="moderations_llama_stack_path",
    )(moderations)

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
            model=state.model_id,
            policy={
                "name": active.name,
                "active_codes": list(active.active_codes),
                "excluded": sorted(active.excluded),
            },
            verdict=verdict.to_dict(),
            fail_closed=outcome.fail_closed,
            system_fingerprint=state.system_fingerprint,
        )
        return JSONResponse(
            out.model_dump(), headers={"x-mmguard-fail-closed": "true"} if outcome.fail_closed else {}
        )

    # -- llama-stack ------------------------------------------------------------------------------
    def _shield(identifier: str) -> Shield:
        return Shield(
            identifier=identifier, provider_resource_id=state.model_id, provider_id="mmguard", params={}
        )

    @app.get(
        "/v1/shields",
        tags=["llama-stack"],
        summary="List shields",
        response_model=ShieldList,
        responses={401: _ERRORS[401]},
    )
    async def list_shields() -> ShieldList:
        return ShieldList(data=[_shield(s) for s in state.shield_ids])

    @app.get(
        "/v1/shields/{identifier:path}",
        tags=["llama-stack"],
        summary="Get a shield",
        response_model=Shield,
        responses={404: {"model": ErrorResponse, "description": "No such shield"}, 401: _ERRORS[401]},
    )
    async def get_shield(identifier: str) -> Shield:
        if identifier not in state.shield_ids:
            raise APIError(
                404,
                f"shield {identifier!r} not found; shields: {', '.join(state.shield_ids)}",
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
        if body.shield_id not in state.shield_ids:
            raise APIError(
                404,
                f"shield {body.shield_id!r} not found; shields: {', '.join(state.shield_ids)}",
                param="shield_id",
                code="shield_not_found",
            )
        params = body.params or {}
        exclude = params.get("excluded_categories", [])
        if not isinstance(exclude, list) or not all(isinstance(c, str) for c in exclude):
            raise APIError.bad_request(
                "params.excluded_categories must be a list of codes", param="params.excluded_categories"
            )
        _, _, active = _resolve_policy(state, None, exclude, "params.excluded_categories")
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
    app.openapi = _without_validation_answers(app.openapi)  # type: ignore[method-assign]
    return app


def _without_validation_answers(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 answer on every route with a body or parameters; this server answers each invalid
    request with a 400 (``_validation_error``), so the document lists what clients get."""

    def document() -> dict[str, Any]:
        spec = openapi()  # FastAPI builds it once and keeps it: the edit below runs on the kept one
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        schemas = spec.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return spec

    return document
