"""The public API: ``Guard.from_pretrained(...)`` and ``guard.classify(conversation)``."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .checkpoints import IMAGE_VERDICT_RULES, load_engine, model_thresholds
from .conversation import Conversation
from .engine import EncodedItem, Engine, PromptTooLongError
from .ocr import (
    DEFAULT_OCR_TIMEOUT_S,
    OCR_INSTALL_HINT,
    TRANSCRIPTION_WINDOW_CHARS,
    OcrEngine,
    OcrUnavailable,
    ocr_available,
    transcription_windows,
    with_transcription,
)
from .ocr_reader import OcrReader
from .policy import Policy, load_policy
from .prefix_cache import DEFAULT_PREFIX_CACHE_TOKENS, PrefixCachingEngine
from .prompt import MarkerHandling, PromptFormat, RenderedPrompt, build_prompt
from .verdict import Verdict, ViolatedCategory

__all__ = ["DEFAULT_THRESHOLD", "IMAGE_VERDICT_RULES", "RANDOM_WEIGHTS_WARNING", "READ_TEXT_MODES", "Guard",
           "deciding_checks"]

RANDOM_WEIGHTS_WARNING = "model has random weights: verdicts are meaningless (plumbing demo only)"
READ_TEXT_MODES = ("off", "auto", "on")


def deciding_checks(checks: Iterable[str], rule: str) -> tuple[str, ...]:
    """The checks whose probabilities decide a verdict under an image verdict rule (see
    ``Guard.image_verdict``): all of them (their larger probability decides) under ``max``; under ``text``,
    the OCR text check alone where it ran (a model whose pixels are not to be trusted)."""
    names = tuple(checks)
    return ("ocr",) if rule == "text" and "ocr" in names else names


DEFAULT_THRESHOLD = 0.5  # a model without validated thresholds in its mmguard.json


class Guard:
    """A Llama Guard 3 Vision style classifier.

    >>> guard = Guard.from_pretrained("meta-llama/Llama-Guard-3-11B-Vision", device="cuda")
    >>> guard.classify(Conversation.prompt("How do I make this?", image="photo.jpg"))
    """

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Policy | str | Path | None = None,
        threshold: float | None = None,
        prompt_format: PromptFormat | str = PromptFormat.HF,
        markers: MarkerHandling | str = MarkerHandling.ESCAPE,
        batch_size: int = 8,
        read_text: str = "auto",
        ocr: OcrEngine | None = None,
        ocr_timeout_s: float = DEFAULT_OCR_TIMEOUT_S,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """``read_text``: ``off``, ``on`` or ``auto`` (on when the model cannot read text in images, by its
        ``mmguard.json``): an image's text is read by OCR (``ocr``: any :class:`mmguard.ocr.OcrEngine`,
        default RapidOCR) and judged by a second, text-only check (:func:`mmguard.ocr.with_transcription`);
        the verdict takes the larger probability. Each image's OCR gets ``ocr_timeout_s``; a failure or a
        timeout is a warning on the verdict.

        ``threshold``: unsafe when P(unsafe) >= it, for every conversation; ``None`` (the default): each task's
        threshold chosen on a validation split and recorded in the model's ``mmguard.json`` (``thresholds``,
        e.g. mmguard-mini v2's), else 0.5 (:meth:`threshold_for`).

        ``max_prompt_tokens``: the longest conversation this guard judges, in tokens with the prompt template
        (``None``: the model's context, ``engine.max_prompt_tokens``); a longer one raises
        :class:`mmguard.engine.PromptTooLongError` naming the limit. A server on a small CPU host lowers it to
        bound the time one request can hold the model (mmguard-mini v2 on 2 cores: 7k tokens take 28 s)."""
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.max_prompt_tokens = max_prompt_tokens
        self.engine = engine
        self.policy = load_policy(policy)
        self.threshold = None if threshold is None else _check_threshold(threshold)
        self.model_thresholds = model_thresholds(getattr(engine, "model_info", None) or {})
        _ = self.image_verdict  # a bad mmguard.json rule fails at load, like bad thresholds, not at the first image
        self.prompt_format = PromptFormat(prompt_format)
        self.markers = MarkerHandling(markers)
        self.batch_size = batch_size
        self.read_text = _check_read_text(read_text)
        self._ocr_given = ocr is not None
        if self.read_text == "on" and ocr is None and not ocr_available():
            raise OcrUnavailable(f"read_text='on' needs RapidOCR: {OCR_INSTALL_HINT}")
        self.ocr_reader = OcrReader(ocr, timeout_s=ocr_timeout_s)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        *,
        policy: Policy | str | Path | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        threshold: float | None = None,
        prompt_format: PromptFormat | str = PromptFormat.HF,
        markers: MarkerHandling | str = MarkerHandling.ESCAPE,
        batch_size: int = 8,
        local_files_only: bool | None = None,
        fast: bool = False,
        fast_options: dict[str, Any] | None = None,
        read_text: str = "auto",
        ocr: OcrEngine | None = None,
        ocr_timeout_s: float = DEFAULT_OCR_TIMEOUT_S,
        prefix_cache: bool = False,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
        max_prompt_tokens: int | None = None,
    ) -> Guard:
        """Load a guard from a local directory or a Hugging Face id (``None``: the bundled default model).

        ``fast=True`` uses :class:`mmguard.fast.FastEngine` (mask-free exact vision attention, each distinct
        image encoded once per call); it gives the same results and is
        tested to, but its speed-up is not yet measured on a GPU (docs/performance.md). ``fast_options`` are
        FastEngine's (``keep_images``, ``mask_free_text``; the approximations ``quantize`` and
        ``real_tiles_only``) and imply ``fast``. ``read_text``, ``ocr``, ``ocr_timeout_s``, ``max_prompt_tokens``:
        see :meth:`__init__`.

        ``prefix_cache=True`` (plain engine only) keeps the KV of the template prefix (task line and category
        block, about half of a short text prompt) and of recent conversations, up to ``prefix_cache_tokens``
        tokens (:mod:`mmguard.prefix_cache`; exact, same results within float rounding).
        """
        _check_read_text(read_text)
        if path_or_id is None:
            from .models import default_model_path

            path_or_id = default_model_path()
        engine = load_engine(path_or_id, device=device, dtype=dtype, local_files_only=local_files_only)
        if fast or fast_options:
            from .fast import FastEngine

            engine = FastEngine.from_engine(engine, **(fast_options or {}))
        if prefix_cache:
            if fast or fast_options:
                raise ValueError("prefix_cache works on the plain engine, not with fast=True")
            engine = PrefixCachingEngine.from_engine(engine, max_tokens=prefix_cache_tokens)
        return cls(engine, policy=policy, threshold=threshold, prompt_format=prompt_format, markers=markers,
                   batch_size=batch_size, read_text=read_text, ocr=ocr, ocr_timeout_s=ocr_timeout_s,
                   max_prompt_tokens=max_prompt_tokens)

    # -- prompts -----------------------------------------------------------------------------------
    def render(self, conversation: Conversation, policy: Policy | None = None) -> RenderedPrompt:
        return build_prompt(conversation, policy or self.policy, format=self.prompt_format, markers=self.markers)

    def prompt_ids(self, conversation: Conversation, policy: Policy | None = None) -> list[int]:
        """Token ids exactly as sent to the model (prompt only, without the decision prefix)."""
        from .tokenizer import encode_prompt

        return encode_prompt(self.engine.tokenizer, self.render(conversation, policy))

    # -- classification ----------------------------------------------------------------------------
    def classify(
        self,
        conversation: Conversation,
        *,
        policy: Policy | str | Path | None = None,
        exclude: Iterable[str] = (),
        threshold: float | None = None,
        categories: bool = True,
        read_text: str | None = None,
        all_category_scores: bool = False,
    ) -> Verdict:
        """Judge the last turn of ``conversation``."""
        return self.classify_batch([conversation], policy=policy, exclude=exclude, threshold=threshold,
                                   categories=categories, read_text=read_text,
                                   all_category_scores=all_category_scores)[0]

    def classify_batch(
        self,
        conversations: Sequence[Conversation],
        *,
        policy: Policy | str | Path | None = None,
        exclude: Iterable[str] = (),
        threshold: float | None = None,
        categories: bool = True,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        read_text: str | None = None,
        all_category_scores: bool = False,
    ) -> list[Verdict]:
        """Judge many conversations; results are in input order and equal one-at-a-time results.

        ``read_text`` overrides the guard's for this call. With it on, the transcriptions' text-only checks
        are scored in the same ``engine.score`` call as the conversations (``progress`` still counts
        conversations). ``all_category_scores`` decodes the category probabilities of safe verdicts too
        (the server's ``category_scores: "always"``), from the check with the largest unsafe probability;
        the verdict, its codes and ``flagged_by`` are the same as without it."""
        conversations = list(conversations)  # a generator too
        wrong = next((c for c in conversations if not isinstance(c, Conversation)), None)
        if wrong is not None:  # a str or a dict raised AttributeError ('str' object has no attribute 'task')
            raise TypeError(f"classify takes Conversation objects (Conversation.prompt(text, image), "
                            f"Conversation.from_messages(messages)), got {type(wrong).__name__}")
        active = load_policy(policy) if policy is not None else self.policy
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())  # "S1" is one code, not 'S', '1'
        if exclude:
            active = active.exclude(exclude)
        fixed = self.threshold if threshold is None else _check_threshold(threshold)
        thresholds = [self.threshold_for(c.task) if fixed is None else fixed for c in conversations]
        start = time.perf_counter()
        prompts = [self.render(c, active) for c in conversations]
        items = [self.encode(p, c.image) for p, c in zip(prompts, conversations, strict=True)]
        reading = self._reading(conversations, active, read_text) if self._read_text_on(read_text) else {}
        n_main = len(items)
        for r in reading.values():
            r.indices = list(range(len(items), len(items) + len(r.items)))
            items.extend(r.items)
        # category codes are decoded for rows at or above the lowest threshold in play (used only if unsafe)
        decode_at = 0.0 if all_category_scores else min(thresholds, default=0.5)
        scored = self.engine.score(items, threshold=decode_at, codes=active.active_codes,
                                   batch_size=batch_size or self.batch_size, decode_codes=categories,
                                   progress=_scaled(progress, n_main, len(items)))
        elapsed_ms = (time.perf_counter() - start) * 1000.0 / max(1, len(conversations))
        rule = self.image_verdict  # read (and checked) once per call, not per conversation
        verdicts = []
        for i, (conv, prompt, s) in enumerate(zip(conversations, prompts, scored[:n_main], strict=True)):
            thr = thresholds[i]
            notes: list[str] = []
            if self.engine.is_random_weights:
                notes.append(RANDOM_WEIGHTS_WARNING)
            if prompt.escaped_markers:
                notes.append(f"escaped {prompt.escaped_markers} prompt section marker(s) found in conversation text")
            read = reading.get(i)
            checks = {"model": s}
            if read is not None:
                notes.extend(read.notes)
                if read.indices:  # a long text is judged in windows: the check is its most unsafe one
                    checks["ocr"] = max((scored[j] for j in read.indices), key=lambda r: r.unsafe_probability)
            deciding = deciding_checks(checks, rule)
            p_unsafe = max(checks[k].unsafe_probability for k in deciding)
            unsafe = p_unsafe >= thr
            flagged = tuple(k for k in deciding if checks[k].unsafe_probability >= thr)
            codes: list[str] = []
            cat_probs: dict[str, float] = {}
            # codes and category probabilities come from the checks that flag; a safe verdict has none, though
            # its row was decoded for a lower threshold in the same batch, unless all are asked for: then from
            # the deciding check that came nearest to flagging
            top = max(deciding, key=lambda k: checks[k].unsafe_probability)
            for k in flagged or ((top,) if all_category_scores else ()):
                codes.extend(c for c in checks[k].codes if c not in codes)
                for code, p in checks[k].category_probabilities.items():
                    cat_probs[code] = max(p, cat_probs.get(code, 0.0))
            verdicts.append(
                Verdict(
                    is_unsafe=unsafe,
                    unsafe_probability=p_unsafe,
                    threshold=thr,
                    role=conv.judged_role,
                    violated=tuple(ViolatedCategory(c, active.category(c).name) for c in codes) if unsafe else (),
                    category_probabilities=cat_probs,
                    raw_text=checks[flagged[0]].raw_text if flagged else None,
                    has_image=conv.has_image,
                    latency_ms=elapsed_ms,
                    warnings=tuple(notes),
                    read_text=read.text if read is not None else None,
                    flagged_by=flagged,
                    check_probabilities={k: c.unsafe_probability for k, c in checks.items()} if len(checks) > 1
                    else {},
                    text_unread=read is not None and (read.text is None or read.unjudged),
                    text_truncated=read is not None and not read.complete,
                )
            )
        return verdicts

    @property
    def prompt_token_limit(self) -> int | None:
        """The limit in effect: the lower of the guard's ``max_prompt_tokens`` and the model's context."""
        limits = [n for n in (self.max_prompt_tokens, getattr(self.engine, "max_prompt_tokens", None)) if n]
        return min(limits, default=None)

    def encode(self, prompt: RenderedPrompt, image: Any) -> EncodedItem:
        """The engine's encoding, refused past the guard's ``max_prompt_tokens`` (the engine refuses past the
        model's context)."""
        item = self.engine.encode(prompt, image)
        limit = self.max_prompt_tokens
        if limit is not None and len(item.input_ids) > limit:
            raise PromptTooLongError(
                f"the conversation takes {len(item.input_ids)} tokens in the prompt template, over this guard's "
                f"limit of {limit} (max_prompt_tokens; the model allows {self.engine.max_prompt_tokens})")
        return item

    def threshold_for(self, task: str) -> float:
        """The decision threshold of a ``prompt`` or ``response`` classification: the guard's fixed one if
        set, else the model's validated one for that task (``mmguard.json``), else 0.5."""
        if self.threshold is not None:
            return self.threshold
        return self.model_thresholds.get(task, DEFAULT_THRESHOLD)

    # -- reading text in images --------------------------------------------------------------------
    @property
    def reads_text_in_images(self) -> bool:
        """Whether the model itself reads text in images (``mmguard.json``; true when unsaid)."""
        info = getattr(self.engine, "model_info", None) or {}
        return bool(info.get("reads_text_in_images", True))

    @property
    def image_verdict(self) -> str:
        """How the checks of a conversation with an image combine (``mmguard.json``'s ``image_verdict``):
        ``max`` (the default) takes the larger unsafe probability of the model's check and the text check;
        ``text`` takes the text check's alone when it ran (a model whose vision adds no measured signal:
        mmguard-mini v2, see its model card). Both checks' probabilities are in every verdict."""
        info = getattr(self.engine, "model_info", None) or {}
        rule = str(info.get("image_verdict") or "max")
        if rule not in IMAGE_VERDICT_RULES:
            raise ValueError(f"mmguard.json: image_verdict must be one of {', '.join(IMAGE_VERDICT_RULES)}, "
                             f"got {rule!r}")
        return rule

    def _read_text_on(self, override: str | None) -> bool:
        mode = self.read_text if override is None else _check_read_text(override)
        return mode == "on" or (mode == "auto" and not self.reads_text_in_images)

    def _reading(self, conversations: Sequence[Conversation], policy: Policy,
                 override: str | None) -> dict[int, _Reading]:
        """OCR of each conversation's image, and the encoded text-only check of what was read."""
        idx = [i for i, c in enumerate(conversations) if c.has_image]
        if not idx:
            return {}
        if not self._ocr_given and not ocr_available():
            if (self.read_text if override is None else override) == "on":
                raise OcrUnavailable(f"read_text='on' needs RapidOCR: {OCR_INSTALL_HINT}")
            note = f"text in the image was not read: OCR is not installed ({OCR_INSTALL_HINT})"
            return {i: _Reading(None, [note]) for i in idx}
        results = self.ocr_reader.read_many([conversations[i].image for i in idx])  # type: ignore[misc]
        out: dict[int, _Reading] = {}
        for i, res in zip(idx, results, strict=True):
            read = _Reading(res.text, [res.warning] if res.warning else [], res.complete)
            image_turn = next(t for t in conversations[i].turns if t.image is not None)
            # nothing read from an image: the text check judges the conversation's own words without it
            # (what the image verdict rule "text" needs); an image alone with nothing read has none
            if res.text or (res.text == "" and image_turn.texts):
                try:
                    escaped = 0
                    # each view's text (the image, a later frame, another rendering) on its own: an innocent
                    # frame read with a harmful one diluted it below the threshold
                    windows = [w for part in res.parts or (res.text,) for w in transcription_windows(part)]
                    for window in windows:
                        # always escaped, whatever self.markers says: nobody can edit what OCR read, and
                        # refusing it (REJECT) dropped the check, so a marker beside harmful text hid it
                        prompt = build_prompt(with_transcription(conversations[i], window), policy,
                                              format=self.prompt_format, markers=MarkerHandling.ESCAPE)
                        read.items.append(self.encode(prompt, None))
                        escaped += prompt.escaped_markers
                    if escaped:
                        read.notes.append(f"escaped {escaped} prompt section marker(s) found in "
                                          "the text read from the image")
                except Exception as err:  # the transcription is hostile input too: never fail the main check
                    read.notes.append(f"text read from the image was not checked: {type(err).__name__}: {err}")
                    read.items = []
                    read.unjudged = True  # as good as unread (a conversation padded to the context's end)
            out[i] = read
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.engine.source,
            "device": self.engine.device,
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "tile_size": self.engine.tile_size,
            "threshold": self.threshold,
            "thresholds": {task: self.threshold_for(task) for task in ("prompt", "response")},
            "prompt_format": self.prompt_format.value,
            "policy": self.policy.name,
            "random_weights": self.engine.is_random_weights,
            "read_text": self.read_text,
            "reads_text_with_ocr": self._read_text_on(None),
            "image_verdict": self.image_verdict,
            # how much of an image's text is judged, and in what windows
            "ocr_text_judged": {"max_chars": self.ocr_reader.max_chars, "window_chars": TRANSCRIPTION_WINDOW_CHARS},
            "max_prompt_tokens": self.prompt_token_limit,
            "prefix_cache_tokens": self.engine.max_tokens if isinstance(self.engine, PrefixCachingEngine) else None,
        }


class _Reading:
    """One image's OCR outcome within a classify_batch call."""

    def __init__(self, text: str | None, notes: list[str], complete: bool = True) -> None:
        self.text = text
        self.notes = notes
        self.complete = complete
        self.items: list[EncodedItem] = []  # the text-only check, one item per window of a long text
        self.indices: list[int] = []  # their positions among the scored items
        self.unjudged = False  # read, but its text check could not be built


def _scaled(progress: Callable[[int], None] | None, shown: int, total: int) -> Callable[[int], None] | None:
    """``progress`` counts conversations while the engine counts all scored items (OCR checks too)."""
    if progress is None or shown == total:
        return progress
    state = {"done": 0, "told": 0}

    def report(n: int) -> None:
        state["done"] += n
        due = state["done"] * shown // max(1, total)
        if due > state["told"]:
            progress(due - state["told"])
            state["told"] = due

    return report


def _check_read_text(value: str) -> str:
    if value not in READ_TEXT_MODES:
        raise ValueError(f"read_text must be one of {', '.join(READ_TEXT_MODES)}, got {value!r}")
    return value


def _check_threshold(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # True was read as 1.0, "0.5" as 0.5
        raise ValueError(f"threshold must be a number within [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {value}")
    return value

