"""Bounded load test of ``mmguard serve`` on loopback, against the in-process guard one request at a time.

    .venv/bin/python bench/server_load.py                 # tiny random model, levels 1,4,16,64
    .venv/bin/python bench/server_load.py --model DIR --requests 200 --levels 1,8,32 --image-every 4

The server runs in a subprocess (its own interpreter, so client and server do not share a GIL) on
127.0.0.1. For each concurrency level, ``--requests`` POST /v1/moderations are sent with at most
``level`` in flight. The baseline calls ``guard.classify`` in this process, one request at a time
(``level`` client threads queue on a lock: a guard without batching). Every request is bounded by a
timeout; the whole run is bounded by ``--requests`` x levels. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def payloads(n: int, image_every: int) -> list[dict[str, Any]]:
    from PIL import Image

    out: list[dict[str, Any]] = []
    for i in range(n):
        text = f"request {i}: " + "please summarise the following paragraph about the weather. " * (1 + i % 4)
        if image_every and i % image_every == 0:
            buf = io.BytesIO()
            Image.new("RGB", (64 + i % 32, 48), (i * 7 % 256, 80, 160)).save(buf, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            out.append({"input": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]})
        else:
            out.append({"input": text})
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drive_server(url: str, bodies: list[dict[str, Any]], level: int, timeout: float) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(level)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=level, max_keepalive_connections=level)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(body: dict[str, Any]) -> None:
            async with sem:
                t = time.perf_counter()
                r = await client.post(url + "/v1/moderations", json=body)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout * 4)
        return time.perf_counter() - start, latencies


def drive_baseline(guard: Any, convs: list[Any], level: int) -> tuple[float, list[float]]:
    lock = threading.Lock()
    latencies: list[float] = []

    def one(conv: Any) -> None:
        t = time.perf_counter()
        with lock:
            guard.classify(conv)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=level) as pool:
        list(pool.map(one, convs))
    return time.perf_counter() - start, latencies


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = float(re.search(r"^mmguard_batch_size_sum ([0-9.e+-]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^mmguard_batch_size_count ([0-9.e+-]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the tiny random-weight model)")
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--image-every", type=int, default=0, help="every k-th request carries an image (0: none)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--fast", action="store_true", help="serve with --fast (FastEngine, kept image encodings)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not 1 <= args.requests <= 10_000 or not all(1 <= lv <= 1024 for lv in levels):
        sys.exit("requests must be 1..10000 and levels 1..1024")

    import torch

    from mmguard.conversation import Conversation
    from mmguard.guard import Guard
    from mmguard.models import tiny_random_path

    model = Path(args.model) if args.model else tiny_random_path()
    torch.set_num_threads(args.torch_threads)
    guard = Guard.from_pretrained(model, device="cpu", dtype="float32")
    bodies = payloads(args.requests, args.image_every)
    convs = []
    for b in bodies:
        inp = b["input"]
        if isinstance(inp, str):
            convs.append(Conversation.prompt(inp))
        else:
            convs.append(Conversation.from_messages([{"role": "user", "content": [inp[1], inp[0]]}]))
    guard.classify(convs[0])  # warm-up

    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mmguard.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--torch-threads",
        str(args.torch_threads),
        "--max-queue",
        str(max(512, args.requests)),
        "--log-level",
        "warning",
        *(["--fast"] if args.fast else []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("server did not become ready in 120 s")
            time.sleep(0.2)

        print(
            f"model: {model}  requests/level: {args.requests}  images: every {args.image_every or '-'}  "
            f"torch threads: {args.torch_threads}  max batch: {args.max_batch_size}  "
            f"max wait: {args.max_wait_ms} ms"
        )
        header = (
            f"{'conc':>5} | {'server req/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} | "
            f"{'baseline req/s':>14} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>6}"
        )
        print(header)
        print("-" * len(header))
        for level in levels:
            asyncio.run(drive_server(url, bodies[: min(len(bodies), 2 * level)], level, args.timeout))  # warm
            s0, c0 = batch_stats(url)
            wall, lat = asyncio.run(drive_server(url, bodies, level, args.timeout))
            s1, c1 = batch_stats(url)
            bwall, blat = drive_baseline(guard, convs, level)
            rps, brps = len(bodies) / wall, len(convs) / bwall
            mean_batch = (s1 - s0) / max(1.0, c1 - c0)
            print(
                f"{level:>5} | {rps:>12.1f} {1000 * statistics.median(lat):>8.1f} "
                f"{1000 * pct(lat, 0.99):>8.1f} "
                f"{mean_batch:>10.1f} | {brps:>14.1f} {1000 * statistics.median(blat):>8.1f} "
                f"{1000 * pct(blat, 0.99):>8.1f} | {rps / brps:>5.2f}x"
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


if __name__ == "__main__":
    main()
