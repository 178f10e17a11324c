"""The Hub download path itself, against a local Hub (vllm_jd.testing.fake_hub) speaking the
endpoints huggingface_hub uses: only adapter files fetched, a dropped connection retried to
identical bytes, a 404 named, then the same sources offline from the cache with no request."""

from __future__ import annotations

import pytest
from hub_cache import FILES
from huggingface_hub import constants

from vllm_jd.cli import main as cli
from vllm_jd.sources.fetch import fetch_one
from vllm_jd.sources.spec import parse_source
from vllm_jd.store.errors import AdapterError
from vllm_jd.store.format import read_manifest
from vllm_jd.testing.fake_hub import FakeHub


@pytest.fixture
def hub(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FakeHub() as h:
        FakeHub.patch(monkeypatch, h.url)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        for i in range(3):
            files = {f: (zoo / f"adapter-{i:04d}" / f).read_bytes() for f in FILES}
            h.add_repo(f"acme/a{i}", {**files, "README.md": b"x", "big.gguf": b"y" * 1000})
        h.add_repo("acme/zoo", {f"{a.name}/{f}": (a / f).read_bytes() for a in sorted(zoo.iterdir()) for f in FILES})
        yield h


def gets(hub: FakeHub, name: str) -> int:
    return sum(m == "GET" and p.endswith(f"/{name}") for m, p in hub.requests)


def test_only_adapter_files_are_downloaded_and_a_dropped_connection_is_retried(hub, zoo):
    hub.drop_once.add(FILES[1])
    [f] = fetch_one(parse_source("acme/a1"))
    assert (f.folder / FILES[1]).read_bytes() == (zoo / "adapter-0001" / FILES[1]).read_bytes()
    assert gets(hub, FILES[1]) == 2  # cut once, fetched again within the same call
    assert gets(hub, "README.md") == gets(hub, "big.gguf") == 0
    assert f.recorded.startswith("hf://acme/a1@") and len(f.recorded.rsplit("@", 1)[1]) == 40


def test_a_missing_repo_is_named_and_offline_the_cache_serves_without_a_request(hub, monkeypatch):
    with pytest.raises(AdapterError, match="no Hub repository acme/nope"):
        fetch_one(parse_source("acme/nope"))
    got = fetch_one(parse_source("acme/zoo"))
    assert [g.name for g in got] == ["acme/zoo/adapter-0000", "acme/zoo/adapter-0001", "acme/zoo/adapter-0002"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    assert [g.folder for g in fetch_one(parse_source("acme/zoo"))] == [g.folder for g in got]
    assert len(hub.requests) == before


def test_compress_fetches_a_list_of_repos_in_parallel(hub, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("acme/a0\nacme/a1\nacme/a2\n")
    out = tmp_path / "store"
    assert cli(["-q", "compress", "--sources", str(listing), "--fetch-workers", "3", "--out", str(out),
                "--rank", "4", "--clusters", "1"]) == 0
    assert sorted(read_manifest(out).adapters) == ["acme/a0", "acme/a1", "acme/a2"]
    assert all(gets(hub, f"acme/a{i}/resolve/{hub_sha}/{FILES[1]}") == 1 for i, hub_sha in
               ((i, read_manifest(out).adapters[f"acme/a{i}"].source.rsplit("@", 1)[1]) for i in range(3)))
