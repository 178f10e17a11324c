"""One `vllm-jd serve` (multi-process, as deployed) with a resident cluster budget of 2 of 3
clusters and the admin route: outputs stay exact, residency shows on /metrics, and
`POST /v1/jd/store` moves the server to a recompressed store version while a request in flight
finishes on the old one."""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest
import requests
from conftest import MAX_TOKENS, PROMPTS, merged_reference, start_vllm_jd, stop_server

from vllm_jd.cli import main as cli


@pytest.fixture(scope="module")
def server(tiny_model, serving_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("switch")
    stores = tmp / "stores"
    shutil.copytree(serving_store, stores / "v1")
    # the next version: every adapter re-clustered at a lower rank (outputs change, names stay)
    assert cli(["-q", "compress", "--from-store", str(stores / "v1"), "--out", str(stores / "v2"), "--rank", "6",
                "--clusters", "2"]) == 0
    proc, url = start_vllm_jd(tiny_model, stores / "v1", tmp / "server.log", "--jd-max-resident-clusters", "2",
                              "--jd-admin", max_num_seqs=16)
    yield {"url": url, "stores": stores, "tmp": tmp, "model": tiny_model}
    stop_server(proc)


def complete(url, model, prompt, max_tokens=MAX_TOKENS):
    r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                      timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def reference_for(server, version, names):
    out = server["tmp"] / f"exported-{version}"
    for n in names:
        if not (out / n).exists():
            assert cli(["-q", "export", str(server["stores"] / version), n, "--out", str(out / n)]) == 0
    return merged_reference(server["model"], out)


def metric(url, name):
    text = requests.get(f"{url}/metrics", timeout=10).text
    return [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]


def test_budget_serves_every_cluster_exactly(server, adapter_names):
    names = adapter_names[::3] + adapter_names[-1:]  # all 3 clusters, K = 2
    ref = reference_for(server, "v1", names)
    results = {}
    threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, complete(server["url"], n, p)))
               for n, p in zip(names, PROMPTS, strict=False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, p in zip(names, PROMPTS, strict=False):
        assert results[n] == ref(p, n), n
    assert metric(server["url"], "vllm_jd_resident_clusters") == [2.0]
    assert sum(metric(server["url"], "vllm_jd_cluster_loads_total")) >= 3


def test_switch_rejects_bad_stores(server, tmp_path):
    url = server["url"]
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(tmp_path)}, timeout=30)
    assert r.status_code == 403 and "next to the served store" in r.json()["error"]["message"]
    (server["stores"] / "empty").mkdir()
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(server["stores"] / "empty")}, timeout=30)
    assert r.status_code == 400
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(server["stores"] / "v1")}, timeout=30)
    assert r.status_code == 400 and "already served" in r.json()["error"]["message"]
    assert requests.get(f"{url}/v1/jd/store", timeout=10).json()["store"].endswith("v1")


def test_switch_lets_requests_in_flight_finish_on_the_old_store(server, adapter_names):
    url, name, prompt = server["url"], adapter_names[0], PROMPTS[0]
    old, new = reference_for(server, "v1", [name]), reference_for(server, "v2", [name])
    assert old(prompt, name) != new(prompt, name)  # the versions are told apart by their outputs
    started = threading.Event()
    in_flight: list[int] = []

    def long_request():
        with requests.post(f"{url}/v1/completions", stream=True, timeout=120,
                           json={"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                 "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    started.set()
                    in_flight.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(server["stores"] / "v2")}, timeout=120)
    t.join()
    assert r.status_code == 200, r.text
    assert r.json()["adapters"] == len(adapter_names)
    assert in_flight == old(prompt, name)  # finished on v1
    assert complete(url, name, prompt) == new(prompt, name)  # later requests run on v2
    assert requests.get(f"{url}/v1/jd/store", timeout=10).json()["store"].endswith("v2")
    assert len(complete(url, adapter_names[-1], "x = 1")) == MAX_TOKENS  # the singleton cluster too


def test_a_store_compacted_in_place_is_switched_to_with_the_same_outputs(server, adapter_names):
    url, v2 = server["url"], server["stores"] / "v2"
    names = adapter_names[::3] + adapter_names[-1:]
    ref = reference_for(server, "v2", names)  # exported before the compaction
    gone = adapter_names[1]
    assert gone not in names
    assert cli(["-q", "remove", str(v2), gone]) == 0  # its Σ row stays until compacted
    assert cli(["-q", "compact", str(v2)]) == 0  # a new version of the served folder
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(v2)}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["adapters"] == len(adapter_names) - 1
    for n, p in zip(names, PROMPTS, strict=False):
        assert complete(url, n, p) == ref(p, n), n  # bit-for-bit the same adapters
    r = requests.post(f"{url}/v1/completions", json={"model": gone, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 404, r.text
