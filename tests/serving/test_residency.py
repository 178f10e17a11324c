"""A resident cluster budget end to end (one in-process engine): the store has 3 clusters, K = 1
is on the device, and batches mixing every cluster still give exactly the reference outputs,
under the cluster-aware policy and under the FCFS baseline."""

from __future__ import annotations

import os

import pytest
from conftest import PROMPTS
from test_offline import ENGINE, MAX_TOKENS, generate

ENV = {"VLLM_JD_MAX_RESIDENT_CLUSTERS": "1", "VLLM_JD_MAX_WAIT": "0.5", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def llm(tiny_model, serving_store, tmp_path_factory):
    env = {**ENV, "VLLM_JD_STORE": str(serving_store), "VLLM_JD_RUNTIME_DIR": str(tmp_path_factory.mktemp("rt"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from vllm import LLM

    from vllm_jd.serving.patch import install

    install()
    engine = LLM(model=str(tiny_model), scheduler_cls="vllm_jd.scheduler.scheduler.JDScheduler", **ENGINE)
    yield engine
    del engine
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _worker_manager(llm):
    return _core(llm).model_executor.driver_worker.worker.model_runner.lora_manager._adapter_manager


def test_more_clusters_than_fit_match_reference(llm, serving_store, adapter_names, reference):
    from vllm_jd.store.format import read_manifest

    clusters = {n: a.cluster for n, a in read_manifest(serving_store).adapters.items()}
    assert len(set(clusters.values())) == 3
    adapters = adapter_names + [None, None]  # every cluster, and base requests, all at once
    prompts = PROMPTS[: len(adapters)]
    loads_before = _core(llm).scheduler.jd_loads
    got = generate(llm, serving_store, prompts, adapters)
    for p, a, g in zip(prompts, adapters, got, strict=True):
        assert g == reference(p, a), f"adapter {a} (cluster {clusters.get(a)}) on {p!r}"
    manager = _worker_manager(llm)
    assert manager.jd_residency.slots == 1
    assert _core(llm).scheduler.jd_loads - loads_before >= 2  # the single slot was reloaded
    assert sum(manager.jd_residency.stats.loads.values()) >= 3
    # the device holds one cluster's bases: every layer's weights have one slot
    _, _, w = manager._jd_layers[0]
    assert w.num_clusters == 1


def test_fcfs_baseline_matches_reference(llm, serving_store, adapter_names, reference):
    scheduler = _core(llm).scheduler
    scheduler.jd_policy = "fcfs"
    try:
        adapters = list(reversed(adapter_names)) + [None]
        prompts = PROMPTS[: len(adapters)]
        got = generate(llm, serving_store, prompts, adapters)
    finally:
        scheduler.jd_policy = "cluster"
    for p, a, g in zip(prompts, adapters, got, strict=True):
        assert g == reference(p, a), f"adapter {a} on {p!r}"


def test_step_never_holds_more_clusters_than_fit(llm, serving_store, adapter_names):
    """Every step's scheduled requests belong to at most K clusters (the worker would refuse)."""
    scheduler = _core(llm).scheduler
    seen: list[set[int]] = []
    original = scheduler.schedule

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        ids = set(out.num_scheduled_tokens)
        reqs = [scheduler.requests[i] for i in ids if i in scheduler.requests]
        reloaded = [False]
        seen.append({c for r in reqs if (c := scheduler.jd_index.cluster(r.lora_request, reloaded)) >= 0})
        return out

    scheduler.schedule = spy
    try:
        generate(llm, serving_store, PROMPTS[:12], adapter_names[:6] + adapter_names[-6:])
    finally:
        del scheduler.schedule
    assert seen and max(len(s) for s in seen) <= 1
    assert len(set().union(*seen)) >= 2


def test_the_plan_gets_every_requests_remaining_tokens(llm, serving_store, adapter_names, monkeypatch):
    """The window rule's inputs: a waiting request's max_tokens less what it generated, and per
    busy cluster its running requests' most remaining tokens."""
    import vllm_jd.scheduler.scheduler as sched

    calls = []
    real = sched.plan_step

    def spy(waiting, running, *args, **kwargs):
        waiting = list(waiting)
        calls.append(([w.tokens for w in waiting], dict(running), dict(kwargs["tails"])))
        return real(waiting, running, *args, **kwargs)

    monkeypatch.setattr(sched, "plan_step", spy)
    generate(llm, serving_store, PROMPTS[:6], adapter_names[:3] + adapter_names[-3:])
    assert calls
    assert any(MAX_TOKENS in tokens for tokens, _, _ in calls)  # fresh requests: all of max_tokens left
    assert all(0 <= t <= MAX_TOKENS for tokens, _, _ in calls for t in tokens)
    for _, running, tails in calls:
        assert set(tails) == set(running)  # one tail per cluster with running requests
        assert all(0 <= t <= MAX_TOKENS for t in tails.values())
    # requests advance: some step saw a running request with fewer tokens left than it started with
    assert any(t < MAX_TOKENS for _, _, tails in calls for t in tails.values())


def test_metrics_snapshot(llm):
    from vllm_jd.serving import snapshot
    from vllm_jd.serving.metrics import ResidencyCollector

    worker = snapshot.read("worker")
    assert len(worker["table"]) == 1 and sum(worker["loads"].values()) >= 3
    families = {f.name: f for f in ResidencyCollector().collect()}
    assert families["vllm_jd_resident_clusters"].samples[0].value == 1
    assert sum(s.value for s in families["vllm_jd_cluster_loads"].samples) >= 3


def test_async_scheduling_gets_the_async_scheduler():
    """vLLM keeps async scheduling on with a custom class; ours must then be an AsyncScheduler."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from vllm_jd.scheduler.scheduler import JDAsyncScheduler, JDScheduler

    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=True))
    assert type(JDScheduler.__new__(JDScheduler, vllm_config=config)) is JDAsyncScheduler
    assert issubclass(JDAsyncScheduler, AsyncScheduler) and issubclass(JDAsyncScheduler, JDScheduler)
    config.scheduler_config.async_scheduling = False
    assert type(JDScheduler.__new__(JDScheduler, config)) is JDScheduler
