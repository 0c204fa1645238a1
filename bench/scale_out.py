"""Scale-out on this machine, in one run: ``mmguard batch`` on the local engine against Ray Data, and
``mmguard serve`` against Ray Serve (``mmguard serve --engine ray``): items/s, the ratios, and the cost of
starting each.

    .venv/bin/python bench/scale_out.py                       # the default model, 240 lines, 2 Ray workers
    .venv/bin/python bench/scale_out.py --model tiny --lines 480 --workers 2 --replicas 2 --requests 200

Ray binds non-loopback addresses even when told 127.0.0.1, so the script re-runs itself inside a fresh
network namespace that has only loopback (``unshare -n``, and a PID namespace so nothing outlives it; needs
root) and refuses to start Ray anywhere else. Servers listen on 127.0.0.1; the load is bounded by
``--requests`` and per-request timeouts.

Batch: startup = from the start until the first chunk is committed, less that chunk's own judging time
(the local engine loads one guard; Ray starts its cluster and an actor pool that each load one); items/s =
lines / time from the end of startup to the last chunk. Serving: startup = process start until /readyz
answers 200; items/s = ``--requests`` moderation requests (one item each) at ``--concurrency`` in flight.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def loopback_only() -> bool:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines) == ["lo"]


def reexec_in_namespace() -> None:
    inner = f"ip link set lo up && exec {shlex.quote(sys.executable)} {' '.join(map(shlex.quote, sys.argv))}"
    for ns in (["unshare", "-n", "-p", "-f", "--mount-proc"], ["unshare", "-n"]):
        probe = subprocess.run([*ns, "true"], capture_output=True)
        if probe.returncode == 0:
            os.execvp(ns[0], [*ns, "sh", "-c", inner])
    sys.exit("error: cannot create a loopback-only network namespace (unshare -n needs root); Ray is not started")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- batch ----------------------------------------------------------------------------------------------


def bench_batch(engine: str, src: Path, out: Path, spec: Any, workers: int, chunk_size: int,
                torch_threads: int | None = None) -> dict[str, float]:
    from mmguard.batch import BatchOptions, run_batch

    done: list[tuple[float, float]] = []  # (time completed, the chunk's own seconds)
    t0 = time.perf_counter()
    summary = run_batch([str(src)], str(out), spec, BatchOptions(chunk_size=chunk_size), engine=engine,
                        workers=workers, torch_threads=torch_threads,
                        on_chunk=lambda r: done.append((time.perf_counter(), r.seconds)))
    assert not summary.failed, summary.failed
    first_end, first_seconds = done[0]
    started = first_end - first_seconds
    return {"startup_s": started - t0, "items_per_s": summary.lines / (done[-1][0] - started),
            "lines": summary.lines, "total_s": time.perf_counter() - t0}


# -- serving --------------------------------------------------------------------------------------------


def start_server(cmd: list[str], port: int, timeout: float) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server writes to it for as long as it runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout:.0f} s")


def load(port: int, requests: int, concurrency: int) -> float:
    texts = [f"request {i}: " + "please summarise this paragraph about the weather. " * (1 + i % 4)
             for i in range(requests)]
    with httpx.Client(timeout=60, trust_env=False, limits=httpx.Limits(max_connections=concurrency)) as client:

        def one(text: str) -> int:
            return client.post(f"http://{HOST}:{port}/v1/moderations", json={"input": text}).status_code

        one("warm-up")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            codes = list(pool.map(one, texts))
        elapsed = time.perf_counter() - t0
    bad = [c for c in codes if c != 200]
    assert not bad, f"{len(bad)} requests failed: {sorted(set(bad))}"
    return requests / elapsed


def bench_serve(model: str, extra: list[str], requests: int, concurrency: int) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "mmguard.cli", "serve", "-m", model, "--port", str(port), "--host", HOST,
           "--log-level", "warning", *extra]
    proc, startup = start_server(cmd, port, timeout=240)
    try:
        rate = load(port, requests, concurrency)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"startup_s": startup, "items_per_s": rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or id; 'tiny': a tiny random model (plumbing "
                    "only); default: the bundled default model")
    ap.add_argument("--lines", type=int, default=240, help="conversations in the batch input")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="Ray Data actors")
    ap.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if not loopback_only():
        reexec_in_namespace()
    # as the PID namespace's init this process would ignore a plain SIGTERM: exit on it (cleanup runs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from test_batch import write_conversations

    from mmguard.batch import GuardSpec

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model == "tiny":
            from mmguard.tiny import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(work / "tiny", seed=0))
        elif model is None:
            from mmguard.models import default_model_path

            model = str(default_model_path())
        src = write_conversations(work / "in", n=args.lines)
        spec = GuardSpec(model=model, device="cpu", dtype="float32")
        cores = os.cpu_count() or 1
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"model {Path(model).name}, {args.lines} lines in chunks of {args.chunk_size}, {cores} cores", flush=True)
        import torch

        default_threads = torch.get_num_threads()
        local_default = bench_batch("local", src, work / "out-local-default", spec, 1, args.chunk_size)
        # the baseline: one torch thread, as each Ray actor gets (OpenMP threads spinning on busy cores
        # slow small models down many times over)
        print(f"local engine, {default_threads} threads: {local_default}", flush=True)
        local = bench_batch("local", src, work / "out-local", spec, 1, args.chunk_size, torch_threads=1)
        print(f"local engine, 1 thread: {local}", flush=True)
        torch.set_num_threads(default_threads)
        import ray

        t0 = time.perf_counter()
        for attempt in range(3):  # Ray gives its raylet a fixed 30 s to start: a busy machine can miss it
            try:
                ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
                break
            except Exception as err:
                print(f"ray.init failed ({err}); retrying", flush=True)
                ray.shutdown()
                if attempt == 2:
                    raise
        ray_init = time.perf_counter() - t0
        on_ray = bench_batch("ray", src, work / "out-ray", spec, args.workers, args.chunk_size)
        on_ray["startup_s"] += ray_init
        print(f"Ray Data: {on_ray} (ray.init {ray_init:.1f} s)", flush=True)
        ray.shutdown()
        served = bench_serve(model, ["--device", "cpu", "--dtype", "float32"], args.requests, args.concurrency)
        print(f"mmguard serve: {served}", flush=True)
        on_serve = bench_serve(model, ["--device", "cpu", "--dtype", "float32", "--engine", "ray",
                                       "--replicas", str(args.replicas)], args.requests, args.concurrency)
    print(f"\nload average before / after: {load_before} / {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'':34} {'items/s':>9} {'startup s':>10}")
    rows = [(f"batch, local engine ({default_threads} threads)", local_default),
            ("batch, local engine (1 thread)", local), (f"batch, Ray Data ({args.workers} actors)", on_ray),
            ("mmguard serve (1 process)", served), (f"Ray Serve ({args.replicas} replicas)", on_serve)]
    for name, r in rows:
        print(f"{name:34} {r['items_per_s']:9.1f} {r['startup_s']:10.1f}")
    print(f"\nRay Data / local engine (1 thread): {on_ray['items_per_s'] / local['items_per_s']:.2f}x items/s, "
          f"startup {on_ray['startup_s'] - local['startup_s']:+.1f} s")
    print(f"Ray Serve / mmguard serve: {on_serve['items_per_s'] / served['items_per_s']:.2f}x items/s, "
          f"startup {on_serve['startup_s'] - served['startup_s']:+.1f} s "
          f"({args.requests} requests, {args.concurrency} in flight)")


if __name__ == "__main__":
    main()
