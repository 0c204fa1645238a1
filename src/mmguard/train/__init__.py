"""Fine-tuning Mllama guards (full or LoRA) on mmguard JSONL data, and building mmguard-mini."""

from .config import TrainConfig
from .model_setup import build_mini_model
from .trainer import train

__all__ = ["TrainConfig", "build_mini_model", "train"]
