"""Converters: one function per folder of ``shared/datasets`` (see its MANIFEST.md), each yielding
:class:`~mmguard.data.schema.Example` items in the common schema.

Every converter takes the dataset's folder (``<datasets>/<name>``) and yields items in file order.
Labels and codes follow the MANIFEST mapping tables. Where the MANIFEST offers several codes for a
source label ("S1 or S2", "per item"), or gives none, the item keeps its safe/unsafe label, its
``codes`` stay empty and ``meta`` records ``codes_status`` (``"ambiguous"`` with ``candidate_codes``,
or ``"unlabeled"``): a wrong gold category is worse than a missing one.

Licensing is decided here, per source (:data:`SOURCES`): ``trainable`` is False for non-commercial
sets and for test-only sets. Test-only sets always get split ``test``. Items whose text includes
third-party model outputs carry ``meta["model_outputs"]`` with the provider terms, so that a build can
keep them out of training too (``exclude_model_outputs``).

The converters of sets with unsafe items (and their safe contrasts) are in :mod:`.unsafe`, those of benign
sets in :mod:`.benign`; the licence table and how one item is built, in :mod:`.common`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..schema import DataError, Example
from .benign import (
    SKIMAGE_PHOTOS,
    convert_alpaca_harmless,
    convert_arenahard_prompts,
    convert_coconot_contrast,
    convert_cyberseceval_frr,
    convert_gsm8k,
    convert_humaneval,
    convert_medquad,
    convert_mtbench_benign,
    convert_phtest,
    convert_selfinstruct_benign,
    convert_skimage_benign_photos,
    convert_toxigen_neutral,
    convert_truthfulqa,
)
from .common import SOURCES, SourceSpec, make_example
from .unsafe import (
    FIGSTEP_INSTRUCTION,
    convert_advbench,
    convert_ailuminate_demo,
    convert_donotanswer,
    convert_figstep_safebench,
    convert_gptfuzz_labeled_responses,
    convert_mm_harmfulbench,
    convert_simplesafetytests,
    convert_xstest,
    donotanswer_codes,
)

__all__ = [
    "CONVERTERS",
    "FIGSTEP_INSTRUCTION",
    "SKIMAGE_PHOTOS",
    "SOURCES",
    "SourceSpec",
    "convert_advbench",
    "convert_ailuminate_demo",
    "convert_all",
    "convert_alpaca_harmless",
    "convert_arenahard_prompts",
    "convert_coconot_contrast",
    "convert_cyberseceval_frr",
    "convert_donotanswer",
    "convert_figstep_safebench",
    "convert_gptfuzz_labeled_responses",
    "convert_gsm8k",
    "convert_humaneval",
    "convert_medquad",
    "convert_mm_harmfulbench",
    "convert_mtbench_benign",
    "convert_phtest",
    "convert_selfinstruct_benign",
    "convert_simplesafetytests",
    "convert_skimage_benign_photos",
    "convert_toxigen_neutral",
    "convert_truthfulqa",
    "convert_xstest",
    "donotanswer_codes",
    "make_example",
]


CONVERTERS: dict[str, Callable[[Path], Iterator[Example]]] = {
    "ailuminate_demo": convert_ailuminate_demo,
    "xstest": convert_xstest,
    "simplesafetytests": convert_simplesafetytests,
    "figstep_safebench": convert_figstep_safebench,
    "mm_harmfulbench": convert_mm_harmfulbench,
    "advbench": convert_advbench,
    "donotanswer": convert_donotanswer,
    "gptfuzz_labeled_responses": convert_gptfuzz_labeled_responses,
    "alpaca_harmless": convert_alpaca_harmless,
    "selfinstruct_benign": convert_selfinstruct_benign,
    "mtbench_benign": convert_mtbench_benign,
    "skimage_benign_photos": convert_skimage_benign_photos,
    "truthfulqa": convert_truthfulqa,
    "gsm8k": convert_gsm8k,
    "humaneval": convert_humaneval,
    "cyberseceval_frr": convert_cyberseceval_frr,
    "toxigen_neutral": convert_toxigen_neutral,
    "coconot_contrast": convert_coconot_contrast,
    "phtest": convert_phtest,
    "arenahard_prompts": convert_arenahard_prompts,
    "medquad": convert_medquad,
}
"""Folder name under ``shared/datasets`` → converter (xstest also yields ``xstest_completions``)."""


def convert_all(datasets_dir: Path, names: Iterable[str] | None = None) -> Iterator[Example]:
    """Run the converters of ``names`` (default: every folder present) on ``datasets_dir``."""
    datasets_dir = Path(datasets_dir)
    wanted = list(names) if names is not None else list(CONVERTERS)
    for name in wanted:
        if name not in CONVERTERS:
            raise DataError(f"unknown dataset {name!r}; known: {', '.join(CONVERTERS)}")
        folder = datasets_dir / name
        if not folder.is_dir():
            if names is not None:
                raise DataError(f"dataset folder {folder} not found")
            continue
        try:
            yield from CONVERTERS[name](folder)
        except DataError:
            raise
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as err:  # a file of another shape
            detail = f"missing column or field {err}" if isinstance(err, KeyError) else str(err)[:200]
            raise DataError(f"{folder}: not in the shape the {name} converter reads (see shared/datasets/"
                            f"MANIFEST.md): {type(err).__name__}: {detail}") from None
