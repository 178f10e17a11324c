"""Per-cluster serving metrics on vLLM's ``/metrics`` (Prometheus), kept in the API server process.

    vllm_jd_requests_total{cluster}            requests started (cluster "base" = no adapter)
    vllm_jd_prompt_tokens_total{cluster}       prompt tokens of finished requests
    vllm_jd_generation_tokens_total{cluster}   generated tokens of finished requests
    vllm_jd_cluster_adapters{cluster}          adapters per cluster (registrations included)
    vllm_jd_resident_clusters                  clusters whose bases are on the device
    vllm_jd_cluster_loads_total{cluster}       with a budget: times a cluster's bases were copied in
    vllm_jd_cluster_load_seconds_total         with a budget: time spent copying bases
    vllm_jd_cluster_load_stall_seconds_total   with a budget: time steps waited for a copy
    vllm_jd_registered_adapter_error           histogram of the projection error of adapters
                                               registered while serving
    vllm_jd_resolutions_total{outcome}         unknown model names tried by --jd-resolve: resolved,
                                               not_found (fetch found nothing), failed (bad adapter,
                                               store or load); disallowed names never get here
    vllm_jd_resolution_seconds{phase}          histogram: fetch, add (to the store), load (workers)
    vllm_jd_adapter_requests_total{adapter}    only with --jd-adapter-metrics (one series per
                                               adapter: thousands of series)

Labels are cluster ids, so the series count is bounded by the number of clusters; adapter-level
labels are opt-in for that reason. Counting happens where every request passes in the API
process (``AsyncLLM.generate``), so completions, chat and streaming are all covered. Residency
figures come from the worker process (``snapshot``), read when ``/metrics`` is scraped.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vllm_jd.envs import max_resident_clusters
from vllm_jd.serving import snapshot
from vllm_jd.store.format import read_manifest

VLLM_JD_ADAPTER_METRICS = "VLLM_JD_ADAPTER_METRICS"
BASE = "base"


class JDMetrics:
    """The metrics of one served store (one instance per process, see ``metrics()``)."""

    def __init__(self, store: str, adapter_labels: bool = False):
        manifest = read_manifest(store)
        self.cluster_of = {name: a.cluster for name, a in manifest.adapters.items()}
        self.requests = Counter("vllm_jd_requests", "Requests started, per cluster", ["cluster"])
        self.prompt_tokens = Counter("vllm_jd_prompt_tokens", "Prompt tokens of finished requests, per cluster",
                                     ["cluster"])
        self.generation_tokens = Counter("vllm_jd_generation_tokens",
                                         "Generated tokens of finished requests, per cluster", ["cluster"])
        self.adapters = Gauge("vllm_jd_cluster_adapters", "Adapters per cluster", ["cluster"])
        budget = max_resident_clusters()
        self.resident = None
        if budget is None:
            self.resident = Gauge("vllm_jd_resident_clusters", "Clusters whose bases are on the device")
        else:
            REGISTRY.register(ResidencyCollector())
        self.registered_error = Histogram("vllm_jd_registered_adapter_error",
                                          "Projection error of adapters registered while serving",
                                          buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0))
        self.resolutions = Counter("vllm_jd_resolutions", "Unknown model names fetched and registered on "
                                   "first request, per outcome", ["outcome"])
        self.resolution_seconds = Histogram("vllm_jd_resolution_seconds", "Seconds of each phase of an "
                                            "on-demand registration", ["phase"],
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.adapter_requests = (Counter("vllm_jd_adapter_requests", "Requests per adapter", ["adapter"])
                                 if adapter_labels else None)
        counts: dict[int, int] = {}
        for c in self.cluster_of.values():
            counts[c] = counts.get(c, 0) + 1
        for c in manifest.clusters:
            self.adapters.labels(str(c.id)).set(counts.get(c.id, 0))
        if self.resident is not None:
            self.resident.set(len(manifest.clusters))  # every basis is loaded at start

    def switch(self, store: str) -> None:
        """Another store version is served (admin route): its adapters and clusters."""
        manifest = read_manifest(store)
        self.cluster_of = {name: a.cluster for name, a in manifest.adapters.items()}
        self.adapters.clear()
        counts: dict[int, int] = {}
        for c in self.cluster_of.values():
            counts[c] = counts.get(c, 0) + 1
        for c in manifest.clusters:
            self.adapters.labels(str(c.id)).set(counts.get(c.id, 0))
        if self.resident is not None:
            self.resident.set(len(manifest.clusters))

    def label(self, lora_name: str | None) -> str:
        if lora_name is None:
            return BASE
        c = self.cluster_of.get(lora_name)
        return BASE if c is None else str(c)

    def started(self, lora_name: str | None) -> str:
        cluster = self.label(lora_name)
        self.requests.labels(cluster).inc()
        if self.adapter_requests is not None and lora_name is not None:
            self.adapter_requests.labels(lora_name).inc()
        return cluster

    def finished(self, cluster: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.labels(cluster).inc(prompt_tokens)
        self.generation_tokens.labels(cluster).inc(generated_tokens)

    def registered(self, name: str, cluster: int, error: float, new_cluster: bool) -> None:
        self.registered_error.observe(error)
        if name in self.cluster_of:  # these metrics were created after it reached the manifest
            return
        self.cluster_of[name] = cluster
        self.adapters.labels(str(cluster)).inc()
        if new_cluster and self.resident is not None:
            self.resident.inc()

    def resolved(self, outcome: str, seconds: dict[str, float]) -> None:
        """One on-demand registration ended with ``outcome``; ``seconds``: phase → time it took."""
        self.resolutions.labels(outcome).inc()
        for phase, t in seconds.items():
            self.resolution_seconds.labels(phase).observe(t)

    def unregistered(self, name: str) -> None:
        c = self.cluster_of.pop(name, None)
        if c is not None:
            self.adapters.labels(str(c)).dec()


class ResidencyCollector:
    """Residency figures of the worker (rank 0's snapshot), read at each scrape."""

    def collect(self):
        worker = snapshot.read("worker")
        table = worker.get("table", [])
        yield GaugeMetricFamily("vllm_jd_resident_clusters", "Clusters whose bases are on the device",
                                value=sum(1 for c in table if c >= 0))
        loads = CounterMetricFamily("vllm_jd_cluster_loads", "Times a cluster's bases were copied to the device",
                                    labels=["cluster"])
        for cluster, n in sorted(worker.get("loads", {}).items(), key=lambda kv: int(kv[0])):
            loads.add_metric([cluster], n)
        yield loads
        yield CounterMetricFamily("vllm_jd_cluster_load_seconds", "Time spent copying cluster bases to the device",
                                  value=worker.get("copy_seconds", 0.0))
        yield CounterMetricFamily("vllm_jd_cluster_load_stall_seconds", "Time steps waited for a cluster's bases",
                                  value=worker.get("stall_seconds", 0.0))


_metrics: JDMetrics | None = None
_lock = threading.Lock()


def metrics(store: str) -> JDMetrics:
    """This process's metrics for ``store`` (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = JDMetrics(store, os.environ.get(VLLM_JD_ADAPTER_METRICS) == "1")
        return _metrics
