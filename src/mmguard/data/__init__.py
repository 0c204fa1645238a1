"""Labeled safety data: the common JSONL schema, converters for ``shared/datasets``, synthesized
multimodal items, and the training formatter with Meta's augmentations.

Modules: :mod:`.schema` (Example, reader/writer), :mod:`.split` (hash splits), :mod:`.sources`
(one converter per dataset), :mod:`.synth` (typographic and image-paired items), :mod:`.formatter`
(prompts, targets, augmentations, tokenisation), :mod:`.build` (the ``mmguard data build`` pipeline).
"""

from .schema import DataError, Example, read_examples, write_examples

__all__ = ["DataError", "Example", "read_examples", "write_examples"]
