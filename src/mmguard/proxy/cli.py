"""``mmguard proxy``: run the guardrail proxy with uvicorn."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..server.cli import _split

__all__ = ["command"]


def command(
    upstream: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Guard model directory or Hugging Face id (default: bundled)")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8080,
    rails: Annotated[str, typer.Option(help="input, output or input,output")] = "input,output",
    check_every: Annotated[
        int, typer.Option(min=1, help="Check a streamed answer each time this many new tokens arrived (and at its end)")
    ] = 32,
    release: Annotated[
        str, typer.Option(help="checked: send text only once a check covering it passed; eager: send at once "
                          "(may leak up to one --check-every window before a block)")
    ] = "checked",
    mode: Annotated[
        str, typer.Option(help="block: stop what a rail flags; score: judge and report (an 'mmguard' field, the "
                          "mmguard_proxy_flags metric) without blocking, a shadow mode to measure the guard first")
    ] = "block",
    judge_reasoning: Annotated[
        bool, typer.Option(help="Also judge and hold back the answer's reasoning (reasoning_content / reasoning), "
                           "for clients that show it; off, it passes unjudged")
    ] = False,
    remember_responses: Annotated[
        int, typer.Option(min=0, help="Responses API conversations kept (LRU, text only, this process) so that a "
                          "request with previous_response_id is judged with its earlier turns; 0: none")
    ] = 10_000,
    history_chars: Annotated[
        int, typer.Option(min=0, help="Judge only the last N characters of the turns before the judged one (0: "
                          "all; a history past the guard's context is then refused with a 400)")
    ] = 0,
    prefix_cache: Annotated[
        bool, typer.Option(help="Reuse the KV of shared prompt prefixes and of the answer checked so far (exact)")
    ] = True,
    prefix_cache_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens of KV the prefix cache may hold (LRU)")
    ] = 32768,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps or auto")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "auto",
    policy: Annotated[str | None, typer.Option(help="Policy YAML/JSON file (default: MLCommons 13)")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Category codes to leave out")] = None,
    threshold: Annotated[float | None, typer.Option(help="Decision threshold on P(unsafe)")] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(help="The proxy's own key, sent by clients in X-MMGuard-API-Key (repeatable); also "
                     "MMGUARD_PROXY_KEYS=k1,k2. Authorization is forwarded to the upstream."),
    ] = None,
    upstream_timeout: Annotated[float, typer.Option(help="Seconds to connect to / wait on each read of the upstream")
                                ] = 120.0,
    answer_timeout: Annotated[float, typer.Option(
        help="Seconds a plain answer may take in all, and a stream between two checked releases; beyond: 504")
    ] = 600.0,
    max_batch_size: Annotated[int, typer.Option(help="Largest guard batch")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait to fill a guard batch")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Checks that may wait; beyond: 429")] = 512,
    max_queued_images: Annotated[int, typer.Option(
        min=1, help="Conversations with an image that may wait (about 31 MB each); beyond: 429")] = 64,
    request_timeout: Annotated[float, typer.Option(help="Seconds per guard check; beyond: 504")] = 30.0,
    fail_closed: Annotated[
        bool, typer.Option("--fail-closed/--fail-open", help="On a guard error block instead of answering 503")
    ] = False,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB")] = 32.0,
    max_inflight_mb: Annotated[float, typer.Option(
        min=1, help="Request bodies held at once, in MiB (by declared length); beyond: 429 server_busy")] = 256.0,
    max_text_chars: Annotated[int, typer.Option(
        help="Characters of text one request may hold in all (400 text_too_long)")] = 1_000_000,
    max_image_mb: Annotated[float, typer.Option(help="Largest image in MiB")] = 20.0,
    max_image_frames: Annotated[int, typer.Option(
        min=1, help="An animation's frames read by OCR (the model judges the first); with --fail-closed and a model "
                    "that cannot read, a longer animation is blocked")] = 8,
    remote_image_host: Annotated[
        list[str] | None, typer.Option(help="Allow fetching http(s) image URLs from this host (repeatable)")
    ] = None,
    remote_image_timeout: Annotated[float, typer.Option(help="Seconds to fetch a remote image")] = 5.0,
    log_content: Annotated[bool, typer.Option(help="Log conversation text (off by default)")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    torch_threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default on CPU: cores - 1)")
                             ] = None,
    metrics_auth: Annotated[bool, typer.Option(help="Require the proxy key for /metrics too")] = False,
    fast: Annotated[bool, typer.Option(help="FastEngine (exact; see mmguard serve --help); no prefix cache")] = False,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(min=64, help="Longest conversation the guard judges, in tokens with the template "
                                 "(default: the model's context); past it a prompt gets 400 and an answer stops")
    ] = None,
) -> None:
    """Guardrail proxy: OpenAI chat completions and Responses through Llama Guard input and output rails."""
    import uvicorn

    from ..engine import EngineError
    from ..guard import Guard
    from ..policy import PolicyError
    from ..server.jsonlog import configure_logging
    from ..server.settings import ServerSettings
    from .app import create_proxy_app
    from .settings import ProxySettings

    configure_logging(log_level)
    hosts = _split(remote_image_host)
    keys = _split(api_key) + _split([os.environ.get("MMGUARD_PROXY_KEYS", "")])
    try:
        guard_settings = ServerSettings(
            threshold=threshold, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
            max_queued_images=max_queued_images,
            request_timeout_s=request_timeout, fail_closed=fail_closed, max_body_bytes=int(max_body_mb * 1024 * 1024),
            max_inflight_bytes=int(max_inflight_mb * 1024 * 1024),
            max_text_chars=max_text_chars,
            max_image_bytes=int(max_image_mb * 1024 * 1024), max_image_frames=max_image_frames,
            remote_images=bool(hosts), remote_image_hosts=hosts,
            remote_image_timeout_s=remote_image_timeout, log_content=log_content, metrics_public=not metrics_auth,
            torch_threads=torch_threads)
        settings = ProxySettings(upstream=upstream, rails=_split([rails]), check_every=check_every,
                                 release=release, mode=mode, api_keys=keys,  # type: ignore[arg-type]
                                 upstream_timeout_s=upstream_timeout, answer_timeout_s=answer_timeout,
                                 judge_reasoning=judge_reasoning,
                                 remember_responses=remember_responses, history_chars=history_chars,
                                 guard=guard_settings)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if torch_threads is None and device in ("cpu", "auto"):
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            settings = replace(settings, guard=replace(guard_settings, torch_threads=max(1, (os.cpu_count() or 2) - 1)))
    try:
        guard = Guard.from_pretrained(Path(model) if model and Path(model).exists() else model, device=device,
                                      dtype=dtype, policy=policy, fast=fast, max_prompt_tokens=max_prompt_tokens)
    except EngineError as err:
        typer.echo(f"error: cannot load model {model or '(default)'}: {err}", err=True)
        raise typer.Exit(3) from None
    codes = _split(exclude)
    if codes:
        try:
            guard.policy = guard.policy.exclude(codes)
        except PolicyError as err:
            raise typer.BadParameter(str(err)) from None
    if prefix_cache and not fast:
        from ..prefix_cache import enable_prefix_cache

        enable_prefix_cache(guard, max_tokens=prefix_cache_tokens)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo("warning: the proxy listens on a non-loopback address without a proxy key", err=True)
    from ..server.http_protocol import HeaderDeadlineProtocol

    uvicorn.run(create_proxy_app(guard, settings), host=host, port=port, log_config=None, access_log=False,
                http=HeaderDeadlineProtocol)
