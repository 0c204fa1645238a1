"""Shared fixtures: tiny random-weight Mllama checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("MMGUARD_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Mllama checkpoint (tile 56 px) with the real Llama 3.2 Vision tokenizer."""
    from mmguard.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_guard(tiny_model_dir: Path):
    from mmguard.guard import Guard

    return Guard.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS
