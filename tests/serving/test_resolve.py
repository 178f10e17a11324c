"""On-demand registration (`--jd-resolve hf,fs --jd-resolve-allow …`): a request naming an allowed
Hub id or URL that is not served yet is fetched (from a local fake Hub / a file:// folder),
added to the store, and answered exactly like its exported adapter; 16 concurrent first requests
fetch and register once; a disallowed name is vLLM's 404 with no fetch; a missing or broken
adapter answers 404 / 400 with the reason, the store unchanged and the server serving."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import PROMPTS, merged_reference, start_vllm_jd, stop_server
from helpers import TINY_MODULES, tree_digest
from test_registration import complete

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import read_manifest
from vllm_jd.testing.fake_hub import FakeHub
from vllm_jd.tiny_model import llama_lora_modules

FILES = ("adapter_config.json", "adapter_model.safetensors")


def hub_files(folder) -> dict[str, bytes]:
    return {f: (folder / f).read_bytes() for f in FILES}


@pytest.fixture(scope="module")
def setup(tiny_model, serving_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resolve")
    store = tmp / "store"
    shutil.copytree(serving_store, store)
    mods = llama_lora_modules()
    near = make_adapters(tmp / "src", 1, mods, rank=8, structure="shared", seed=0, alpha=16, prefix="near")[0]
    far = make_adapters(tmp / "src", 1, mods, rank=8, structure="random", seed=7, alpha=16, prefix="far")[0]
    wrong = make_adapters(tmp / "src", 1, TINY_MODULES, rank=4, prefix="wrong")[0]
    make_adapters(tmp / "allowed", 1, mods, rank=8, structure="shared", seed=3, alpha=16, prefix="disk")
    hub = FakeHub().__enter__()
    hub.add_repo("acme/near", {**hub_files(near), "README.md": b"x"})
    hub.add_repo("acme/far", hub_files(far))
    hub.add_repo("acme/wrong", hub_files(wrong))
    hub.add_repo("acme/broken", {FILES[0]: (near / FILES[0]).read_bytes(), FILES[1]: b"\0" * 64})
    hub.add_repo("other/near", hub_files(near))
    hub.add_repo("acme/loaded", hub_files(make_adapters(tmp / "src", 1, mods, rank=8, structure="shared", seed=5,
                                                        alpha=16, prefix="loaded")[0]))
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "VLLM_JD_CACHE": str(tmp / "jd-cache")}
    proc, url = start_vllm_jd(tiny_model, store, tmp / "server.log", "--jd-resolve", "hf,fs", "--jd-resolve-allow",
                              "acme/*", f"file://{tmp}/allowed/*", "--jd-max-error", "0.3",
                              "--jd-spare-adapters", "4", max_num_seqs=16, env_overrides=env)
    yield {"url": url, "store": store, "tmp": tmp, "model": tiny_model, "hub": hub}
    stop_server(proc)
    hub.__exit__(None, None, None)


def reference_of(setup, names):
    out = setup["tmp"] / f"exported-{len(names)}"
    for n in names:
        assert cli(["-q", "export", str(setup["store"]), n, "--out", str(out / n.replace("/", "_"))]) == 0
    ref = merged_reference(setup["model"], out)
    return lambda prompt, name: ref(prompt, name.replace("/", "_"))


def weight_gets(hub, repo) -> int:
    return sum(m == "GET" and p.startswith(f"/{repo}/resolve/") and p.endswith(FILES[1]) for m, p in hub.requests)


def test_concurrent_first_requests_register_once_and_serve_like_the_export(setup):
    url, hub = setup["url"], setup["hub"]
    jobs = [("acme/near", PROMPTS[i % 4]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: complete(url, j[0], j[1]), jobs))
    assert weight_gets(hub, "acme/near") == 1
    assert sum(p.endswith("README.md") for _, p in hub.requests) == 0  # adapter files only
    m = read_manifest(setup["store"])
    assert m.adapters["acme/near"].source.startswith("hf://acme/near@")
    assert complete(url, "acme/far", PROMPTS[0])  # far from every cluster: an exact singleton
    m = read_manifest(setup["store"])
    assert m.clusters[m.adapters["acme/far"].cluster].kind == "exact"
    disk = f"file://{setup['tmp']}/allowed/disk-0000"
    assert complete(url, disk, PROMPTS[1])
    ref = reference_of(setup, ["acme/near", "acme/far", disk])
    for (name, prompt), g in zip(jobs, got, strict=True):
        assert g == ref(prompt, name)
    assert complete(url, "acme/far", PROMPTS[0]) == ref(PROMPTS[0], "acme/far")
    assert complete(url, disk, PROMPTS[1]) == ref(PROMPTS[1], disk)
    ids = [d["id"] for d in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert {"acme/near", "acme/far", disk} <= set(ids)


def post(url, model):
    return requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60)


def test_disallowed_missing_and_broken_names(setup):
    url, hub, store = setup["url"], setup["hub"], setup["store"]
    before, seen = tree_digest(store), len(hub.requests)
    for name in ("other/near", "file:///etc", "/etc/passwd", "s3://bucket/x"):
        r = post(url, name)
        assert r.status_code == 404, r.text
    assert len(hub.requests) == seen  # nothing fetched for a name outside the allowlist
    r = post(url, "acme/missing")
    assert r.status_code == 404 and "no Hub repository acme/missing" in r.text, r.text
    for name, says in [("acme/wrong", "but the store has"), ("acme/broken", "acme/broken")]:
        r = post(url, name)
        assert r.status_code == 400 and says in r.text, r.text
    gets = weight_gets(hub, "acme/broken")
    assert post(url, "acme/broken").status_code == 400 and weight_gets(hub, "acme/broken") == gets  # remembered
    assert tree_digest(store) == before
    assert post(url, str(setup["model"])).status_code == 200  # still serving


def test_load_route_fetches_an_allowed_lora_path(setup):
    url = setup["url"]
    r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "acme/loaded"},
                      timeout=120)
    assert r.status_code == 200, r.text
    assert read_manifest(setup["store"]).adapters["mine"].source.startswith("hf://acme/loaded@")
    assert complete(url, "mine", PROMPTS[2]) == reference_of(setup, ["mine"])(PROMPTS[2], "mine")
    r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "other/near"}, timeout=60)
    assert r.status_code == 400 and "--jd-adapter-root" in r.text, r.text  # not allowed: read as a local path
    r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "acme/missing"}, timeout=60)
    assert r.status_code == 404 and "no Hub repository acme/missing" in r.text, r.text


def test_metrics_count_resolutions(setup):
    text = requests.get(f"{setup['url']}/metrics", timeout=10).text

    def value(series: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))

    assert value('vllm_jd_resolutions_total{outcome="resolved"}') == 3
    assert value('vllm_jd_resolutions_total{outcome="not_found"}') == 1
    assert value('vllm_jd_resolutions_total{outcome="failed"}') == 2
    assert value('vllm_jd_resolution_seconds_count{phase="fetch"}') == 6
    assert value('vllm_jd_resolution_seconds_count{phase="add"}') == 5
