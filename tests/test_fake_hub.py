"""The fake Hub against the REAL huggingface_hub download path (snapshot_download / hf_hub_download)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vllm_jd.testing.fake_hub import FakeHub

REPO = "org/tiny"
FILES = {
    "config.json": b'{"hidden_size": 8}',
    "model.safetensors": bytes(range(256)) * 1200,  # 300 KiB: several chunks, so a cut lands mid-body
    "sub/adapter_config.json": b'{"r": 4}',
    "README.md": b"# tiny\n",
    "pytorch_model.bin": b"\x00" * 64,
}
V2 = {"config.json": b'{"hidden_size": 16}', "model.safetensors": b"v2 weights"}


@pytest.fixture
def hub(monkeypatch):
    # build_hf_headers fetches {constants.ENDPOINT}/api/agent-harnesses once per process (huggingface.co when only
    # endpoint= is passed): telemetry off keeps the tests from ever reaching for the real Hub
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with FakeHub() as h:
        h.sha_main = h.add_repo(REPO, FILES)
        h.sha_v2 = h.add_repo(REPO, V2, revision="v2")
        yield h


def _resolves(hub: FakeHub, method: str, filename: str) -> int:
    return sum(1 for m, p in hub.requests if m == method and p.endswith(f"/resolve/{hub.sha_main}/{filename}"))


def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def test_allow_patterns_fetch_only_matching_files_into_the_real_cache_layout(hub, tmp_path):
    path = snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"], cache_dir=tmp_path, endpoint=hub.url)
    assert path == str(tmp_path / "models--org--tiny" / "snapshots" / hub.sha_main)
    assert _files(path) == {"config.json", "model.safetensors", "sub/adapter_config.json"}
    for name in _files(path):
        assert (tmp_path / path / name).read_bytes() == FILES[name]
        assert os.path.islink(os.path.join(path, name))  # snapshot entries point into blobs/
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == hub.sha_main
    assert (tmp_path / "models--org--tiny" / "trees" / f"{hub.sha_main}.json").is_file()
    assert _resolves(hub, "GET", "README.md") == _resolves(hub, "GET", "pytorch_model.bin") == 0
    assert _resolves(hub, "GET", "model.safetensors") == 1


def test_revision_and_patched_endpoint(hub, tmp_path):
    with hub.patched():  # no endpoint= argument: the module-level endpoint is redirected
        path = snapshot_download(REPO, revision="v2", cache_dir=tmp_path)
        one = hf_hub_download(REPO, "config.json", revision="v2", cache_dir=tmp_path)
    assert path.endswith(f"snapshots/{hub.sha_v2}") and hub.sha_v2 != hub.sha_main
    assert _files(path) == set(V2)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == b"v2 weights"
    assert one == os.path.join(path, "config.json")
    assert (tmp_path / "models--org--tiny" / "refs" / "v2").read_text() == hub.sha_v2
    assert ("GET", f"/api/models/{REPO}/revision/v2") in hub.requests


def test_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path, monkeypatch):
    # http_get keeps only whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks of a cut response: small chunks let it resume
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    hub.drop_once.add("model.safetensors")
    path = snapshot_download(REPO, allow_patterns=["model.safetensors"], cache_dir=tmp_path, endpoint=hub.url)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == FILES["model.safetensors"]
    assert not hub.drop_once  # the cut really happened
    assert _resolves(hub, "GET", "model.safetensors") == 2
    half = len(FILES["model.safetensors"]) // 2  # a multiple of 1024: the cut lands on a chunk boundary
    assert hub.ranges == [(f"/{REPO}/resolve/{hub.sha_main}/model.safetensors", f"bytes={half}-")]
    assert not [p for p in _files(str(tmp_path)) if p.endswith(".incomplete")]


def test_dropped_connection_under_one_chunk_is_fetched_again_in_full(hub, tmp_path):
    hub.drop_once.add("model.safetensors")
    path = hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path, endpoint=hub.url)
    assert open(path, "rb").read() == FILES["model.safetensors"]
    assert not hub.drop_once
    assert _resolves(hub, "GET", "model.safetensors") == 0  # hf_hub_download asked for "main", not the sha
    assert sum(1 for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")) == 2
    assert hub.ranges == []


def test_range_requests(hub):
    url = f"{hub.url}/{REPO}/resolve/main/config.json"
    data = FILES["config.json"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
    for rng, want in (("bytes=3-", data[3:]), ("bytes=2-5", data[2:6]), ("bytes=-4", data[-4:])):
        with opener.open(urllib.request.Request(url, headers={"Range": rng})) as r:
            assert (r.status, r.read()) == (206, want)
            assert r.headers["Content-Range"].endswith(f"/{len(data)}")
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert err.value.code == 416


def test_missing_repo_revision_and_file(hub, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/nope", cache_dir=tmp_path, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9", cache_dir=tmp_path, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", cache_dir=tmp_path, endpoint=hub.url)
    assert (tmp_path / "models--org--tiny" / ".no_exist" / hub.sha_main / "missing.bin").exists()


def test_offline_reads_the_cache_and_never_contacts_the_server(hub, tmp_path, monkeypatch):
    online = snapshot_download(REPO, allow_patterns=["*.json"], cache_dir=tmp_path, endpoint=hub.url)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with hub.patched():
        assert snapshot_download(REPO, allow_patterns=["*.json"], cache_dir=tmp_path) == online
        assert hf_hub_download(REPO, "config.json", cache_dir=tmp_path) == os.path.join(online, "config.json")
        with pytest.raises(IncompleteSnapshotError):  # the cached tree knows the weights were never fetched
            snapshot_download(REPO, cache_dir=tmp_path)
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(REPO, revision="v2", cache_dir=tmp_path)
    assert hub.requests == []
