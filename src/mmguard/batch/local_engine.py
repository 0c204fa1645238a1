"""The local engine: one guard in this process judges the chunks in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .plan import Chunk, GuardSpec, JobPlan
from .work import ChunkJudge, ChunkResult

__all__ = ["run_local"]


def run_local(plan: JobPlan, pending: list[Chunk], on_done: Callable[[ChunkResult], None], *, spec: GuardSpec,
              options: Any, output: str, retries: int, guard: Any = None, torch_threads: int | None = None) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    judge = ChunkJudge(guard if guard is not None else spec.load(), options.image_settings(), options.max_line_bytes)
    for chunk in pending:
        on_done(judge.run(plan.inputs[chunk.input].uri, chunk, output, retries))
