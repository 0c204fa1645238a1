"""Opt-in fast paths for Mllama guards: mask-free exact vision attention and one encoding per image.

>>> from mmguard.fast import enable_fast_path
>>> enable_fast_path(guard)          # same verdicts, faster (see docs/performance.md)
"""

from .engine import QUANTIZATIONS, FastEngine, enable_fast_path, load_fast_engine, quantize_model
from .vision import fast_vision_forward, patch_vision_attention, two_call_attention

__all__ = ["QUANTIZATIONS", "FastEngine", "enable_fast_path", "fast_vision_forward", "load_fast_engine",
           "patch_vision_attention", "quantize_model", "two_call_attention"]
