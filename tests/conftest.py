from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random HF models saved to disk: llama, llama-drafter, gpt2, gpt2-drafter."""
    return build_tiny_models(tmp_path_factory.mktemp("models"))
