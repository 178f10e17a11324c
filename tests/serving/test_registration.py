"""Adapters registered while serving (`/v1/load_lora_adapter` with a store): servable at once with
exactly the outputs of the exported adapter, bad ones refused with a reason, paths confined to
the adapter root, the store on disk updated so a restart keeps them, unload drops them from memory
(deleting from the store is explicit)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests
from conftest import MAX_TOKENS, PROMPTS, merged_reference, start_vllm_jd, stop_server
from helpers import TINY_MODULES

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import read_manifest
from vllm_jd.tiny_model import llama_lora_modules


def start_server(model: Path, store: Path, root: Path, log: Path):
    # 2 spare Σ rows: "near" and "far" take them, so registering "near" again needs a row given back
    return start_vllm_jd(model, store, log, "--jd-adapter-root", str(root), "--jd-max-error", "0.3",
                         "--jd-spare-adapters", "2", max_num_seqs=16)


@pytest.fixture(scope="module")
def setup(tiny_model, serving_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registration")
    store = tmp / "store"
    shutil.copytree(serving_store, store)
    root = tmp / "root"
    mods = llama_lora_modules()
    make_adapters(root, 1, mods, rank=8, structure="shared", seed=0, alpha=16, prefix="near")  # projects well
    make_adapters(root, 1, mods, rank=8, structure="random", seed=7, alpha=16, prefix="far")  # exact singleton
    make_adapters(root, 1, mods, rank=8, structure="random", seed=11, alpha=16, prefix="other")
    make_adapters(root, 1, TINY_MODULES, rank=4, prefix="wrong")  # another model's shapes
    outside = make_adapters(tmp / "outside", 1, mods, rank=8, structure="random", seed=8, prefix="evil")[0]
    (root / "escape").symlink_to(outside)  # a folder under the root that resolves outside it
    proc, url = start_server(tiny_model, store, root, tmp / "server.log")
    state = {"url": url, "store": store, "root": root, "tmp": tmp, "model": tiny_model, "proc": proc}
    yield state
    stop_server(state["proc"])  # the restart test replaces the server: stop the one running now


def load(url, name, path):
    return requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120)


def complete(url, model, prompt):
    r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                      timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def reference_of(setup, names):
    out = setup["tmp"] / f"exported-{'-'.join(names)}"
    for n in names:
        assert cli(["-q", "export", str(setup["store"]), n, "--out", str(out / n)]) == 0
    return merged_reference(setup["model"], out)


def test_register_projected_and_singleton_adapters_serve_at_once(setup):
    url, store = setup["url"], setup["store"]
    clusters_before = len(read_manifest(store).clusters)
    t = time.perf_counter()
    r = load(url, "near", setup["root"] / "near-0000")
    assert r.status_code == 200, r.text
    r = load(url, "far", "far-0000")  # relative to the adapter root
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t < 30
    m = read_manifest(store)  # on disk, so a restart keeps them
    assert m.clusters[m.adapters["near"].cluster].kind == "shared"
    assert m.clusters[m.adapters["far"].cluster].kind == "exact" and len(m.clusters) == clusters_before + 1
    ids = [d["id"] for d in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert "near" in ids and "far" in ids
    ref = reference_of(setup, ["near", "far", "adapter-0002"])
    prompts = PROMPTS[:6]
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(zip(["near", "far", "adapter-0002", None, "far", "near"], prompts, strict=True))
    with ThreadPoolExecutor(len(jobs)) as pool:  # the new adapters share batches with old ones and the base
        got = list(pool.map(lambda j: complete(url, j[0] or str(setup["model"]), j[1]), jobs))
    for (a, p), g in zip(jobs, got, strict=True):
        assert g == ref(p, a), a


def test_metrics_per_cluster(setup):
    url, store = setup["url"], setup["store"]
    m = read_manifest(store)
    c = m.adapters["adapter-0003"].cluster
    text = requests.get(f"{url}/metrics", timeout=10).text

    def value(series: str) -> float:
        line = [ln for ln in text.splitlines() if ln.startswith(series + " ")]
        return float(line[0].split()[-1]) if line else 0.0

    before = value(f'vllm_jd_requests_total{{cluster="{c}"}}')
    gen_before = value(f'vllm_jd_generation_tokens_total{{cluster="{c}"}}')
    for _ in range(3):
        complete(url, "adapter-0003", "x = 1")
    complete(url, str(setup["model"]), "x = 1")
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert value(f'vllm_jd_requests_total{{cluster="{c}"}}') == before + 3
    assert value(f'vllm_jd_generation_tokens_total{{cluster="{c}"}}') == gen_before + 3 * MAX_TOKENS
    assert value('vllm_jd_requests_total{cluster="base"}') >= 1
    n_c = sum(a.cluster == c for a in m.adapters.values())
    assert value(f'vllm_jd_cluster_adapters{{cluster="{c}"}}') == n_c
    assert value("vllm_jd_resident_clusters") == len(m.clusters)
    assert value("vllm_jd_registered_adapter_error_count") == 2  # near and far, registered above
    assert "vllm_jd_adapter_requests_total" not in text  # adapter labels are opt-in


def test_bad_adapter_is_400_and_the_server_keeps_serving(setup):
    url = setup["url"]
    before = (setup["store"] / "manifest.json").read_bytes()
    r = load(url, "wrong", setup["root"] / "wrong-0000")
    assert r.status_code == 400 and "but the store has 256→" in r.json()["error"]["message"], r.text
    r = load(url, "missing", setup["root"] / "no-such-folder")
    assert r.status_code == 400, r.text
    assert (setup["store"] / "manifest.json").read_bytes() == before  # nothing half-written
    assert len(complete(url, "adapter-0001", "x = 1")) == MAX_TOKENS


@pytest.mark.parametrize("path", ["../outside/evil-0000", "escape", "/etc"])
def test_paths_outside_the_root_are_refused(setup, path):
    r = load(setup["url"], "evil", path)
    assert r.status_code == 403, r.text
    assert "outside the adapter root" in r.json()["error"]["message"]
    assert "evil" not in read_manifest(setup["store"]).adapters


def test_a_held_store_lock_does_not_stall_loads_of_stored_adapters(setup):
    from vllm_jd.store.transaction import locked

    url, store = setup["url"], setup["store"]
    assert requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "far"}, timeout=30).status_code == 200
    with locked(store):  # another writer holds the store
        t0 = time.perf_counter()
        assert load(setup["url"], "far", "far-0000").status_code == 200  # in the store already: no lock needed
        assert len(complete(url, "far", "x = 1")) == MAX_TOKENS
        assert time.perf_counter() - t0 < 20  # the workers' step loop never waits on the store's lock


def test_unload_is_memory_only_and_delete_is_explicit(setup):
    url, store = setup["url"], setup["store"]
    r = requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "near"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "near" in read_manifest(store).adapters  # as vLLM's unload: dropped from memory, kept on disk
    r = requests.post(f"{url}/v1/completions", json={"model": "near", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404
    before = (store / "manifest.json").read_bytes()
    assert load(url, "near", "near-0000").status_code == 200  # the same adapter again: served, nothing written
    assert (store / "manifest.json").read_bytes() == before
    ref = reference_of(setup, ["near", "far"])
    assert complete(url, "near", "def hello(") == ref("def hello(", "near")
    requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "near"}, timeout=30)
    r = load(url, "near", "other-0000")  # the name holds other weights in the store: refused, not overwritten
    assert r.status_code == 400 and "delete it first" in r.json()["error"]["message"], r.text
    assert (store / "manifest.json").read_bytes() == before
    assert cli(["-q", "remove", str(store), "near"]) == 0  # deleting is explicit
    # the name again, another adapter: the workers must serve the new one, not their old Σ row
    r = load(url, "near", "other-0000")
    assert r.status_code == 200, r.text
    ref = reference_of(setup, ["near"])
    assert complete(url, "near", "def hello(") == ref("def hello(", "near")
    assert requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "near"}, timeout=30).status_code == 200
    assert cli(["-q", "remove", str(store), "near"]) == 0
    stop_server(setup["proc"])
    proc, url2 = start_server(setup["model"], store, setup["root"], setup["tmp"] / "server2.log")
    setup["proc"] = proc
    ids = [d["id"] for d in requests.get(f"{url2}/v1/models", timeout=10).json()["data"]]
    assert "far" in ids and "near" not in ids
    ref = reference_of(setup, ["far"])
    assert complete(url2, "far", "def hello(") == ref("def hello(", "far")
