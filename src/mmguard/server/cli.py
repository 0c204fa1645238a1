"""``mmguard serve``: run the moderation server with uvicorn."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli import OCR_TIMEOUT_S

__all__ = ["command"]


def _prefix_cache_args(enabled: bool, tokens: int | None) -> dict[str, Any]:
    """``Guard.from_pretrained`` keywords for the prefix cache (its own default budget unless given)."""
    args: dict[str, Any] = {"prefix_cache": enabled}
    if enabled and tokens is not None:
        args["prefix_cache_tokens"] = tokens
    return args


def _split(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return tuple(out)


def _default_model() -> str:
    from ..models import default_model_path

    return str(default_model_path())


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen now (exit 2 with one line if the address is taken), before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        typer.echo(f"error: cannot listen on {host}:{port}: {err.strerror or err}", err=True)
        raise typer.Exit(2) from None
    sock.set_inheritable(True)
    return sock


def command(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model directory or Hugging Face id (default: the bundled model)"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps or auto")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto")] = "auto",
    policy: Annotated[str | None, typer.Option(help="Policy YAML/JSON file (default: MLCommons 13)")] = None,
    threshold: Annotated[float | None, typer.Option(help="Decision threshold on P(unsafe)")] = None,
    model_id: Annotated[
        str | None,
        typer.Option(help="Model name reported in responses and listed as a shield (default: the loaded "
                     "model's directory name or Hugging Face id)"),
    ] = None,
    shield_id: Annotated[list[str] | None, typer.Option(help="Extra accepted shield id (repeatable)")] = None,
    category_names: Annotated[
        str, typer.Option(help="codes (S1..S13) or openai (OpenAI category names)")
    ] = "codes",
    category_scores: Annotated[
        str,
        typer.Option(
            help="unsafe: per-category scores for unsafe verdicts only; always: for every item (costlier)"
        ),
    ] = "unsafe",
    multi_image: Annotated[
        str, typer.Option(help="error (OpenAI's too_many_images) or each (judge per image)")
    ] = "error",
    max_batch_size: Annotated[int, typer.Option(help="Largest model batch")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait to fill a batch")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Conversations that may wait; beyond: 429")] = 512,
    max_queued_images: Annotated[int, typer.Option(
        min=1, help="Conversations with an image that may wait (about 31 MB each); beyond: 429")] = 64,
    request_timeout: Annotated[float, typer.Option(help="Seconds per request; beyond: 504")] = 30.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds for a client to send its whole request body; beyond: 408")
    ] = 30.0,
    fail_closed: Annotated[
        bool, typer.Option("--fail-closed/--fail-open", help="On a model error answer unsafe instead of 503")
    ] = False,
    api_key: Annotated[
        list[str] | None, typer.Option(help="Accepted Bearer key (repeatable); also MMGUARD_API_KEYS=k1,k2")
    ] = None,
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
        list[str] | None,
        typer.Option(
            help="Allow fetching http(s) image URLs from this host "
            "(repeatable; '*.example.com' for subdomains)"
        ),
    ] = None,
    remote_image_timeout: Annotated[float, typer.Option(help="Seconds to fetch a remote image")] = 5.0,
    log_content: Annotated[bool, typer.Option(help="Log conversation text (off by default)")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    torch_threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch (default on CPU: cores - 1, leaving one to the HTTP event loop)"
        ),
    ] = None,
    metrics_auth: Annotated[bool, typer.Option(help="Require the API key for /metrics too")] = False,
    fast: Annotated[
        bool, typer.Option(help="FastEngine: exact mask-free vision attention, each distinct image encoded once "
                           "(a prompt and a response check of one image share it, see --keep-images)")
    ] = False,
    keep_images: Annotated[
        int, typer.Option(min=0, help="With --fast: image encodings kept across batches (LRU), so a response "
                          "check that arrives after the prompt check reuses its encoding; ~52 MB each at 11B bf16")
    ] = 32,
    mask_free_text: Annotated[
        bool, typer.Option(help="With --fast: right-padded batches, no attention mask in the one forward pass "
                           "(exact; opt-in until measured faster on your GPU)")
    ] = False,
    quantize: Annotated[
        str | None, typer.Option(help="Approximation, implies --fast: int8 or fp8 (torchao; fp8 needs H100/H200). "
                                 "Measure its agreement first: bench/approx_agreement.py")
    ] = None,
    prefix_cache: Annotated[
        bool, typer.Option(help="Keep the KV of the template prefix (task and categories) and of recent "
                           "conversations (exact; plain engine only, ignored with --fast)")
    ] = True,
    prefix_cache_tokens: Annotated[
        int | None, typer.Option(min=1, help="Tokens of KV the prefix cache may hold (LRU; default 8192; ~46 KB "
                                 "each on mmguard-mini v2, ~130 KB on the 11B in bf16)")
    ] = None,
    read_text: Annotated[
        str, typer.Option("--read-text", help="Read text in images with OCR and judge it with a second, text-only "
                          "check: off, on, or auto (on when the model cannot read, e.g. mmguard-mini v2)")
    ] = "auto",
    ocr_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds of OCR per image; beyond it the verdict carries a warning")
    ] = OCR_TIMEOUT_S,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(min=64, help="Longest conversation judged, in tokens with the template (default: "
                                 "the model's context, 8,128 on mmguard-mini v2); longer ones get 400 naming the "
                                 "limit. Bounds the time one request holds the model (2 CPU cores: 7k tokens 28 s)")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="uvicorn (one process) or ray (Ray Serve: --replicas guards behind this address; "
                          "needs mmguard[ray], see docs/scale-out.md)")
    ] = "uvicorn",
    replicas: Annotated[int, typer.Option(min=1, help="With --engine ray: replicas, each with its own guard")] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="With --engine ray: an existing cluster (default: start a local one)")
    ] = None,
    gpus_per_replica: Annotated[float, typer.Option(min=0, help="With --engine ray: GPUs per replica")] = 0.0,
) -> None:
    """Serve the guard over HTTP: OpenAI /v1/moderations, /v1/guard/classify, llama-stack shields."""
    import uvicorn

    from ..engine import EngineError
    from ..guard import READ_TEXT_MODES, Guard
    from ..ocr import OcrUnavailable
    from .app import create_app
    from .jsonlog import configure_logging
    from .settings import ServerSettings, served_model_id

    configure_logging(log_level)
    if read_text not in READ_TEXT_MODES:
        raise typer.BadParameter(f"--read-text must be off, auto or on, got {read_text!r}")
    keys = _split(api_key) + _split([os.environ.get("MMGUARD_API_KEYS", "")])
    hosts = _split(remote_image_host)
    try:
        settings = ServerSettings(
            model_id=model_id or served_model_id(model or _default_model()),
            shield_ids=("meta-llama/Llama-Guard-3-11B-Vision", *_split(shield_id)),
            threshold=threshold,
            category_names=category_names,  # type: ignore[arg-type]
            category_scores=category_scores,  # type: ignore[arg-type]
            multi_image=multi_image,  # type: ignore[arg-type]
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_queued_images=max_queued_images,
            request_timeout_s=request_timeout,
            body_timeout_s=body_timeout,
            fail_closed=fail_closed,
            api_keys=keys,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            max_inflight_bytes=int(max_inflight_mb * 1024 * 1024),
            max_text_chars=max_text_chars,
            max_image_bytes=int(max_image_mb * 1024 * 1024),
            max_image_frames=max_image_frames,
            remote_images=bool(hosts),
            remote_image_hosts=hosts,
            remote_image_timeout_s=remote_image_timeout,
            log_content=log_content,
            metrics_public=not metrics_auth,
            torch_threads=torch_threads,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if engine not in ("uvicorn", "ray"):
        raise typer.BadParameter(f"--engine must be uvicorn or ray, got {engine!r}")
    if policy is not None:  # a bad policy file is a usage error, found before minutes of model loading
        from ..policy import PolicyError, load_policy

        try:
            load_policy(policy)
        except (PolicyError, OSError, ValueError) as err:
            typer.echo(f"error: --policy: {err}", err=True)
            raise typer.Exit(2) from None
    # the prefix cache runs on the plain engine; --fast and its options select FastEngine
    cache_args = _prefix_cache_args(prefix_cache and not (fast or quantize or mask_free_text), prefix_cache_tokens)
    if engine == "ray":
        try:
            from .ray_serve import run_on_ray
        except ImportError as err:
            typer.echo(f"error: --engine ray needs Ray Serve: pip install 'mmguard[ray]' ({err})", err=True)
            raise typer.Exit(2) from None
        ray_fast = {"keep_images": keep_images, "mask_free_text": mask_free_text, "quantize": quantize}
        guard_args = {"model": model, "device": device, "dtype": dtype, "policy": policy, "fast": fast,
                      "fast_options": ray_fast if (fast or quantize or mask_free_text) else None,
                      "read_text": read_text, "ocr_timeout_s": ocr_timeout, "max_prompt_tokens": max_prompt_tokens,
                      **cache_args}
        if torch_threads is None and not gpus_per_replica:
            settings = replace(settings, torch_threads=1)  # replicas share the machine's cores
        run_on_ray(guard_args, settings, host=host, port=port, replicas=replicas, ray_address=ray_address,
                   num_gpus=gpus_per_replica)
        return
    if torch_threads is None and device in ("cpu", "auto"):
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            settings = replace(settings, torch_threads=max(1, (os.cpu_count() or 2) - 1))
    # the port first: a busy port fails in a second, before minutes of model loading
    listener = _listen(host, port)
    fast_options = None
    if fast or quantize or mask_free_text:
        fast_options = {"keep_images": keep_images, "mask_free_text": mask_free_text, "quantize": quantize}

    def load_guard() -> Guard:  # in the background: the server already answers /readyz meanwhile
        try:
            return Guard.from_pretrained(
                Path(model) if model and Path(model).exists() else model, device=device, dtype=dtype,
                policy=policy, fast=fast, fast_options=fast_options, read_text=read_text, ocr_timeout_s=ocr_timeout,
                max_prompt_tokens=max_prompt_tokens, **cache_args,
            )
        except OcrUnavailable as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(3) from None
        except EngineError as err:
            typer.echo(f"error: cannot load model {model or '(default)'}: {err}", err=True)
            raise typer.Exit(3) from None

    def load_or_stop() -> Guard:
        try:
            return load_guard()
        except BaseException:
            server.should_exit = True  # a server without its model has nothing to serve: exit 3 below
            raise

    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo("warning: serving on a non-loopback address without API keys", err=True)
    app = create_app(None, settings, loader=load_or_stop)
    from .http_protocol import HeaderDeadlineProtocol

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, http=HeaderDeadlineProtocol))
    server.run(sockets=[listener])
    if app.state.mmguard.load_error is not None:  # the loader has said why on stderr
        raise typer.Exit(3)
