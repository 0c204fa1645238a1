"""The guardrail proxy: ``create_proxy_app(guard, settings)``.

``POST /v1/chat/completions`` and ``POST /v1/responses`` (streaming and not; :mod:`.routes` says how each
API's requests and answers read) and ``GET /v1/models`` in front of any OpenAI-compatible server. The guard
runs through the moderation server's machinery (:class:`mmguard.server.state.ServerState`: dynamic batching,
the queue's 429, timeouts, fail-closed, image rules, request ids, body limit, JSON access log), so
concurrent checks of several streams share model batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..conversation import Conversation, ConversationError
from ..server.batcher import GuardLike, WorkSpec
from ..server.errors import APIError, error_body, error_response
from ..server.gateway import GatewayMiddleware
from ..server.state import ServerState
from ..verdict import Verdict
from .judged import JudgedPrompt, decode_judged_prompt, prepare_judged_prompt, recent_history, with_answer
from .metrics import ProxyMetrics
from .release import DueCheck, StreamRelease, held_cost
from .response_store import ResponseStore, continued
from .routes import CHAT, RESPONSES, Route, UnreadableAnswer, content_filter_error
from .scored import score_plain
from .settings import ProxySettings
from .sse import (
    READABLE_ENCODINGS,
    SSEEvent,
    SSEParser,
    UpstreamEncodingError,
    json_bytes,
    loads_or_none,
    read_decoded,
)

__all__ = ["KEY_HEADER", "ProxyState", "content_filter_error", "create_proxy_app"]

log = logging.getLogger("mmguard.proxy")

KEY_HEADER = "x-mmguard-api-key"  # the proxy's own key; Authorization belongs to the upstream
# not forwarded either way: hop-by-hop headers, and what httpx recomputes (length, encoding)
_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-connection", "accept-encoding", "content-encoding", KEY_HEADER}
_MAX_UPSTREAM_BODY = 64 * 1024 * 1024
_READ_AHEAD_BYTES = 4 * 1024 * 1024  # upstream events parsed but not yet taken by the release logic (held_cost)
_PARSE_SLICE = 64 * 1024  # of an upstream read, parsed at once


Remember = Callable[[Any, str], None]  # (the upstream's answer id, the judged answer text)


def _forget(answer_id: Any, answer: str) -> None:
    return None


class ProxyState:
    def __init__(self, guard: GuardLike, settings: ProxySettings) -> None:
        self.settings = settings
        # the proxy's keys are not the server's: Authorization is the upstream's business
        self.server = ServerState(guard, replace(settings.guard, api_keys=()))
        self.metrics = ProxyMetrics(self.server.metrics.registry)
        self.client: httpx.AsyncClient | None = None
        self.responses = ResponseStore(settings.remember_responses) if settings.remember_responses else None
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in settings.api_keys)
        tokenizer = getattr(getattr(guard, "engine", None), "tokenizer", None)
        if tokenizer is not None:
            from ..tokenizer import encode_text

            # counting only: a lone surrogate (JSON's "\ud800") that the tokenizer refuses counts as one "?";
            # the check itself refuses such text with an error the client sees
            self.count_tokens = lambda text: len(encode_text(tokenizer, text.encode("utf-8", "replace").decode()))
        else:  # a guard without a tokenizer (test doubles): about 4 characters a token
            self.count_tokens = lambda text: (len(text) + 3) // 4

    def check_key(self, request: Request) -> None:
        if not self._key_digests:
            return
        digest = hashlib.sha256(request.headers.get(KEY_HEADER, "").strip().encode()).digest()
        ok = False
        for ref in self._key_digests:  # constant time, every key
            ok |= hmac.compare_digest(digest, ref)
        if not ok:
            raise APIError(401, f"missing or incorrect proxy key: send the '{KEY_HEADER}' header",
                           code="invalid_api_key")

    async def check(self, rail: str, conversation: Conversation) -> Verdict:
        settings = self.server.settings
        spec = WorkSpec(conversation, threshold=self.server.threshold,
                        always_scores=settings.category_scores == "always")
        (outcome,) = await self.server.judge([spec])
        assert outcome.verdict is not None
        self.metrics.checks.labels(rail).inc()
        if outcome.verdict.is_unsafe:
            self.metrics.flags.labels(rail).inc()
            if self.settings.blocking:
                self.metrics.blocks.labels(rail).inc()
        return outcome.verdict

    async def check_answer(self, judged: JudgedPrompt, answer: str) -> Verdict:
        """The output rail on one answer to ``judged``. An answer no conversation can hold (over the limits) is
        an input error (400 ``invalid_input``), as a guard's refusal is: every caller reports it one way."""
        try:
            conversation = with_answer(judged, answer)
        except ConversationError as err:
            raise APIError.bad_request(str(err), code="invalid_input") from None
        return await self.check("output", conversation)

    def with_earlier_turns(self, route: Route, body: dict[str, Any], judged: JudgedPrompt,
                           log: dict[str, Any]) -> JudgedPrompt:
        """``judged`` after the turns the request omits (a continued Responses answer), where the store has
        them; ``log`` says whether it had them."""
        earlier_id = route.continues(body)
        if self.responses is None or earlier_id is None:
            return judged
        earlier = self.responses.get(earlier_id)
        log["context"] = "found" if earlier else "unknown"
        return continued(earlier, judged) if earlier else judged

    def rememberer(self, route: Route, body: dict[str, Any], judged: JudgedPrompt) -> Remember:
        """What keeps an answer's conversation for a request that will continue it (a no-op where none will)."""
        store = self.responses
        if store is None or not route.stores(body):
            return _forget

        def remember(answer_id: Any, answer: str) -> None:
            if not isinstance(answer_id, str) or not answer_id:
                return
            try:
                conversation = with_answer(judged, answer) if answer.strip() else judged.conversation
            except ConversationError:
                return  # an answer no check could read: its conversation is no context either
            if conversation is not None:
                store.put(answer_id, conversation)

        return remember

    def forwarded_headers(self, request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in _HOP}


