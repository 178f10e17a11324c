"""`vllm-jd serve` end to end: vLLM's OpenAI server in its default multi-process mode, so the
plugin must register in the engine and worker processes too."""

from __future__ import annotations

import pytest
import requests
from conftest import MAX_TOKENS, PROMPTS, start_vllm_jd, stop_server


@pytest.fixture(scope="module")
def server(tiny_model, serving_store, tmp_path_factory):
    proc, url = start_vllm_jd(tiny_model, serving_store, tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop_server(proc)


def complete(url, model, prompt):
    r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                      timeout=60)
    r.raise_for_status()
    return r.json()


def test_models_lists_every_adapter_and_the_base(server, adapter_names, tiny_model):
    ids = [m["id"] for m in requests.get(f"{server}/v1/models", timeout=10).json()["data"]]
    assert str(tiny_model) in ids
    assert set(adapter_names) <= set(ids) and len(ids) == len(adapter_names) + 1


def test_completions_match_reference(server, adapter_names, reference, tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(a, PROMPTS[i % len(PROMPTS)]) for i, a in enumerate(adapter_names[:12])] + [(None, "import os")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent, so adapters and base share batches
        outs = list(pool.map(lambda j: complete(server, j[0] or str(tiny_model), j[1]), jobs))
    for (a, p), out in zip(jobs, outs, strict=True):
        assert out["model"] == (a or str(tiny_model))
        assert out["choices"][0]["token_ids"] == reference(p, a), a


def test_chat_completions(server, adapter_names):
    r = requests.post(f"{server}/v1/chat/completions", json={"model": adapter_names[3], "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == adapter_names[3] and r.json()["usage"]["completion_tokens"] == 4


def test_unknown_adapter_is_404(server):
    r = requests.post(f"{server}/v1/completions", json={"model": "no-such-adapter", "prompt": "x", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == 404 and "no-such-adapter" in r.json()["error"]["message"]
