"""Session fixture with a reduced tiny kit (same code and layout as the full one, fewer training steps).

Use it from any test module after `from tests.tiny_fixtures import tiny_kit` (or import it once in
conftest.py). Set SURGE_TEST_KIT_DIR to keep the reduced kit between sessions (it is stamp-checked and
rebuilt when stale); by default it is built into pytest's temp directory once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd_scripts_surge.tiny.kit import QUICK_RECIPE, TinyKitPaths, ensure_tiny_kit


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory) -> TinyKitPaths:
    """TinyKitPaths of a QUICK_RECIPE kit: base/ and teacher/ SDXL diffusers folders, dataset, tokenizers."""
    keep = os.environ.get("SURGE_TEST_KIT_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("tiny_kit") / "kit"
    return ensure_tiny_kit(root, recipe=QUICK_RECIPE, progress=False)
