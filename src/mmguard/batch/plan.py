"""A batch job's plan: its settings and fingerprint, the deterministic chunks, and the manifest.

A chunk is a run of ``chunk_size`` consecutive non-blank lines of one input file, named by position
(``part-IIIII-CCCCCC.jsonl``: input index, chunk index in that input). Chunks are the unit of work,
retry and commit, so the same inputs and chunk size always give the same chunks and part names.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..jsonl import dumps_utf8
from ..models import model_identity, sampled_digest
from ..ocr import DEFAULT_OCR_TIMEOUT_S
from .storage import StorageError, iter_lines, join, open_storage

__all__ = [
    "MANIFEST_NAME",
    "Chunk",
    "FingerprintMismatch",
    "GuardSpec",
    "InputFile",
    "JobPlan",
    "fingerprint",
    "model_identity",
    "plan_inputs",
]

MANIFEST_NAME = "manifest.json"
_PART_NAME = re.compile(r"part-\d{5,}-\d{6,}\.jsonl")
MANIFEST_FORMAT = 1


class FingerprintMismatch(ValueError):
    """``--resume`` with settings that differ from the job's; the message lists what differs."""


@dataclass(frozen=True)
class GuardSpec:
    """How every worker loads the same guard (picklable: it travels to Ray actors)."""

    model: str | None = None
    policy: dict[str, Any] | None = None  # Policy.to_dict(), exclusions applied
    threshold: float | None = None  # None: the model's own per-task thresholds (mmguard.json), else 0.5
    prompt_format: str = "hf"
    markers: str = "escape"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    fast: bool = False
    fast_options: dict[str, Any] | None = None
    read_text: str = "auto"  # OCR stage: off / auto (on for models that cannot read) / on
    ocr_timeout_s: float = DEFAULT_OCR_TIMEOUT_S
    max_prompt_tokens: int | None = None  # None: the model's context

    def load(self) -> Any:
        from ..guard import Guard

        model = self.model
        return Guard.from_pretrained(
            Path(model) if model and Path(model).exists() else model,
            policy=self.policy, device=self.device, dtype=self.dtype, threshold=self.threshold,
            prompt_format=self.prompt_format, markers=self.markers, batch_size=self.batch_size,
            fast=self.fast, fast_options=self.fast_options, read_text=self.read_text,
            ocr_timeout_s=self.ocr_timeout_s, max_prompt_tokens=self.max_prompt_tokens,
        )


@dataclass(frozen=True)
class Chunk:
    part: str  # output file name
    input: int  # index into the job's inputs
    first_line: int  # 1-based physical line number of its first non-blank line
    lines: int  # non-blank lines = output rows
    start: int  # byte range in the input
    end: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Chunk:
        chunk = cls(part=str(d["part"]), input=int(d["input"]), first_line=int(d["first_line"]),
                    lines=int(d["lines"]), start=int(d["start"]), end=int(d["end"]))
        if not _PART_NAME.fullmatch(chunk.part):  # a part is written where its name says: inside the output folder
            raise ValueError(f"part name {chunk.part[:80]!r} is not part-IIIII-CCCCCC.jsonl")
        if min(chunk.input, chunk.first_line, chunk.lines, chunk.start) < 0 or chunk.end < chunk.start:
            raise ValueError(f"chunk {chunk.part}: a negative count, or a byte range that ends before it starts")
        return chunk


@dataclass(frozen=True)
class InputFile:
    uri: str
    size: int
    lines: int = 0
    chunks: int = 0
    digest: str = ""  # sha256 of the size, first and last MiB (input_digest): an edit of the same size shows