def _response_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}


def create_proxy_app(guard: GuardLike, settings: ProxySettings) -> FastAPI:
    """The proxy for ``guard`` in front of ``settings.upstream`` (run with uvicorn; the lifespan starts the
    batcher and the upstream client)."""
    state = ProxyState(guard, settings)
    server = state.server
    base = settings.upstream_base

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        previous_threads: int | None = None
        if server.settings.torch_threads is not None:
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, server.settings.torch_threads))
        # identity: the proxy reads what it judges, so it asks for plain bytes (httpx asks for gzip by default);
        # an upstream that compresses anyway is decoded (aiter_bytes), and content-encoding is not forwarded
        state.client = httpx.AsyncClient(timeout=httpx.Timeout(settings.upstream_timeout_s), trust_env=False,
                                         follow_redirects=False, headers={"accept-encoding": "identity"})
        await server.batcher.start()
        try:
            if server.settings.warmup:
                await server.batcher.run_sync(lambda: guard.classify_batch([Conversation.prompt("warm-up")]))
            server.ready = True
            log.info("ready", extra={"upstream": base})
        except Exception:
            log.exception("warm-up failed; the proxy stays not ready (/readyz answers 503)")
        try:
            yield
        finally:
            server.ready = False
            await server.batcher.stop()
            await state.client.aclose()
            if previous_threads is not None:
                import torch

                torch.set_num_threads(previous_threads)

    app = FastAPI(title="mmguard guardrail proxy", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions and Responses through Llama Guard 3 Vision input "
                              "and output rails.")
    app.state.mmguard = server
    app.state.proxy = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.log["error_code"] = exc.code
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404 and request.url.path.startswith("/v1/"):
            # an OpenAI route the rails do not cover (/v1/responses, /v1/completions, ...): forwarding it would
            # bypass them, and a bare "Not Found" reads as the upstream's
            code, message = "route_not_proxied", (
                f"mmguard proxy does not forward {request.url.path}: only /v1/chat/completions and /v1/responses "
                "pass through the guard's rails (and /v1/models); other routes would bypass them")
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body("internal proxy error", type="server_error", code="internal_error"),
                            status_code=500)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        ready = server.ready and server.batcher.running
        return JSONResponse({"status": "ready" if ready else "not_ready", "upstream": base},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if not server.settings.metrics_public:
            state.check_key(request)
        server.metrics.queue_depth.set(server.batcher.depth)
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def send_upstream(request: Request, method: str, path: str, content: bytes | None) -> httpx.Response:
        assert state.client is not None
        req = state.client.build_request(method, base + path, content=content,
                                         headers=state.forwarded_headers(request), params=request.query_params)
        try:
            resp = await state.client.send(req, stream=True)
        except httpx.TimeoutException:
            state.metrics.upstream_errors.labels("timeout").inc()
            raise APIError(504, f"the upstream did not answer within {settings.upstream_timeout_s:g}s",
                           type="server_error", code="upstream_timeout") from None
        except httpx.HTTPError as err:
            state.metrics.upstream_errors.labels("unavailable").inc()
            raise APIError(502, f"the upstream is unreachable: {type(err).__name__}", type="server_error",
                           code="upstream_unavailable") from None
        state.metrics.upstream.labels(str(resp.status_code)).inc()
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        problem = None
        if 300 <= resp.status_code < 400:  # passed on, a client follows Location to the upstream: unchecked
            problem = f"a redirect ({resp.status_code}), which the proxy neither follows nor passes on"
        elif encoding not in READABLE_ENCODINGS:  # read_decoded's: one layer, inflated in bounded pieces
            problem = f"content-encoding {encoding[:40]!r}, which the proxy does not read"
        if problem is not None:
            await resp.aclose()
            state.metrics.upstream_errors.labels("invalid").inc()
            raise APIError(502, f"the upstream answered with {problem}", type="server_error",
                           code="upstream_invalid_response")
        return resp

    def passthrough(resp: httpx.Response) -> StreamingResponse:
        """The upstream's answer as it comes: status, headers and (decoded) bytes untouched."""
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in read_decoded(resp):
                    yield chunk
            except UpstreamEncodingError:
                pass  # a body that stops inflating midway ends there (the status has been sent)
            finally:
                await resp.aclose()

        return StreamingResponse(body(), status_code=resp.status_code, headers=_response_headers(resp))

    async def read_bounded(resp: httpx.Response) -> bytes:
        chunks, size = [], 0

        async def read_all() -> None:
            nonlocal size
            async for chunk in read_decoded(resp):
                size += len(chunk)
                if size > _MAX_UPSTREAM_BODY:
                    raise APIError(502, f"the upstream's answer is over {_MAX_UPSTREAM_BODY} bytes",
                                   type="server_error", code="upstream_body_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read_all(), settings.answer_timeout_s)
        except asyncio.TimeoutError:
            state.metrics.upstream_errors.labels("timeout").inc()
            raise APIError(504, f"the upstream's answer took over {settings.answer_timeout_s:g}s (--answer-timeout)",
                           type="server_error", code="upstream_timeout") from None
        except httpx.HTTPError as err:
            raise APIError(502, f"reading the upstream's answer failed: {type(err).__name__}", type="server_error",
                           code="upstream_unavailable") from None
        except UpstreamEncodingError as err:
            raise APIError(502, f"the upstream's answer cannot be read: {err}", type="server_error",
                           code="upstream_invalid_response") from None
        finally:
            await resp.aclose()
        return b"".join(chunks)

    @app.get("/v1/models", tags=["openai"], summary="The upstream's models (passed through)")
    async def models(request: Request) -> Response:
        state.check_key(request)
        return passthrough(await send_upstream(request, "GET", "/models", None))

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat completions through the rails")
    async def chat_completions(request: Request) -> Response:
        return await guarded(request, CHAT)

    @app.post("/v1/responses", tags=["openai"], summary="Responses through the rails")
    async def responses(request: Request) -> Response:
        return await guarded(request, RESPONSES)

    async def guarded(request: Request, route: Route) -> Response:
        """Input rail, forward, output rail (plain or streamed), or score mode's report: one API's request."""
        state.check_key(request)
        started = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise APIError.bad_request(f"request body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise APIError.bad_request("request body is not valid JSON: it is nested too deeply to parse",
                                       code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError.bad_request("request body must be a JSON object", code="invalid_value")
        if settings.blocking and settings.output_rail and (refusal := route.unjudgeable(body)) is not None:
            raise refusal
        input_verdict: Verdict | None = None
        input_error = ""  # score mode: the input could not be judged; reported, and the request goes on
        try:
            normalized = await prepare_judged_prompt(route.messages(body), server.limits, server.fetcher,
                                                     param=route.param)
            judged = await asyncio.to_thread(decode_judged_prompt, normalized, server.limits)
            judged = state.with_earlier_turns(route, body, judged, request.state.log)
            if settings.history_chars:
                judged = recent_history(judged, settings.history_chars)
            if settings.input_rail and judged.conversation is not None:
                input_verdict = await state.check("input", judged.conversation)
        except APIError as err:
            if settings.blocking:
                raise
            judged, input_error = JudgedPrompt(None), err.message  # a shadow never changes what traffic gets
        if input_verdict is not None and input_verdict.is_unsafe:
            request.state.log.update(rail="input", flagged=1, codes=list(input_verdict.codes))
            if settings.blocking:
                return JSONResponse(content_filter_error(input_verdict, server.guard.policy.active_codes,
                                                         route.param), status_code=400)
        remember = state.rememberer(route, body, judged)
        added = time.perf_counter() - started
        resp = await send_upstream(request, "POST", route.path, raw)
        # a stream only where the client asked for one: an upstream that labels a plain answer as events must not
        # get it passed on unread (the openai client reads such a body as JSON whatever its type says)
        is_stream = "text/event-stream" in resp.headers.get("content-type", "") and body.get("stream") is True
        answered = 200 <= resp.status_code < 300  # every success, as clients read it (201 and 203 passed unchecked)
        if answered and not settings.blocking:
            state.metrics.added.labels(str(is_stream).lower()).observe(added)
            return await scored(request, route, resp, judged, input_verdict, input_error, is_stream, remember)
        if not answered or not settings.output_rail:
            state.metrics.added.labels(str(is_stream).lower()).observe(added)
            return passthrough(resp)
        if is_stream:
            return StreamingResponse(stream_checked(request, route, body, resp, judged, added, remember),
                                     status_code=resp.status_code, headers=_response_headers(resp))
        return await plain_checked(request, route, resp, judged, added, remember)

    async def scored(request: Request, route: Route, resp: httpx.Response, judged: JudgedPrompt,
                     input_verdict: Verdict | None, input_error: str, is_stream: bool, remember: Remember) -> Response:
        """Score mode: the upstream's answer unchanged, with the verdicts reported (:mod:`.scored`)."""
        headers = _response_headers(resp)
        if is_stream:
            return StreamingResponse(route.score_stream(resp, judged, input_verdict, input_error, state.check_answer,
                                                        request.state.log, output_rail=settings.output_rail,
                                                        judge_reasoning=settings.judge_reasoning, remember=remember),
                                     status_code=200, headers=headers)

        def answers(data: dict[str, Any]) -> list[tuple[int, str]]:
            found = route.answers(data, settings.judge_reasoning)
            remember(data.get("id"), found[0][1] if found else "")
            return [(index, text) for index, text, _ in found]

        body = await score_plain(await read_bounded(resp), judged, input_verdict, input_error, state.check_answer,
                                 request.state.log, output_rail=settings.output_rail, answers=answers)
        return Response(body, status_code=200, headers=headers)

    async def plain_checked(request: Request, route: Route, resp: httpx.Response, judged: JudgedPrompt,
                            added: float, remember: Remember) -> Response:
        raw = await read_bounded(resp)
        headers = _response_headers(resp)
        data = loads_or_none(raw)
        try:
            if not isinstance(data, dict):
                raise UnreadableAnswer("it is not a JSON object")
            answers = route.answers(data, settings.judge_reasoning)
        except UnreadableAnswer as err:
            raise APIError(502, f"the upstream's answer cannot be checked: {err}", type="server_error",
                           code="upstream_invalid_response") from None
        remember(data.get("id"), answers[0][1] if answers else "")  # as the upstream keeps it, blocked or not
        started = time.perf_counter()
        try:
            verdicts = await asyncio.gather(*(state.check_answer(judged, text) for _, text, _ in answers))
        except APIError as err:  # as the stream says it: the answer, not the request, could not be judged
            raise APIError(err.status, f"the output check failed: {err.message}", type=err.type, param=err.param,
                           code=err.code, headers=err.headers) from None
        state.metrics.added.labels("false").observe(added + time.perf_counter() - started)
        flagged = [(target, v) for (_, _, target), v in zip(answers, verdicts, strict=True) if v.is_unsafe]
        if not flagged:
            return Response(raw, status_code=resp.status_code, headers=headers)  # the upstream's bytes
        for target, verdict in flagged:
            route.block(target, verdict)
        request.state.log.update(rail="output", flagged=len(flagged))
        headers.pop("content-type", None)
        return Response(json_bytes(data), status_code=200, headers=headers, media_type="application/json")

    async def stream_checked(request: Request, route: Route, body: dict[str, Any], resp: httpx.Response,
                             judged: JudgedPrompt, added: float, remember: Remember) -> AsyncIterator[bytes]:
        release = StreamRelease(check_every=settings.check_every, release=settings.release,
                                count_tokens=state.count_tokens, events=route.events(body, settings.judge_reasoning),
                                on_hold=state.metrics.hold.observe)
        # bounded in bytes (64 events of 4 MiB, each held twice, cost 620 MB a slow client): a reader that gets
        # ahead waits here, and the upstream waits on TCP
        queue: asyncio.Queue[tuple[Any, int]] = asyncio.Queue()
        room = asyncio.Event()
        ahead = [0]  # the cost of what the queue holds

        async def put(item: Any) -> None:
            cost = held_cost(item) if isinstance(item, SSEEvent) else 0
            while ahead[0] and ahead[0] + cost > _READ_AHEAD_BYTES:
                room.clear()
                await room.wait()
            ahead[0] += cost
            queue.put_nowait((item, cost))

        def taken(entry: tuple[Any, int]) -> Any:
            ahead[0] -= entry[1]
            room.set()
            return entry[0]

        async def read() -> None:
            parser = SSEParser()
            try:
                async for chunk in read_decoded(resp):
                    for start in range(0, len(chunk), _PARSE_SLICE):  # other clients run between slices
                        for event in parser.feed(chunk[start:start + _PARSE_SLICE]):
                            await put(event)
                        await asyncio.sleep(0)
                for event in parser.close():
                    await put(event)
                await put(None)
            except Exception as err:  # surfaced to the client as an error event
                await put(err)

        reader = asyncio.create_task(read())
        checks: dict[asyncio.Task[Verdict], DueCheck] = {}
        getter: asyncio.Task[Any] | None = None
        upstream_ended_at: float | None = None
        failure: dict[str, Any] | None = None
        progress = time.perf_counter()  # the last time the client was sent something checked
        try:
            while True:
                for due in release.due_checks():
                    checks[asyncio.create_task(state.check_answer(judged, due.text))] = due
                for raw in release.releasable():
                    progress = time.perf_counter()
                    yield raw
                if release.all_blocked or release.complete or failure is not None:
                    break
                if getter is None and not release.upstream_done and not release.reading_paused:
                    getter = asyncio.create_task(queue.get())
                waiting: set[asyncio.Task[Any]] = set(checks)
                if getter is not None:
                    waiting.add(getter)
                if not waiting:  # nothing to wait for, yet not complete: a fault of the release logic. Say so,
                    # rather than end the stream as if the held text had been judged and dropped quietly
                    log.error("stream release stalled with text held", extra={"upstream": base})
                    failure = error_body("the proxy could not finish judging the answer", type="server_error",
                                         code="output_check_failed")
                    break
                left = settings.answer_timeout_s - (time.perf_counter() - progress)
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, left), return_when=asyncio.FIRST_COMPLETED)
                if not done:  # a trickle, or keep-alive comments behind held text: nothing released for too long
                    state.metrics.upstream_errors.labels("timeout").inc()
                    failure = error_body(f"the upstream's answer sent nothing that could be released for "
                                         f"{settings.answer_timeout_s:g}s (--answer-timeout)", type="server_error",
                                         code="upstream_timeout")
                    break
                for task in done:
                    if task is getter:
                        getter = None
                        item = taken(task.result())
                        while True:  # this event and those queued behind it, until a check is due: one wake-up
                            if item is None:
                                release.finish()
                            elif isinstance(item, Exception):
                                failure = error_body(f"the upstream's stream failed: {type(item).__name__}",
                                                     type="server_error", code="upstream_stream_error")
                                release.finish()
                            else:
                                release.feed(item)
                            if release.upstream_done or release.reading_paused or release.wants_check or queue.empty():
                                break
                            item = taken(queue.get_nowait())
                        if release.upstream_done and upstream_ended_at is None:
                            upstream_ended_at = time.perf_counter()
                    else:
                        due = checks.pop(task)
                        try:
                            verdict = task.result()
                        except APIError as err:
                            failure = error_body(f"the output check failed: {err.message}", type=err.type,
                                                 code=err.code)
                            continue
                        except Exception as err:  # e.g. an answer over the conversation limits
                            failure = error_body(f"the output check failed: {err}", type="server_error",
                                                 code="output_check_failed")
                            continue
                        if verdict.is_unsafe:
                            release.blocked(due, verdict)
                            request.state.log.update(rail="output", flagged=1, codes=list(verdict.codes))
                        else:
                            release.passed(due)
            for raw in release.releasable():  # a block's closing chunk, and what passed before the failure
                yield raw
            if failure is not None:
                yield release.events.error_event(failure)
            if release.events.ends_with_done and (release.saw_done or release.all_blocked or failure is not None):
                yield b"data: [DONE]\n\n"  # as the upstream ended, or as OpenAI ends a stream it cut
            if 0 in release.choices:  # (a no-op but for the Responses API: one answer, choice 0)
                remember(release.events.answer_id, release.choices[0].text)
            tail = time.perf_counter() - upstream_ended_at if upstream_ended_at is not None else 0.0
            state.metrics.added.labels("true").observe(added + tail)
        finally:
            for task in [*checks, *([getter] if getter else []), reader]:
                task.cancel()
            with contextlib.suppress(Exception):
                await resp.aclose()

    app.add_middleware(GatewayMiddleware, state=server)  # type: ignore[arg-type]
    return app
