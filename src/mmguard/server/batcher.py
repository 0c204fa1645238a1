"""Dynamic batching: concurrent requests are gathered into model batches run by one worker thread.

The event loop never runs the model. Items wait in a bounded queue; the batcher task takes up to
``max_batch_size`` of them as soon as the batch is full or the oldest has waited ``max_wait_ms``, and
hands the batch to a single-thread executor. While the model runs, new items pile up, so batches
grow with load. Items whose request has timed out or gone away are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..conversation import Conversation, ConversationError
from ..images import ImageError
from ..policy import Policy, PolicyError
from ..prompt import PromptInjectionError
from ..verdict import Verdict
from .metrics import Metrics

__all__ = ["Batcher", "GuardLike", "Outcome", "QueueFull", "WorkSpec"]

log = logging.getLogger("mmguard.server")


class GuardLike(Protocol):
    """What the server needs from :class:`mmguard.guard.Guard`."""

    policy: Policy
    threshold: float | None  # None: each task's own (threshold_for)

    def threshold_for(self, task: str) -> float: ...

    def classify_batch(
        self,
        conversations: Sequence[Conversation],
        *,
        policy: Any = None,
        exclude: Any = (),
        threshold: float | None = None,
        all_category_scores: bool = False,
    ) -> list[Verdict]: ...

    def describe(self) -> dict[str, Any]: ...


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class WorkSpec:
    """One conversation to judge and how. Items with equal ``key`` share a ``classify_batch`` call."""

    conversation: Conversation
    policy: Policy | None = None  # None: the guard's
    policy_key: Hashable = None
    exclude: tuple[str, ...] = ()
    threshold: float | None = None
    always_scores: bool = False

    @property
    def key(self) -> Hashable:
        return (self.policy_key, self.exclude, self.threshold, self.always_scores)


@dataclass
class Outcome:
    verdict: Verdict | None
    error: str | None = None
    fail_closed: bool = False
    input_error: bool = False  # the guard rejected the input (a client error: 400, not fail-closed)


# What the guard raises for input it refuses (as opposed to a failing model): never a model error.
_INPUT_ERRORS = (ConversationError, PolicyError, ImageError, PromptInjectionError, UnicodeError)


@dataclass
class _Item:
    spec: WorkSpec
    future: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        guard: GuardLike,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        fail_closed: bool,
        metrics: Metrics,
        max_queued_images: int | None = None,
    ) -> None:
        self.guard = guard
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queued_images = max_queued_images  # None: no bound beyond max_queue
        self.fail_closed = fail_closed
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_seconds = 0.05  # running estimate, for Retry-After
        self.batches_run = 0

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmguard-model")
        self._task = asyncio.create_task(self._loop(), name="mmguard-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_result(Outcome(None, error="server is shutting down"))
        self.metrics.queue_depth.set(0)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def run_sync(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the model thread (e.g. a warm-up call)."""
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- admission -------------------------------------------------------------------------------
    def retry_after(self) -> int:
        batches_ahead = len(self._pending) / self.max_batch_size + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, specs: Sequence[WorkSpec]) -> list[asyncio.Future[Outcome]]:
        """Queue all of ``specs`` or none (raises :class:`QueueFull`)."""
        if not self.running or self._wakeup is None:
            raise RuntimeError("batcher is not running")
        if len(self._pending) + len(specs) > self.max_queue:
            raise QueueFull(self.retry_after())
        images = sum(spec.conversation.has_image for spec in specs)
        if images and self.max_queued_images is not None:
            # a decoded image waits at about 31 MB (2240 px and its tensors): 512 queued ones held 16 GB
            queued = sum(it.spec.conversation.has_image for it in self._pending if not it.future.done())
            if queued and queued + images > self.max_queued_images:  # a request alone always fits
                raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        futures = []
        for spec in specs:
            fut: asyncio.Future[Outcome] = loop.create_future()
            self._pending.append(_Item(spec, fut))
            futures.append(fut)
        self.metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return futures

    # -- the loop --------------------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    def _live_count(self) -> int:
        return sum(1 for it in self._pending if not it.future.done())

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + self.max_wait
            while self._live_count() < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            while self._pending and len(batch) < self.max_batch_size:
                item = self._pending.popleft()
                if not item.future.done():
                    batch.append(item)
            self.metrics.queue_depth.set(len(self._pending))
            if not batch:
                continue
            now = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.observe(now - item.enqueued)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.in_flight.set(len(batch))
            start = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self._execute, [it.spec for it in batch]
                )
            except Exception as err:  # the executor itself failed (shut down): never leave a future hanging
                outcomes = [self._failure(it.spec, err) for it in batch]
            elapsed = time.perf_counter() - start
            self.metrics.in_flight.set(0)
            self.metrics.batch_latency.observe(elapsed)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            self.batches_run += 1
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(outcome)

    # -- on the model thread ---------------------------------------------------------------------
    def _execute(self, specs: list[WorkSpec]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(specs)
        groups: dict[Hashable, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec.key, []).append(i)
        for idxs in groups.values():
            group = [specs[i] for i in idxs]
            try:
                results = [Outcome(v) for v in self._classify(group)]
            except Exception as err:
                if len(group) == 1:
                    results = [self._failure(group[0], err)]
                else:  # isolate: one bad conversation must not fail its batch mates
                    log.warning("model error on a batch of %d; retrying one at a time: %s", len(group), err)
                    results = []
                    for spec in group:
                        try:
                            results.append(Outcome(self._classify([spec])[0]))
                        except Exception as one_err:
                            results.append(self._failure(spec, one_err))
            for i, res in zip(idxs, results, strict=True):
                outcomes[i] = res
        done = [o for o in outcomes if o is not None]
        # a guard that does not say whether its model reads (a wrapper, a stand-in) is taken to read
        if self.fail_closed and not getattr(self.guard, "reads_text_in_images", True):
            done = [self._closed_if_unread(o) for o in done]
        return done

    def _closed_if_unread(self, outcome: Outcome) -> Outcome:
        """Fail-closed, for a model that cannot read (mmguard-mini v2): a safe verdict on an image whose text
        OCR did not read, or read only in part, was judged blind to (some of) it, and an image made slow to
        read, or padded with text, must not pass for that: a block."""
        v = outcome.verdict
        if v is None or not (v.text_unread or v.text_truncated) or v.is_unsafe:
            return outcome
        self.metrics.fail_closed.inc()
        note = ("fail-closed: the text in the image was " + ("not read" if v.text_unread else "read only in part")
                + ", and this model cannot read it")
        return Outcome(replace(v, is_unsafe=True, warnings=(*v.warnings, note)), fail_closed=True)

    def _classify(self, group: list[WorkSpec]) -> list[Verdict]:
        head = group[0]
        # threshold None: the guard's own (per task); always_scores: category probabilities of safe items too
        return self.guard.classify_batch([s.conversation for s in group], policy=head.policy, exclude=head.exclude,
                                         threshold=head.threshold, all_category_scores=head.always_scores)

    def _failure(self, spec: WorkSpec, err: BaseException) -> Outcome:
        if isinstance(err, _INPUT_ERRORS):
            return Outcome(None, error=str(err), input_error=True)
        self.metrics.model_errors.inc()
        message = f"{type(err).__name__}: {err}"
        log.error("model error: %s", message)
        if not self.fail_closed:
            return Outcome(None, error=message)
        self.metrics.fail_closed.inc()
        conv = spec.conversation
        thr = self.guard.threshold_for(conv.task) if spec.threshold is None else spec.threshold
        verdict = Verdict(
            is_unsafe=True,
            unsafe_probability=1.0,
            threshold=thr,
            role=conv.judged_role,
            has_image=conv.has_image,
            warnings=(f"fail-closed: model error ({type(err).__name__})",),
        )
        return Outcome(verdict, error=message, fail_closed=True)
