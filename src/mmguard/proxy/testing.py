"""Run any ASGI app (the proxy, a stub upstream) on 127.0.0.1 in a background thread: tests, benches."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import Request  # module level: FastAPI resolves the stub's annotations here

__all__ = ["LiveApp", "LiveProxy"]


class LiveApp:
    """``with LiveApp(app) as srv: httpx.get(srv.url + "/healthz")``: a free port chosen by the OS, bounded waits."""

    def __init__(self, app: Any, *, startup_timeout: float = 60.0) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mmguard-live-app", daemon=True)
        self.startup_timeout = startup_timeout
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("live app did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class LiveProxy(LiveApp):
    """The proxy for ``guard`` on loopback; waits until its guard is warm."""

    def __init__(self, guard: Any, settings: Any, *, startup_timeout: float = 60.0) -> None:
        from .app import create_proxy_app

        super().__init__(create_proxy_app(guard, settings), startup_timeout=startup_timeout)

    def __enter__(self) -> LiveProxy:
        super().__enter__()
        deadline = time.monotonic() + self.startup_timeout
        while not self.app.state.mmguard.ready:
            if time.monotonic() > deadline:
                raise RuntimeError("live proxy did not become ready")
            time.sleep(0.02)
        return self


class StubUpstream:
    """A minimal OpenAI-compatible chat server (FastAPI) answering a fixed text, streamed one word a chunk.

    It records every request (``requests``: JSON body and headers) so tests can see what reached it.
    ``required_key``: answer 401 unless ``Authorization: Bearer <key>``.
    """

    def __init__(self, answer: str = "Hello there!", *, required_key: str | None = None,
                 send_done: bool = True) -> None:
        self.answer = answer
        self.required_key = required_key
        self.send_done = send_done
        self.requests: list[dict[str, Any]] = []
        self.app = self._build()

    def words(self) -> list[str]:
        parts = self.answer.split(" ")
        return [p if i == 0 else " " + p for i, p in enumerate(parts)]

    def _build(self) -> Any:
        import json

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI()

        def denied(request: Request) -> JSONResponse | None:
            if self.required_key and request.headers.get("authorization") != f"Bearer {self.required_key}":
                return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}}, status_code=401)
            return None

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            return denied(request) or {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0,
                                                                   "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append({"body": body, "headers": dict(request.headers)})
            refused = denied(request)
            if refused is not None:
                return refused
            n = int(body.get("n") or 1)
            base = {"id": "chatcmpl-stub", "created": 1700000000, "model": body.get("model", "stub")}
            if not body.get("stream"):
                return {**base, "object": "chat.completion", "system_fingerprint": None,
                        "choices": [{"index": i, "message": {"role": "assistant", "content": self.answer},
                                     "finish_reason": "stop", "logprobs": None} for i in range(n)],
                        "usage": {"prompt_tokens": 5, "completion_tokens": len(self.words()), "total_tokens": 9}}

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                payload = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
                return b"data: " + json.dumps(payload).encode() + b"\n\n"

            async def events() -> Any:
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for word in self.words():
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"content": word}, "finish_reason": None}])
                for i in range(n):
                    yield chunk([{"index": i, "delta": {}, "finish_reason": "stop"}])
                yield chunk([], usage={"prompt_tokens": 5, "completion_tokens": len(self.words()), "total_tokens": 9})
                if self.send_done:
                    yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app
