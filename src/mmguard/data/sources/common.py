"""What every converter shares: each source's licence and split policy, how one item is built, and the
readers for the files of ``shared/datasets``."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema import DataError, Example, Label, sort_codes
from ..split import assign_split, content_id

__all__ = ["SOURCES", "SourceSpec", "assistant_message", "csv_rows", "jsonl_rows", "make_example", "read_json",
           "user_message"]


@dataclass(frozen=True)
class SourceSpec:
    """Licence and split policy of one source.

    noncommercial: CC BY-NC and alike; may never train a model we ship.
    test_only: always split ``test`` and never trainable; ``why`` gives the reason.
    """

    license: str
    noncommercial: bool = False
    test_only: bool = False
    why: str = ""

    @property
    def trainable(self) -> bool:
        return not (self.noncommercial or self.test_only)


SOURCES: dict[str, SourceSpec] = {
    "ailuminate_demo": SourceSpec("CC-BY-4.0"),
    "xstest": SourceSpec(
        "CC-BY-4.0",
        test_only=True,
        why="the key text false-positive benchmark (MANIFEST); kept clean for evaluation",
    ),
    "xstest_completions": SourceSpec(
        "CC-BY-4.0 prompts; completions under Meta/Mistral/OpenAI terms",
        test_only=True,
        why="completions repeat the xstest prompts, which are test-only",
    ),
    "simplesafetytests": SourceSpec(
        "CC-BY-4.0", test_only=True, why="a 100-item benchmark suite kept for evaluation"
    ),
    "figstep_safebench": SourceSpec(
        "MIT",
        test_only=True,
        why="the image-channel benchmark; our own typographic generator supplies training images",
    ),
    "mm_harmfulbench": SourceSpec(
        "Apache-2.0 (repo); web-scraped images, rights not cleared",
        test_only=True,
        why="MANIFEST: images not cleared, internal evaluation only",
    ),
    "advbench": SourceSpec("MIT"),
    "donotanswer": SourceSpec("Apache-2.0"),
    "gptfuzz_labeled_responses": SourceSpec("MIT (labels); responses under Vicuna/OpenAI/Llama-2 terms"),
    "alpaca_harmless": SourceSpec("CC-BY-NC-4.0", noncommercial=True),
    "selfinstruct_benign": SourceSpec("Apache-2.0"),
    "mtbench_benign": SourceSpec("Apache-2.0"),
    "skimage_benign_photos": SourceSpec("CC0/public domain (per image); BSD-3-Clause repo"),
    "truthfulqa": SourceSpec("Apache-2.0"),
    "gsm8k": SourceSpec("MIT"),
    "humaneval": SourceSpec("MIT"),
    "cyberseceval_frr": SourceSpec("MIT"),
    "toxigen_neutral": SourceSpec("CDLA-Permissive-2.0"),
    "coconot_contrast": SourceSpec("MIT (prompts); chosen responses under OpenAI terms"),
    "phtest": SourceSpec("MIT"),
    "arenahard_prompts": SourceSpec("Apache-2.0"),
    "medquad": SourceSpec("CC-BY-4.0"),
}


def user_message(text: str | None, image: str | None = None) -> dict[str, Any]:
    """A user message; the image part comes first, as the Llama Guard template places ``<|image|>``."""
    parts: list[dict[str, Any]] = []
    if image is not None:
        parts.append({"type": "image", "path": image})
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def assistant_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def make_example(
    source: str,
    *,
    prompt: str | None,
    response: str | None = None,
    label: Label,
    codes: Iterable[str] = (),
    candidates: Iterable[str] = (),
    image: str | None = None,
    image_key: str | None = None,
    meta: Mapping[str, Any] | None = None,
    split_key: str | None = None,
    spec: SourceSpec | None = None,
    id_extra: Iterable[str] = (),
) -> Example:
    """One schema item with id, split, licence and codes bookkeeping done the same way for every source.

    ``candidates``: possible codes when the mapping is ambiguous (recorded, not used as gold).
    ``image_key``: a stable identity of the image (file name, rendering recipe) for id and split hashing,
    because image paths change when a build copies the file.
    ``split_key``: the text that decides the split (default: the user text); synthesized items pass
    their origin's key so that they share its split.
    """
    spec = spec or SOURCES[source]
    codes_l = sort_codes(codes)
    cand_l = sort_codes(candidates)
    m: dict[str, Any] = dict(meta or {})
    if label == "unsafe" and not codes_l:
        m["codes_status"] = "ambiguous" if cand_l else "unlabeled"
        if cand_l:
            m["candidate_codes"] = cand_l
    if label == "safe" and codes_l:
        raise DataError(f"{source}: safe item given codes {codes_l}")
    if spec.test_only:
        m.setdefault("test_only_reason", spec.why)
    messages = [user_message(prompt, image)]
    if response is not None:
        messages.append(assistant_message(response))
    task = "response" if response is not None else "prompt"
    key = (
        split_key
        if split_key is not None
        else (prompt or "") + (f"\x00{image_key}" if image_key and not prompt else "")
    )
    ident = content_id(source, task, prompt or "", response or "", image_key or "", *id_extra)
    return Example(
        id=ident,
        source=source,
        license=spec.license,
        split=assign_split(key, test_only=spec.test_only),
        task=task,
        messages=messages,
        label=label,
        codes=codes_l,
        modality="image+text" if image is not None else "text",
        trainable=spec.trainable,
        meta=m,
    )


def csv_rows(path: Path) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"expected file {path} (see shared/datasets/MANIFEST.md)")
    with path.open(encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"expected file {path} (see shared/datasets/MANIFEST.md)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"expected file {path} (see shared/datasets/MANIFEST.md)")
    return json.loads(path.read_text(encoding="utf-8"))
