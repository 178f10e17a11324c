"""What a hostile or unlucky production week does to a serving store, against one `vllm-jd serve`
(multi-process, as deployed) with registration, --jd-unload-deletes, 2 spare Σ rows, a 3 s
registration timeout and the admin route:

- a stuck registration (the store locked by another writer) answers 503 in time, commits nothing,
  and /health and completions do not wait for it; a FIFO as weights file is refused at once;
- load/unload cycles never run out of spare rows (rows of deleted adapters come back);
- an adapter the workers cannot serve is taken out of the store again (nothing stuck);
- unload with --jd-unload-deletes waits for the adapter's running requests, then deletes;
- an adapter broken on disk is left out at start, the rest served; a broken store is refused;
- a store recompressed in place is not added to behind the workers' back, and can be switched to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import MAX_TOKENS, merged_reference, start_vllm_jd, stop_server
from safetensors.torch import load_file, save_file

from vllm_jd.cli import main as cli
from vllm_jd.compress.synthetic import make_adapters
from vllm_jd.store.format import read_manifest, sigma_key
from vllm_jd.store.transaction import locked
from vllm_jd.tiny_model import llama_lora_modules

BROKEN = "adapter-0004"


@pytest.fixture(scope="module")
def setup(tiny_model, serving_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    store = tmp / "stores" / "store"
    shutil.copytree(serving_store, store)
    m = read_manifest(store)
    a = m.adapters[BROKEN]  # a NaN in one adapter's Σ row on disk: that adapter is set aside at start
    key = sigma_key(a.cluster, a.block, m.modules[0].name)
    t = load_file(str(store / m.weight_map[key]))
    t[key][a.row] = float("nan")
    save_file(t, str(store / m.weight_map[key]))
    root = tmp / "root"
    mods = llama_lora_modules()
    make_adapters(root, 5, mods, rank=8, structure="shared", seed=0, alpha=16, prefix="cycle")
    make_adapters(root, 1, mods, rank=32, structure="random", seed=3, alpha=16, prefix="wide")  # rank > served 16
    fifo = root / "fifo"
    shutil.copytree(root / "cycle-0000", fifo)
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    proc, url = start_vllm_jd(tiny_model, store, tmp / "server.log", "--jd-adapter-root", str(root),
                              "--jd-max-error", "0.3", "--jd-spare-adapters", "2", "--jd-unload-deletes",
                              "--jd-registration-timeout", "3", "--jd-admin", max_num_seqs=16)
    yield {"url": url, "store": store, "root": root, "tmp": tmp, "model": tiny_model, "log": tmp / "server.log"}
    stop_server(proc)


def load(url, name, path, timeout=60):
    return requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                         timeout=timeout)


def unload(url, name):
    return requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def complete(url, model, prompt="def hello(", max_tokens=MAX_TOKENS):
    return requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0, "ignore_eos": True,
                                                        "return_token_ids": True}, timeout=120)


def serves_as_exported(setup, names: list[str], tag: str) -> None:
    """Each adapter of ``names`` answers with exactly the greedy tokens of its exported PEFT adapter
    merged into the model (what the store holds for it now)."""
    out = setup["tmp"] / f"exported-{tag}"
    for n in names:
        assert cli(["-q", "export", str(setup["store"]), n, "--out", str(out / n)]) == 0
    ref = merged_reference(setup["model"], out)
    for n in names:
        assert complete(setup["url"], n).json()["choices"][0]["token_ids"] == ref("def hello(", n), n


def test_an_adapter_broken_on_disk_is_left_out_and_the_rest_served(setup):
    url = setup["url"]
    ids = [d["id"] for d in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert BROKEN not in ids and "adapter-0003" in ids
    assert complete(url, BROKEN).status_code == 404
    assert complete(url, "adapter-0003").status_code == 200
    assert BROKEN in setup["log"].read_text()  # the warning names it


def test_a_broken_store_is_refused_with_one_line(setup, tmp_path):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(setup["store"], bad)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["modules"].append(raw["modules"][0])
    (bad / "manifest.json").write_text(json.dumps(raw))
    exe = Path(sys.executable).parent / "vllm-jd"
    r = subprocess.run([str(exe), "serve", str(setup["model"]), "--jd-store", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot be served: the module table names a module twice" in r.stderr, r.stderr


def test_a_fifo_is_refused_at_once(setup):
    t0 = time.monotonic()
    r = load(setup["url"], "fifo", "fifo")
    assert r.status_code == 400 and "not a regular file" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 10


def test_a_stuck_registration_times_out_and_nothing_waits_for_it(setup):
    url, store = setup["url"], setup["store"]
    before = (store / "manifest.json").read_bytes()
    with locked(store):  # another writer holds the store for longer than the timeout
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", load(url, "cycle-0000", "cycle-0000")))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.5)
        assert requests.get(f"{url}/health", timeout=2).status_code == 200
        assert complete(url, "adapter-0001").status_code == 200  # completions do not queue behind it
        t.join(30)
        r = result["r"]
        # 503 either way: the caller's timeout cancelled it, or its own wait for the lock ran out first
        msg = r.json()["error"]["message"]
        assert r.status_code == 503 and ("cancelled" in msg or "is busy" in msg), r.text
        assert time.monotonic() - t0 < 15
    assert (store / "manifest.json").read_bytes() == before  # nothing committed
    time.sleep(0.5)  # the cancelled registration's thread gets the lock, sees it was cancelled, gives up
    assert (store / "manifest.json").read_bytes() == before


def test_load_unload_cycles_reuse_rows(setup):
    url, store = setup["url"], setup["store"]
    for i in range(5):  # 5 registrations through 2 spare rows: each deleted one gives its row back
        name = f"cycle-{i:04d}"
        r = load(url, name, name)
        assert r.status_code == 200, r.text
        assert complete(url, name).status_code == 200
        if i < 4:
            assert unload(url, name).status_code == 200
            assert name not in read_manifest(store).adapters  # --jd-unload-deletes
    serves_as_exported(setup, ["cycle-0004"], "cycle")


def test_an_adapter_the_workers_cannot_serve_is_taken_out_again(setup):
    url, store = setup["url"], setup["store"]
    for _ in range(2):  # the retry gets the same reason, not "already in the store"
        r = load(url, "wide", "wide-0000")
        assert r.status_code >= 400 and "rank 32 > the served rank 16" in r.text, r.text
        assert "wide" not in read_manifest(store).adapters
    assert complete(url, "adapter-0001").status_code == 200


def test_unload_deletes_after_the_adapters_requests_finish(setup):
    url, store = setup["url"], setup["store"]
    name = "cycle-0004"
    assert name in read_manifest(store).adapters
    done = {}

    def long_request():
        done["r"] = complete(url, name, max_tokens=120)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    r = unload(url, name)
    t.join(120)
    assert r.status_code == 200, r.text
    assert done["r"].status_code == 200 and len(done["r"].json()["choices"][0]["token_ids"]) == 120
    assert name not in read_manifest(store).adapters


def test_load_inplace_after_a_delete_serves_the_new_weights(setup):
    url, store = setup["url"], setup["store"]
    assert load(url, "inplace", "cycle-0001").status_code == 200
    assert cli(["-q", "remove", str(store), "inplace"]) == 0  # deleted behind the server's back
    r = requests.post(f"{url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "inplace", "lora_path": "cycle-0002", "load_inplace": True})
    assert r.status_code == 200, r.text  # vLLM keeps the id: the workers must still look again
    serves_as_exported(setup, ["inplace"], "inplace")


def test_an_unload_that_cannot_delete_says_so_and_can_be_repeated(setup):
    url, store = setup["url"], setup["store"]
    assert load(url, "busy", "cycle-0003").status_code == 200
    with locked(store):  # held longer than the 3 s timeout
        r = unload(url, "busy")
    assert r.status_code == 503 and "not deleted from the store" in r.json()["error"]["message"], r.text
    assert "busy" in read_manifest(store).adapters
    assert unload(url, "busy").status_code == 200  # not loaded any more: the delete alone is done
    assert "busy" not in read_manifest(store).adapters


def test_a_load_waits_for_an_unload_of_the_same_name(setup):
    url, store = setup["url"], setup["store"]
    assert load(url, "race", "cycle-0001").status_code == 200
    results = {}
    unloading = threading.Thread(target=lambda: results.setdefault("unload", unload(url, "race")))
    loading = threading.Thread(target=lambda: results.setdefault("load", load(url, "race", "cycle-0001")))
    with locked(store):  # released within the 3 s timeout: the delete goes through, then the load
        unloading.start()
        time.sleep(0.5)  # the unload (delete) now waits for the store's lock
        loading.start()
        time.sleep(1.0)
    unloading.join(60)
    loading.join(60)
    assert results["unload"].status_code == 200 and results["load"].status_code == 200, results
    assert "race" in read_manifest(store).adapters  # loaded last, so in the store (once: deleted, then lost)
    assert complete(url, "race").status_code == 200


def test_a_store_recompressed_in_place_is_switched_to_not_added_to(setup):
    url, store = setup["url"], setup["store"]
    assert cli(["-q", "compress", "--from-store", str(store), "--out", str(store), "--rank", "8",
                "--clusters", "2"]) == 0
    before = (store / "manifest.json").read_bytes()
    r = load(url, "cycle-0001", "cycle-0001")
    assert r.status_code == 400 and "recompressed" in r.json()["error"]["message"], r.text
    assert (store / "manifest.json").read_bytes() == before
    r = requests.post(f"{url}/v1/jd/store", json={"store": str(store)}, timeout=120)  # same path, new version
    assert r.status_code == 200, r.text
    assert load(url, "cycle-0001", "cycle-0001").status_code == 200
    serves_as_exported(setup, ["cycle-0001", "adapter-0002"], "v2")  # the new version's, not cached KV of the old
