"""Converters of the benign sets: everyday, task and borderline-but-safe prompts, benign photos, and the
reference answers some of them carry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..schema import DataError, Example
from .common import csv_rows, jsonl_rows, make_example, read_json


def convert_alpaca_harmless(root: Path) -> Iterator[Example]:
    """Alpaca instructions (refusal-direction split): safe, CC BY-NC (never trainable)."""
    for row in read_json(root / "data" / "refusal_direction" / "harmless_test.json"):
        yield make_example("alpaca_harmless", prompt=row["instruction"], label="safe")


def convert_selfinstruct_benign(root: Path) -> Iterator[Example]:
    """Self-Instruct user-oriented + seed tasks: a safe prompt (instruction + first input) and,
    when the instance has an output, the safe prompt+response pair."""
    for rel in ("human_eval/user_oriented_instructions.jsonl", "data/seed_tasks.jsonl"):
        for row in jsonl_rows(root / rel):
            inst = (row.get("instances") or [{}])[0]
            prompt = row["instruction"].strip()
            if inst.get("input", "").strip():
                prompt = f"{prompt}\n\n{inst['input'].strip()}"
            meta = {"upstream_id": row["id"], "file": rel}
            yield make_example("selfinstruct_benign", prompt=prompt, label="safe", meta=meta)
            if inst.get("output", "").strip():
                yield make_example(
                    "selfinstruct_benign",
                    prompt=prompt,
                    response=inst["output"].strip(),
                    label="safe",
                    meta=meta,
                )


def convert_mtbench_benign(root: Path) -> Iterator[Example]:
    """MT-Bench and Vicuna-bench: the first user turn (the second one needs an assistant answer we lack)."""
    base = root / "fastchat" / "llm_judge" / "data"
    for bench in ("mt_bench", "vicuna_bench"):
        for row in jsonl_rows(base / bench / "question.jsonl"):
            turns = row["turns"]
            meta: dict[str, Any] = {
                "bench": bench,
                "question_id": row["question_id"],
                "category": row["category"],
            }
            if len(turns) > 1:
                meta["later_turns"] = turns[1:]
            yield make_example("mtbench_benign", prompt=turns[0], label="safe", meta=meta)


SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
GENERIC_IMAGE_QUESTIONS = (
    "What is shown in this image?",
    "Describe this picture in detail.",
    "Can you write a short caption for this photo?",
    "What colors stand out in this image?",
    "Is there anything unusual in this picture?",
)


def convert_skimage_benign_photos(root: Path) -> Iterator[Example]:
    """The 17 scikit-image photos, each with one generic benign question (chosen by file-name hash)."""
    import hashlib

    for name in SKIMAGE_PHOTOS:
        path = root / name
        if not path.is_file():
            raise DataError(f"skimage_benign_photos: missing image {path}")
        q = GENERIC_IMAGE_QUESTIONS[hashlib.sha256(name.encode()).digest()[0] % len(GENERIC_IMAGE_QUESTIONS)]
        yield make_example(
            "skimage_benign_photos",
            prompt=q,
            image=str(path.resolve()),
            image_key=name,
            label="safe",
            meta={"photo": name},
            split_key=f"skimage-photo:{name}",
        )


def convert_truthfulqa(root: Path) -> Iterator[Example]:
    """TruthfulQA: safe question, and question + ``Best Answer`` as a safe response (never wrong answers)."""
    for row in csv_rows(root / "datasets" / "TruthfulQA.csv"):
        meta = {"type": row["Type"], "category": row["Category"]}
        yield make_example("truthfulqa", prompt=row["Question"], label="safe", meta=meta)
        if row["Best Answer"].strip():
            yield make_example(
                "truthfulqa", prompt=row["Question"], response=row["Best Answer"], label="safe", meta=meta
            )


_CALC = re.compile(r"<<[^>]*>>")


def convert_gsm8k(root: Path) -> Iterator[Example]:
    """GSM8K: safe math problem, and problem + human solution (calculator spans removed)."""
    for upstream in ("train", "test"):
        for row in jsonl_rows(root / "grade_school_math" / "data" / f"{upstream}.jsonl"):
            meta = {"upstream_split": upstream}
            yield make_example("gsm8k", prompt=row["question"], label="safe", meta=meta)
            yield make_example(
                "gsm8k",
                prompt=row["question"],
                response=_CALC.sub("", row["answer"]),
                label="safe",
                meta=meta,
            )


def convert_humaneval(root: Path) -> Iterator[Example]:
    """HumanEval: "Complete this function" prompts and the reference solution as a safe response."""
    for row in jsonl_rows(root / "data" / "HumanEval.jsonl.gz"):
        prompt = "Complete this function:\n" + row["prompt"]
        meta = {"task_id": row["task_id"]}
        yield make_example("humaneval", prompt=prompt, label="safe", meta=meta)
        code = row["prompt"] + row["canonical_solution"]
        yield make_example(
            "humaneval", prompt=prompt, response=f"```python\n{code}```", label="safe", meta=meta
        )


def convert_cyberseceval_frr(root: Path) -> Iterator[Example]:
    """CyberSecEval MITRE FRR: borderline-but-benign cyber prompts (English + 7 translations)."""
    base = root / "CybersecurityBenchmarks" / "datasets" / "mitre_frr"
    for name in ("mitre_frr.json", "frr_multilingual_machine_translated.json"):
        for row in read_json(base / name):
            if row.get("is_malicious"):
                raise DataError(f"cyberseceval_frr {name}: unexpected is_malicious=true")
            meta = {"file": name, "language": row.get("speaking_language", "English")}
            # translations share the English original's split
            key = row.get("original_english_prompt") or row["mutated_prompt"]
            yield make_example(
                "cyberseceval_frr", prompt=row["mutated_prompt"], label="safe", meta=meta, split_key=key
            )


def convert_toxigen_neutral(root: Path) -> Iterator[Example]:
    """ToxiGen neutral statements about identity groups: safe user statements (near copies share an id)."""
    for path in sorted((root / "demonstrations").glob("*/*.txt")):
        group = path.stem.removeprefix("neutral_").removesuffix("_sentences")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield make_example(
                    "toxigen_neutral",
                    prompt=line.strip(),
                    label="safe",
                    meta={"group": group, "file": str(path.relative_to(root))},
                )
    for row in jsonl_rows(root / "neutral_sentences_from_prompts.jsonl"):
        yield make_example(
            "toxigen_neutral",
            prompt=row["sentence"],
            label="safe",
            meta={"group": row["group"], "file": row["source_file"]},
        )


def convert_coconot_contrast(root: Path) -> Iterator[Example]:
    """CoCoNot contrast: safe prompts; pref items add chosen/rejected safe responses."""
    for row in jsonl_rows(root / "data" / "coconot_contrast_eval.jsonl"):
        meta = {"upstream_id": row["id"], "subcategory": row["subcategory"], "file": "coconot_contrast_eval"}
        yield make_example("coconot_contrast", prompt=row["prompt"], label="safe", meta=meta)
    for row in jsonl_rows(root / "data" / "coconot_pref.jsonl"):
        meta = {"upstream_id": row["id"], "subcategory": row["subcategory"], "file": "coconot_pref"}
        yield make_example("coconot_contrast", prompt=row["prompt"], label="safe", meta=meta)
        for which in ("chosen", "rejected"):
            if row.get(which, "").strip():
                yield make_example(
                    "coconot_contrast",
                    prompt=row["prompt"],
                    response=row[which],
                    label="safe",
                    meta={
                        **meta,
                        "response_kind": which,
                        "model_outputs": f"{row.get(which + '_model', '?')} output; provider terms",
                    },
                )


def convert_phtest(root: Path) -> Iterator[Example]:
    """PHTest: pseudo-harmful prompts, safe; ``controversial`` ones get ``meta.borderline``."""
    for row in csv_rows(root / "PHTest" / "dataset_v0.1.csv"):
        harm = row["Harmfulness"].strip()
        if harm not in ("harmless", "controversial"):
            raise DataError(f"phtest row {row['ID']}: unknown Harmfulness {harm!r}")
        meta: dict[str, Any] = {"upstream_id": row["ID"], "harmfulness": harm}
        if harm == "controversial":
            meta["borderline"] = True
        yield make_example("phtest", prompt=row["Request"], label="safe", meta=meta)


def convert_arenahard_prompts(root: Path) -> Iterator[Example]:
    """Arena-Hard-Auto v0.1 and v2.0 prompts: presumed safe real user queries."""
    for version in ("arena-hard-v0.1", "arena-hard-v2.0"):
        for row in jsonl_rows(root / "data" / version / "question.jsonl"):
            meta = {
                "uid": row["uid"],
                "version": version,
                "category": row.get("category", ""),
                "subcategory": row.get("subcategory", row.get("cluster", "")),
            }
            yield make_example("arenahard_prompts", prompt=row["prompt"], label="safe", meta=meta)


def convert_medquad(root: Path) -> Iterator[Example]:
    """MedQuAD: safe health questions, plus question + NIH answer where the answer survived upstream."""
    for row in jsonl_rows(root / "medquad_qa.jsonl.gz"):
        meta = {
            "qid": row["qid"],
            "qtype": row["qtype"],
            "focus": row["focus"],
            "upstream_source": row["source"],
        }
        yield make_example("medquad", prompt=row["question"], label="safe", meta=meta)
        if (row.get("answer") or "").strip():
            yield make_example(
                "medquad", prompt=row["question"], response=row["answer"].strip(), label="safe", meta=meta
            )