@dataclass
class JobPlan:
    fingerprint: str
    settings: dict[str, Any]
    inputs: list[InputFile]
    chunks: list[Chunk]
    done: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> stats, as recorded
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "mmguard_batch": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": [asdict(i) for i in self.inputs],
            "chunks": [asdict(c) for c in self.chunks],
            "done": dict(sorted(self.done.items())),
            "summary": self.summary,
        }
        return (dumps_utf8(body, indent=1) + "\n").encode()  # a path that is not UTF-8: ASCII escapes

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> JobPlan:
        try:
            d = json.loads(raw)
            if d.get("mmguard_batch") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {d.get('mmguard_batch')!r}")
            plan = cls(
                fingerprint=str(d["fingerprint"]),
                settings=dict(d["settings"]),
                inputs=[InputFile(**i) for i in d["inputs"]],
                chunks=[Chunk.from_dict(c) for c in d["chunks"]],
                done={str(k): dict(v) for k, v in d.get("done", {}).items()},
                summary=dict(d.get("summary", {})),
            )
            if any(c.input >= len(plan.inputs) for c in plan.chunks):
                raise ValueError("a chunk names an input the manifest does not list")
            return plan
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StorageError(f"{where} is not a readable mmguard batch manifest: {err}") from None

    def write(self, output: str) -> None:
        storage, path = open_storage(join(output, MANIFEST_NAME))
        storage.write_atomic(path, self.to_json())


def input_digest(storage: Any, path: str, size: int) -> str:
    """sha256 of an input's size, first and last MiB (the whole of a file up to 2 MiB): a resumed job refuses
    an input edited in place to the same size, whose old and new rows would mix. Cheap on object stores too."""
    def read(start: int, n: int) -> bytes:
        with storage.read_range(path, start, start + n) as fh:
            return fh.read(n)

    return sampled_digest(size, read)[:32]


def job_settings(spec: GuardSpec, options: Mapping[str, Any], inputs: Iterable[InputFile]) -> dict[str, Any]:
    """Everything a verdict or a chunk boundary depends on (not the engine, workers or retries: a job may
    be resumed on another engine with another pool and gives the same rows)."""
    policy = spec.policy or {}
    return {
        "mmguard": __version__,
        "model": model_identity(spec.model),
        "policy": policy,
        "exclusions": sorted(policy.get("excluded", []) or []),
        "threshold": spec.threshold,
        "prompt_format": spec.prompt_format,
        "markers": spec.markers,
        "dtype": spec.dtype,
        "batch_size": spec.batch_size,
        "fast": bool(spec.fast or spec.fast_options),
        "fast_options": spec.fast_options or {},
        "read_text": spec.read_text,
        "ocr_timeout_s": spec.ocr_timeout_s,
        "max_prompt_tokens": spec.max_prompt_tokens,
        "options": dict(options),
        "inputs": [{"uri": i.uri, "size": i.size, "digest": i.digest} for i in inputs],
    }


def fingerprint(settings: Mapping[str, Any]) -> str:
    # ASCII escapes: a path that is not UTF-8 holds lone surrogates, which UTF-8 cannot encode
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:32]


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _is_blank(line: bytes) -> bool:
    return not line.strip()  # as mmguard.jsonl.iter_lines (classify --jsonl) skips lines


def plan_inputs(inputs: list[InputFile], chunk_size: int, max_line_bytes: int) -> tuple[list[InputFile], list[Chunk]]:
    """Read every input once and cut it into chunks of ``chunk_size`` non-blank lines."""
    planned: list[InputFile] = []
    chunks: list[Chunk] = []
    for index, inp in enumerate(inputs):
        storage, path = open_storage(inp.uri)
        own: list[Chunk] = []
        count = 0
        first = start = end = 0
        n = 0
        with storage.open_read(path) as fh:
            for lineno, (s, e, line) in enumerate(iter_lines(fh, max_line_bytes), start=1):
                if line is not None and _is_blank(line):
                    continue
                if n == 0:
                    first, start = lineno, s
                n += 1
                end = e
                count += 1
                if n == chunk_size:
                    own.append(Chunk(f"part-{index:05d}-{len(own):06d}.jsonl", index, first, n, start, end))
                    n = 0
        if n:
            own.append(Chunk(f"part-{index:05d}-{len(own):06d}.jsonl", index, first, n, start, end))
        planned.append(InputFile(inp.uri, inp.size, count, len(own), inp.digest))
        chunks.extend(own)
    return planned, chunks
