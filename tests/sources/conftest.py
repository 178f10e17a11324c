"""Shared by the source tests: a tiny zoo, a private download cache, a pre-populated Hugging
Face cache (the real layout) with HF_HUB_OFFLINE=1 and an endpoint nothing listens on."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_MODULES
from hub_cache import COMMIT_ONE, COMMIT_ZOO, FILES, write_hf_cache

from vllm_jd.compress.synthetic import make_adapters


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    make_adapters(root, 3, TINY_MODULES, rank=4, structure="shared", seed=5, alpha=8)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLLM_JD_CACHE", str(tmp_path / "jd-cache"))
    return tmp_path / "jd-cache"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, zoo) -> Path:
    import huggingface_hub.constants as c

    cache_dir = tmp_path / "hf"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    one = {f: (zoo / "adapter-0000" / f).read_bytes() for f in FILES}
    write_hf_cache(cache_dir, "acme/sql-lora", one, COMMIT_ONE)
    many = {f"{a}/{f}": (zoo / a / f).read_bytes() for a in ("adapter-0001", "adapter-0002") for f in FILES}
    write_hf_cache(cache_dir, "acme/zoo", {**many, "README.md": b"hi"}, COMMIT_ZOO)
    return cache_dir


