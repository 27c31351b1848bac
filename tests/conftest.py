"""Shared fixtures: tiny random-weight models and the OFA reference fixture (CI has it in ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads starve 2 cores

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "ofa_reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "weights.safetensors").exists():
        pytest.skip(f"OFA reference fixture not found at {REFERENCE} (CI places shared/ beside the clone)")
    return REFERENCE


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """A random-weight micro model with a small SentencePiece vocabulary, saved as a checkpoint."""
    from ofa_unified.checkpoint import save_checkpoint
    from ofa_unified.data.shapes import iter_samples
    from ofa_unified.model import build_model
    from ofa_unified.vocab import Vocab, train_sentencepiece

    texts = []
    for _, record in iter_samples("train", 20):
        for key in ("captions", "question", "text", "text2"):
            value = record.get(key)
            texts.extend(value if isinstance(value, list) else [value] if value else [])
    root = tmp_path_factory.mktemp("micro")
    vocab = Vocab.from_sentencepiece(train_sentencepiece(texts, root / "spm", 300), num_codes=16, num_bins=64)
    model = build_model("micro", vocab_size=len(vocab))
    return save_checkpoint(model, vocab, root / "checkpoint")
