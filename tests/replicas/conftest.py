"""A store shared by the replica tests: 8 adapters in 2 planted clusters, compressed to 2."""

from __future__ import annotations

import pytest

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    from helpers import TINY_MODULES

    root = tmp_path_factory.mktemp("replicas")
    make_adapters(root / "a", 8, TINY_MODULES, rank=4, structure="planted:2", seed=0)
    assert cli(["-q", "compress", str(root / "a"), "--out", str(root / "s"), "--rank", "4", "--clusters", "2"]) == 0
    return root / "s"
