"""Opt-in fast paths for Mllama guards: mask-free exact vision attention and one encoding per image.

>>> from mmguard.fast import enable_fast_path
>>> enable_fast_path(guard)          # same verdicts, faster (see docs/performance.md)
"""

from .engine import FastEngine, enable_fast_path, load_fast_engine
from .vision import fast_vision_forward, patch_vision_attention, two_call_attention

__all__ = ["FastEngine", "enable_fast_path", "fast_vision_forward", "load_fast_engine", "patch_vision_attention",
           "two_call_attention"]
