"""`vllm-jd serve-ray` on one CPU machine: two Ray Serve replicas of the tiny model, routed by
cluster. Requests of one cluster land on the same replica, outputs equal the reference (plain
and streamed), and a replica killed mid-run is replaced: the request on it fails fast, later
ones succeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import MAX_TOKENS, PROMPTS, free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster_app(tiny_model, serving_store, tmp_path_factory):
    pytest.importorskip("ray.serve")
    log = tmp_path_factory.mktemp("ray") / "serve-ray.log"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("VLLM_JD_STORE", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [str(Path(sys.executable).parent / "vllm-jd"), "serve-ray", str(tiny_model), "--jd-store", str(serving_store),
           "--replicas", "2", "--clusters-per-replica", "2", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16", "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve-ray exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:  # both replicas up: until the second is, every cluster goes to the first
            r = requests.get(f"{url}/health", timeout=10)
            if r.status_code == 200 and r.json()["replicas_running"] == 2:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"serve-ray not up in 400 s:\n{log.read_text()[-4000:]}")
    yield url
    os.killpg(proc.pid, signal.SIGINT)  # the driver shuts Ray down; replicas' servers die with them
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def complete(url, model, prompt, timeout=300):
    r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                      timeout=timeout)
    return r


def test_clusters_stick_to_replicas_and_outputs_are_exact(cluster_app, serving_store, adapter_names, reference):
    from vllm_jd.store.format import read_manifest

    assert requests.get(f"{cluster_app}/health", timeout=60).json() == {"replicas_running": 2, "replicas_target": 2}
    cluster_of = {n: a.cluster for n, a in read_manifest(serving_store).adapters.items()}
    names = adapter_names[:-1:3] + adapter_names[-1:]
    replicas: dict[int, set[str]] = {}
    for _ in range(2):
        for n, p in zip(names, PROMPTS, strict=False):
            r = complete(cluster_app, n, p)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == reference(p, n), n
            replicas.setdefault(cluster_of[n], set()).add(r.headers["x-vllm-jd-replica"])
    assert all(len(ids) == 1 for ids in replicas.values()), replicas  # one replica per cluster
    assert len(set().union(*replicas.values())) == 2  # and both replicas serve
    models = requests.get(f"{cluster_app}/v1/models", timeout=60).json()["data"]
    assert {m["id"] for m in models} >= set(adapter_names)
    base = models[0]["id"]  # vLLM lists the base model first
    r = requests.post(f"{cluster_app}/v1/completions", json={"model": base, "prompt": PROMPTS[0], "max_tokens": 2},
                      timeout=120)
    assert r.status_code == 200, r.text


def test_streaming_goes_through(cluster_app, adapter_names, reference):
    name, prompt = adapter_names[1], PROMPTS[1]
    tokens: list[int] = []
    with requests.post(f"{cluster_app}/v1/completions", stream=True, timeout=300,
                       json={"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                             "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200 and r.headers["x-vllm-jd-replica"]
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
    assert tokens == reference(prompt, name)


def test_chat_unknown_names_and_the_cluster_budget(cluster_app, adapter_names):
    name, chat = adapter_names[2], f"{cluster_app}/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    r = requests.post(chat, json={"model": name, "max_tokens": 4, "messages": messages}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name and r.json()["usage"]["completion_tokens"] == 4
    with requests.post(chat, json={"model": name, "max_tokens": 4, "messages": messages, "stream": True},
                       stream=True, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert r.status_code == 200 and len(lines) > 2 and lines[-1] == b"data: [DONE]"
    r = requests.post(f"{cluster_app}/v1/completions", json={"model": "no-such-adapter", "prompt": "x", "max_tokens": 2},
                      timeout=60)
    assert r.status_code == 404 and "no-such-adapter" in r.json()["error"]["message"]
    for n in adapter_names:  # Ray's multiplexing cache holds at most K = 2 clusters per replica
        held = requests.get(f"{cluster_app}/v1/jd/replica", params={"model": n}, timeout=60).json()["held"]
        assert len(held) <= 2, held


def replica_pids(url: str, names) -> dict[str, int]:
    """Replica id → pid of every replica that the adapters ``names`` go to now."""
    infos = [requests.get(f"{url}/v1/jd/replica", params={"model": n}, timeout=60).json() for n in names]
    return {i["replica"]: i["pid"] for i in infos}


def test_a_killed_replica_is_replaced(cluster_app, adapter_names):
    name = adapter_names[0]
    pids = replica_pids(cluster_app, adapter_names)
    assert len(pids) == 2, pids
    # A long streamed request, and its replica killed once its first token has arrived: the
    # request is then running there for sure (a fixed sleep raced a fast request, and watching
    # the servers' metrics missed a 1,000-token request on a busy machine).
    body = {"model": name, "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    tokens, broke = 0, None
    with requests.post(f"{cluster_app}/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        pid = pids[r.headers["x-vllm-jd-replica"]]
        lines = r.iter_lines()
        try:
            for line in lines:
                if line.startswith(b"data: {"):
                    tokens += 1
                    if tokens == 1:
                        os.kill(pid, signal.SIGKILL)
                        killed = time.time()
        except requests.RequestException as e:  # the stream broke: also a failure reported
            broke = type(e).__name__
    assert tokens < 1000 and time.time() - killed < 60, (tokens, broke)  # ends fast, unfinished
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            r = complete(cluster_app, name, PROMPTS[0], timeout=60)
            if r.status_code == 200 and requests.get(f"{cluster_app}/health", timeout=60).json()["replicas_running"] == 2:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    else:
        pytest.fail("no answer, or not two replicas again, after the replica was killed")
    assert pid not in replica_pids(cluster_app, adapter_names).values()  # replaced
