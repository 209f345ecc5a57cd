"""Shared pytest setup: slow tests run only with --runslow (CI turns it on when time allows)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models: one thread is fastest, and CI runs on 2 shared cores.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("SURGE_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow (or SURGE_RUN_SLOW=1) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


from tests.tiny_fixtures import tiny_kit  # noqa: E402,F401  (session fixture: a reduced tiny kit, built once)
