"""mmguard: moderation of human-AI conversations with images (Llama Guard 3 Vision, complete)."""

from .conversation import Conversation, ConversationError, Turn
from .images import ImageError, ImageLimits, load_image
from .policy import DEFAULT_POLICY, Category, Policy, PolicyError, load_policy
from .prompt import MarkerHandling, PromptFormat, build_prompt
from .verdict import Verdict, ViolatedCategory, parse_output

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_POLICY",
    "Category",
    "Conversation",
    "ConversationError",
    "ImageError",
    "ImageLimits",
    "MarkerHandling",
    "Policy",
    "PolicyError",
    "PromptFormat",
    "Turn",
    "Verdict",
    "ViolatedCategory",
    "build_prompt",
    "load_image",
    "load_policy",
    "parse_output",
]
