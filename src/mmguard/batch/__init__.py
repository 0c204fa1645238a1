"""``mmguard batch``: judge JSONL conversations at scale, locally or on a Ray cluster, resumably.

>>> from mmguard.batch import GuardSpec, run_batch
>>> summary = run_batch(["convs.jsonl"], "out/", GuardSpec(model="meta-llama/Llama-Guard-3-11B-Vision"))

Each input line gives one output line in ``out/part-*.jsonl`` (the input line's fields plus the verdict,
as ``classify --jsonl`` writes them; bad lines become error rows) and ``out/manifest.json`` records the
plan, the job fingerprint and the summary. See docs/scale-out.md.
"""

from .job import BatchOptions, BatchSummary, JobExists, run_batch
from .plan import Chunk, FingerprintMismatch, GuardSpec, JobPlan
from .storage import StorageError

__all__ = [
    "BatchOptions",
    "BatchSummary",
    "Chunk",
    "FingerprintMismatch",
    "GuardSpec",
    "JobExists",
    "JobPlan",
    "StorageError",
    "run_batch",
]
