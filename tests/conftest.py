"""Shared fixtures: tiny random-weight models and the OFA reference fixture (CI has it in ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "ofa_reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "weights.safetensors").exists():
        pytest.skip(f"OFA reference fixture not found at {REFERENCE} (CI places shared/ beside the clone)")
    return REFERENCE
