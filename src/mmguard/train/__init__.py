"""Fine-tuning Mllama guards (full or LoRA) on mmguard JSONL data, and building mmguard-mini."""

from .trainer import TrainConfig, build_mini_model, train

__all__ = ["TrainConfig", "build_mini_model", "train"]
