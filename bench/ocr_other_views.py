"""What reading an image's other views costs and catches (CPU), against the plain image in the same run.

    nice -n 15 .venv/bin/python bench/ocr_other_views.py                    # default model, 30 FigStep items
    .venv/bin/python bench/ocr_other_views.py --figstep 100 --out bench/results/ocr_other_views.json

Items: FigStep/SafeBench typographic images (harmful requests written into the image) with FigStep's own text
prompt. Each image is sent four ways, encoded as a client would send it and loaded by ``mmguard.images``:

* ``plain``: the PNG as FigStep made it (the baseline);
* ``hidden_under_alpha``: every pixel fully transparent, the text kept in the colours under the alpha: blank on
  white (the model's view), plain to a pipeline that drops the alpha (``Image.convert("RGB")``);
* ``white_on_clear``: the text white and opaque on a transparent background: blank on white, plain on black;
* ``later_frame``: a GIF whose first frame is blank and whose second is the image.

For each way, the default guard (``read_text`` at its default, ``auto``: on for mmguard-mini v2) classifies the
item twice: with the image's other views (:func:`mmguard.images.other_views`) and with them stripped, which is
what the guard read before it kept them. Prints the share judged unsafe at the model's own threshold, how well
OCR read the text (difflib similarity to the rendered instruction), and the median time of a classification
with its OCR, as a ratio to the plain image's.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from PIL import Image, ImageOps

from mmguard.conversation import Conversation
from mmguard.guard import Guard
from mmguard.images import OTHER_VIEWS_KEY, load_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from ocr_cost import FIGSTEP_PROMPT, figstep_items  # noqa: E402  (the same items as bench/ocr_cost.py)


def plain(img: Image.Image) -> bytes:
    return _encode(img, "PNG")


def hidden_under_alpha(img: Image.Image) -> bytes:
    rgba = img.convert("RGBA")
    rgba.putalpha(0)
    return _encode(rgba, "PNG")


def white_on_clear(img: Image.Image) -> bytes:
    ink = ImageOps.invert(img.convert("L"))  # dark text: opaque; white paper: clear
    rgba = Image.new("RGBA", img.size, (255, 255, 255, 0))
    rgba.putalpha(ink)
    return _encode(rgba, "PNG")


def later_frame(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    blank = Image.new("RGB", img.size, "white")
    blank.save(buf, format="GIF", save_all=True, append_images=[img.convert("RGB")], duration=500, loop=0)
    return buf.getvalue()


WAYS: dict[str, Callable[[Image.Image], bytes]] = {
    "plain": plain, "hidden_under_alpha": hidden_under_alpha, "white_on_clear": white_on_clear,
    "later_frame": later_frame,
}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def judge(guard: Guard, image: Image.Image, truth: str) -> dict[str, Any]:
    started = time.perf_counter()
    verdict = guard.classify(Conversation.prompt(FIGSTEP_PROMPT, image=image))
    elapsed = (time.perf_counter() - started) * 1000.0
    read = verdict.read_text or ""
    return {"ms": elapsed, "unsafe": verdict.is_unsafe, "read": read,
            "similarity": difflib.SequenceMatcher(None, read.lower(), truth.lower()).ratio(),
            "warnings": list(verdict.warnings)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled default model)")
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--figstep", type=int, default=30, help="FigStep images (spread over the 500)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    ap.add_argument("--read-text", choices=("auto", "on"), default="auto",
                    help="the guard's read_text (auto: the model's default; on for a model that reads)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    items = figstep_items(args.datasets / "figstep_safebench", args.figstep)
    guard = Guard.from_pretrained(args.model, device="cpu", read_text=args.read_text)
    guard.ocr_reader.cache_entries = 0  # every classification pays its OCR
    guard.classify(Conversation.prompt(FIGSTEP_PROMPT, image=items[0][0]))  # warm-up, outside the timings
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {way: {"with": [], "without": []} for way in WAYS}
    for n, (img, _, truth) in enumerate(items, 1):
        for way, encode in WAYS.items():
            loaded = load_image(encode(img))
            rows[way]["with"].append(judge(guard, loaded, truth))
            stripped = loaded.copy()
            stripped.info.pop(OTHER_VIEWS_KEY, None)
            rows[way]["without"].append(judge(guard, stripped, truth))
        print(f"  {n}/{len(items)}", file=sys.stderr, end="\r" if sys.stderr.isatty() else "\n")
    base_ms = statistics.median(r["ms"] for r in rows["plain"]["with"])
    report: dict[str, Any] = {"model": guard.engine.source, "threads": args.threads, "n": len(items),
                              "threshold": guard.threshold_for("prompt"), "ways": {}}
    print(f"model {report['model']} | {len(items)} FigStep items | read_text {guard.read_text} | "
          f"threshold {report['threshold']:.4f}")
    print(f"{'way':<20} {'views':<8} {'unsafe':>7} {'similarity':>11} {'median ms':>10} {'x plain':>8}  warnings")
    for way, pair in rows.items():
        report["ways"][way] = {}
        for which, results in pair.items():
            median = statistics.median(r["ms"] for r in results)
            summary = {
                "share_unsafe": sum(r["unsafe"] for r in results) / len(results),
                "similarity_mean": statistics.fmean(r["similarity"] for r in results),
                "median_ms": median, "ratio_to_plain_median": median / base_ms,
                "with_warnings": sum(bool(r["warnings"]) for r in results),
                "example_warnings": sorted({w for r in results for w in r["warnings"]})[:3],
            }
            report["ways"][way][which] = summary
            print(f"{way:<20} {which:<8} {summary['share_unsafe']:>7.0%} {summary['similarity_mean']:>11.3f} "
                  f"{median:>10.0f} {summary['ratio_to_plain_median']:>8.2f}  {summary['with_warnings']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
