"""Shared fixtures: tiny synthetic PEFT adapters written to tmp folders (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_MODULES

from vllm_jd.compress.synthetic import make_adapters


@pytest.fixture(scope="session")
def planted_adapters(tmp_path_factory) -> Path:
    """24 rank-4 adapters in 3 planted groups (adapter i is in group i % 3)."""
    root = tmp_path_factory.mktemp("planted")
    make_adapters(root, 24, TINY_MODULES, rank=4, structure="planted:3", seed=1, alpha=8)
    return root


@pytest.fixture(scope="session")
def shared_adapters(tmp_path_factory) -> Path:
    """16 rank-4 adapters with a common component plus noise (trained-like)."""
    root = tmp_path_factory.mktemp("shared")
    make_adapters(root, 16, TINY_MODULES, rank=4, structure="shared", seed=2, alpha=8)
    return root
