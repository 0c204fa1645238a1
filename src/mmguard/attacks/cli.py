"""``mmguard attack``: PGD, GCG and transfer checks against a guard, with a paper-style report."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["command", "run_attacks"]

PHASE_SHARE = {"pgd": 0.45, "gcg": 0.45, "transfer": 0.10}


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def run_attacks(
    guard: Any,
    items: list[Any],
    *,
    attacks: set[str],
    budgets: list[float],
    out: Path,
    pgd_config: Any,
    gcg_config: Any,
    max_minutes: float | None = None,
    neutral_images: bool = True,
    show_progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the chosen attacks on ``items`` and write report.md/report.json/plots/PNGs to ``out``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..termio import stderr_is_terminal
    from .common import AttackItem, Deadline, neutral_image, with_image
    from .gcg import gcg_attack
    from .pgd import budget_label, pgd_attack
    from .report import summarise, write_report
    from .transfer import transform_check, typographic_check

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    pgd_rows: list[dict[str, Any]] = []
    gcg_rows: list[dict[str, Any]] = []
    transfer_rows: list[dict[str, Any]] = []
    adv_images: dict[str, tuple[Any, Any, float]] = {}  # item id -> (item, adversarial PIL image, p)
    phases = [p for p in ("pgd", "gcg", "transfer") if p in attacks]
    total_s = None if not max_minutes else 60.0 * max_minutes

    def phase_deadline(name: str) -> Deadline:
        if total_s is None:
            return Deadline(None)
        left = total_s - (time.monotonic() - start)
        later = sum(PHASE_SHARE[p] for p in phases[phases.index(name):])
        return Deadline(left * PHASE_SHARE[name] / later / 60.0)  # a spent budget (left <= 0) skips the phase

    pgd_items = []
    for it in items:
        if it.conversation.has_image:
            pgd_items.append(it)
        elif neutral_images:
            conv = with_image(it.conversation, neutral_image())
            pgd_items.append(AttackItem(it.id, it.task, conv, "neutral", it.meta))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not (show_progress and stderr_is_terminal()),
                  transient=False) as progress:
        if "pgd" in attacks:
            dl = phase_deadline("pgd")
            bar = progress.add_task("PGD (item x budget)", total=len(pgd_items) * len(budgets))
            for it in pgd_items:
                if dl.passed:
                    skipped["pgd"] = skipped.get("pgd", 0) + 1
                    progress.advance(bar, len(budgets))
                    continue
                clean = None
                won = None
                for b in budgets:
                    if won is not None:  # a smaller budget's image is inside this larger budget too
                        r = json.loads(json.dumps(won))
                        r.update(budget=budget_label(b), reused=True)
                        pgd_rows.append(r)
                    else:
                        res, adv = pgd_attack(guard, it, b, pgd_config, out_dir=out / "adversarial",
                                              clean=clean)
                        res.extra["image_source"] = it.image_source
                        clean = (res.clean_p_unsafe, res.clean_unsafe)
                        row = res.to_json()
                        pgd_rows.append(row)
                        if res.success:
                            won = row
                            if res.clean_unsafe:
                                from .pgd import ImagePipeline

                                adv_images[it.id] = (it, ImagePipeline.to_pil(adv), res.adv_p_unsafe)
                    progress.advance(bar)
        if "gcg" in attacks:
            dl = phase_deadline("gcg")
            jobs = [(it, "user") for it in items] + [(it, "agent") for it in items if it.task == "response"]
            bar = progress.add_task("GCG (item x setting)", total=len(jobs))
            clean_cache: dict[str, tuple[float, bool]] = {}
            for it, loc in jobs:
                if dl.passed:
                    skipped["gcg"] = skipped.get("gcg", 0) + 1
                else:
                    res = gcg_attack(guard, it, loc, gcg_config, clean=clean_cache.get(it.id), deadline=dl)
                    clean_cache[it.id] = (res.clean_p_unsafe, res.clean_unsafe)
                    gcg_rows.append(res.to_json())
                progress.advance(bar)
        if "transfer" in attacks:
            dl = phase_deadline("transfer")
            bar = progress.add_task("transfer checks", total=2 * len(adv_images) + len(items))
            for _, (it, img, p) in adv_images.items():
                for name in ("jpeg75", "resize0.5"):
                    if dl.passed:
                        skipped["transfer"] = skipped.get("transfer", 0) + 1
                    else:
                        transfer_rows.append(transform_check(guard, it, img, name, p).to_json())
                    progress.advance(bar)
            for it in items:
                if dl.passed:
                    skipped["transfer"] = skipped.get("transfer", 0) + 1
                else:
                    v = guard.classify(it.conversation, categories=False)
                    r = typographic_check(guard, it, (v.unsafe_probability, v.is_unsafe))
                    if r is not None:
                        transfer_rows.append(r.to_json())
                progress.advance(bar)
    summary = summarise(pgd_rows, gcg_rows, transfer_rows, budgets)
    meta = dict(meta or {})
    meta.update({
        "model": guard.engine.source,
        "random_weights": guard.engine.is_random_weights,
        "device": guard.engine.device,
        "threshold": guard.threshold,  # None: each task's own (thresholds)
        "thresholds": {task: guard.threshold_for(task) for task in ("prompt", "response")},
        "budgets": [budget_label(b) for b in budgets],
        "pgd": {k: v for k, v in pgd_config.__dict__.items()},
        "gcg": {k: v for k, v in gcg_config.__dict__.items()},
        "items": len(items),
        "elapsed_minutes": round((time.monotonic() - start) / 60.0, 2),
        "skipped": skipped,
    })
    write_report(out, meta, summary, {"pgd": pgd_rows, "gcg": gcg_rows, "transfer": transfer_rows})
    return {"meta": meta, "summary": summary}


def command(
    data: Annotated[Path, typer.Option("--data", help="JSONL file or folder with test.jsonl")],
    model: Annotated[str | None, typer.Option("--model", help="checkpoint or HF id")] = None,
    attack: Annotated[str, typer.Option("--attack", help="pgd | gcg | transfer | all")] = "all",
    budgets: Annotated[str, typer.Option("--budgets", help="L-inf budgets in 1/255; 'inf' = unbounded")] = (
        "1,2,4,8,16,32,inf"),
    steps: Annotated[int, typer.Option("--steps", help="PGD steps per item and budget", min=1)] = 10,
    step_size: Annotated[float | None, typer.Option("--step-size", help="PGD step in 1/255 units")] = None,
    random_start: Annotated[bool, typer.Option("--random-start/--no-random-start")] = True,
    gcg_steps: Annotated[int, typer.Option("--gcg-steps", help="GCG steps per item", min=1)] = 10,
    suffix_len: Annotated[int, typer.Option("--suffix-len", help="GCG suffix length in tokens", min=1)] = 12,
    search_width: Annotated[int, typer.Option("--search-width", help="GCG candidates per step", min=1)] = 32,
    topk: Annotated[int, typer.Option("--topk", help="GCG top-k tokens per position", min=1)] = 64,
    gcg_init: Annotated[str | None, typer.Option("--gcg-init", help="initial GCG suffix")] = None,
    limit: Annotated[int, typer.Option("--limit", help="unsafe items per task (prompt, response)", min=1)] = 4,
    split: Annotated[str, typer.Option("--split", help="split to attack")] = "test",
    neutral_images: Annotated[bool, typer.Option(
        "--neutral-images/--no-neutral-images", help="PGD on text items paired with a gray image")] = True,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("attack-report"),
    max_minutes: Annotated[float, typer.Option("--max-minutes", help="wall-clock budget (0: none)")] = 20.0,
    device: Annotated[str, typer.Option("--device")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype")] = "auto",
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="success: P(unsafe) below it (default: the model's per-task thresholds, else 0.5)")] = None,
    loss: Annotated[str, typer.Option("--loss", help="margin (logit unsafe - safe) or logprob")] = "margin",
    label: Annotated[str | None, typer.Option("--label", help="model name shown in the report")] = None,
) -> None:
    """Adversarial robustness of a guard on unsafe items: PGD (image), GCG (text), transfer checks."""
    import torch
    from rich.console import Console

    from ..data.schema import DataError
    from ..engine import EngineError
    from ..guard import Guard
    from ..termio import printable
    from .common import load_attack_items
    from .gcg import GCGConfig
    from .pgd import PGDConfig, parse_budgets

    console = Console(stderr=True)
    wanted = {"pgd", "gcg", "transfer"} if attack == "all" else {a.strip() for a in attack.split(",")}
    if not wanted <= {"pgd", "gcg", "transfer"}:
        raise typer.BadParameter(f"unknown attack in {attack!r}; use pgd, gcg, transfer or all")
    if "transfer" in wanted and "pgd" not in wanted:
        console.print("[yellow]transfer alone runs the typographic check only (JPEG/resize need PGD images)")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        eps = parse_budgets(budgets)
    except ValueError as err:
        raise _fail(f"--budgets {budgets!r}: {err}") from None
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise _fail(f"--step-size: must be a positive number (in 1/255), got {step_size}")
    if not (math.isfinite(max_minutes) and max_minutes >= 0):
        raise _fail(f"--max-minutes: must be a number of minutes >= 0 (0: no budget), got {max_minutes}")
    if loss not in ("margin", "logprob"):
        raise _fail(f"--loss: margin or logprob, got {loss!r}")
    if out.exists() and not out.is_dir():
        raise _fail(f"--out: {out} is a file, not a folder")
    # the data first: a missing or broken file is one line before any model time is spent
    path = data / f"{split or 'test'}.jsonl" if data.is_dir() else data
    if not path.is_file():
        raise _fail(f"--data: file not found: {path}")
    unloadable: list[tuple[str, str]] = []
    try:
        items = load_attack_items(data, limit=limit, split=split, seed=seed, unloadable=unloadable)
    except (DataError, OSError, UnicodeDecodeError) as err:
        raise _fail(f"--data: {err}") from None
    if unloadable:  # said, never silent: the report's counts are of the items that loaded
        first_id, reason = unloadable[0]
        console.print(f"[yellow]warning: {len(unloadable)} unsafe item(s) of {printable(path)} could not be loaded "
                      f"and are not attacked (first: {printable(first_id)}: {printable(reason)})", highlight=False)
    if not items:
        raise _fail(f"no unsafe {split} items in {path} could be loaded" if unloadable else
                    f"no unsafe {split} items in {path}")
    try:
        guard = Guard.from_pretrained(model, device=device, dtype=dtype, threshold=threshold)
    except (EngineError, OSError, ValueError) as err:
        raise _fail(f"cannot load model {model or '(default)'}: {err}", 3) from None
    pgd_cfg = PGDConfig(steps=steps, step_size=None if step_size is None else step_size / 255.0,
                        random_start=random_start, seed=seed, loss=loss)
    gcg_cfg = GCGConfig(steps=gcg_steps, suffix_len=suffix_len, search_width=search_width, topk=topk,
                        seed=seed, loss=loss, init=gcg_init)
    meta = {"data": str(data), "seed": seed,
            "unloadable": {"count": len(unloadable), "first": [f"{i}: {r}" for i, r in unloadable[:5]]},
            "model_label": label or Path(guard.engine.source).name,
            "command": "mmguard attack " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "mmguard attack"}
    try:
        result = run_attacks(guard, items, attacks=wanted, budgets=eps, out=out, pgd_config=pgd_cfg,
                             gcg_config=gcg_cfg, max_minutes=max_minutes or None, neutral_images=neutral_images,
                             meta=meta)
    except ValueError as err:  # bad settings found once the data is seen (e.g. an unusable --gcg-init)
        raise _fail(str(err)) from None
    typer.echo((out / "report.md").read_text())
    if result["meta"]["skipped"]:
        console.print(f"[yellow]time budget reached; skipped: {result['meta']['skipped']}")

