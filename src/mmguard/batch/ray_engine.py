"""The Ray engine: Ray Data over the job's chunks, an actor pool of guards (each loads the model once).

Every actor judges whole chunks and commits each part file itself (temp file + rename), so a chunk is
committed once however often Ray retries it, and a resumed job skips what is committed: the part files
are the checkpoint (Ray Data's own CheckpointConfig is beta in 2.60 and ties a job to one Ray version).
Actors that die are restarted by Ray and their chunk retried, up to ``retries`` times.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from .plan import Chunk, GuardSpec, JobPlan
from .work import ChunkJudge, ChunkResult

__all__ = ["ChunkWorker", "default_cpus_per_worker", "run_ray"]


class ChunkWorker:
    """A Ray Data callable class: one guard per actor, one chunk per call."""

    def __init__(self, spec: GuardSpec, options: Any, output: str, inputs: list[str], retries: int,
                 torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)  # several actors share a host's cores: one thread each by default
        self.judge = ChunkJudge(spec.load(), options.image_settings(), options.max_line_bytes)
        self.output = output
        self.inputs = inputs
        self.retries = retries

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        chunk = Chunk.from_dict(row)
        r = self.judge.run(self.inputs[chunk.input], chunk, self.output, self.retries)
        return {"part": r.part, "rows": r.rows, "errors": r.errors, "unsafe": r.unsafe, "attempts": r.attempts,
                "seconds": r.seconds, "failure": r.failure, "pid": os.getpid()}


def default_cpus_per_worker(cluster_cpus: float, workers: int) -> float:
    """Fractional CPUs that leave half a CPU to Ray Data's own tasks: two actors at num_cpus=1 on a
    2-CPU machine deadlocked the read task in our measurements."""
    return max(0.1, min(1.0, (cluster_cpus - 0.5) / max(1, workers)))


def run_ray(plan: JobPlan, pending: list[Chunk], on_done: Callable[[ChunkResult], None], *, spec: GuardSpec,
            options: Any, output: str, retries: int, workers: int, ray_address: str | None = None,
            cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, torch_threads: int | None = None,
            progress: bool = False) -> None:
    import ray

    if not ray.is_initialized():
        # no dashboard, quiet workers: the job's own summary is what the user reads
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = len(pending)  # a chunk that keeps failing does not stop the others
    ctx.execution_options.preserve_order = False
    cpus = cpus_per_worker if cpus_per_worker is not None else default_cpus_per_worker(
        float(ray.cluster_resources().get("CPU", 1.0)), workers)
    ds = ray.data.from_items([c.__dict__ for c in pending], override_num_blocks=len(pending))
    kwargs: dict[str, Any] = {
        "fn_constructor_kwargs": {"spec": spec, "options": options, "output": output,
                                  "inputs": [i.uri for i in plan.inputs], "retries": retries,
                                  "torch_threads": torch_threads or 1},
        "concurrency": workers,
        "num_cpus": cpus,
        "num_gpus": gpus_per_worker or None,
    }
    with warnings.catch_warnings():
        # Ray Data retries a task on a restarted actor forever by default; a chunk that keeps killing its
        # actor (a crash, not an exception) must stop. Only the deprecated remote-args path can say so.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            results = ds.map(ChunkWorker, max_task_retries=retries, **kwargs)
        except TypeError:  # a Ray without that path: its default applies
            results = ds.map(ChunkWorker, **kwargs)
    for row in results.iter_rows():
        on_done(ChunkResult(part=str(row["part"]), rows=int(row["rows"]), errors=int(row["errors"]),
                            unsafe=int(row["unsafe"]), attempts=int(row["attempts"]), seconds=float(row["seconds"]),
                            failure=str(row["failure"])))
