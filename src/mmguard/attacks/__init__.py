"""Adversarial robustness checks for mmguard guards (``mmguard attack``).

* :mod:`.pgd`: white-box L-infinity PGD on the image, through the processor's own padding,
  normalisation and tiling, pushing the verdict from ``unsafe`` to ``safe``.
* :mod:`.gcg`: nanoGCG-style adversarial suffixes in the user prompt or in the agent response.
* :mod:`.transfer`: JPEG re-encoding, resizing and typographic (request-in-the-image) checks.
* :mod:`.report`: paper-style tables and plots.

See ``docs/attacks.md``.
"""

from .common import AttackItem, load_attack_items
from .gcg import GCGConfig, GCGResult, gcg_attack
from .pgd import ImagePipeline, PGDConfig, PGDResult, pgd_attack

__all__ = [
    "AttackItem",
    "GCGConfig",
    "GCGResult",
    "ImagePipeline",
    "PGDConfig",
    "PGDResult",
    "gcg_attack",
    "load_attack_items",
    "pgd_attack",
]
