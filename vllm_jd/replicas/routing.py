"""Which multiplexed model id a request carries: its adapter's cluster, or (the baseline, what
Ray Serve LLM does) the adapter itself. Pure: no Ray import.

Ray Serve's router sends a request with a multiplexed model id to a replica that already holds
that id, else to the least loaded one, which then loads it (evicting its least recently used id
past ``max_num_models_per_replica``). With the cluster as the id, every adapter of a cluster
goes where its basis already is, so each replica keeps only some clusters' bases resident.
"""

from __future__ import annotations

from vllm_jd.store.format import read_manifest

ROUTINGS = ("cluster", "adapter")


class Router:
    """``model`` name → multiplexed model id for one store."""

    def __init__(self, store: str, routing: str = "cluster"):
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
        self.store, self.routing = store, routing
        self.reload()

    def reload(self) -> None:
        manifest = read_manifest(self.store)
        self.cluster_of = {name: a.cluster for name, a in manifest.adapters.items()}

    def model_id(self, model: str | None) -> str | None:
        """The multiplexed id for a request naming ``model``; None for the base model or an
        unknown name (any replica answers it: the base model, or vLLM's own 404)."""
        if model is None or model not in self.cluster_of:
            return None
        return f"cluster-{self.cluster_of[model]}" if self.routing == "cluster" else model

    def names(self) -> list[str]:
        return list(self.cluster_of)

    def ids_per_replica(self, clusters_per_replica: int | None) -> int:
        """How many multiplexed ids a replica holds before Ray evicts its least recently used one:
        K clusters, or (adapter routing) as many adapters as K clusters have on average, so both
        routings let a replica hold the same share of the store. 1024 without a budget (every
        cluster is resident anyway; the cap only bounds Ray's bookkeeping)."""
        if clusters_per_replica is None:
            return 1024
        if clusters_per_replica < 1:
            raise ValueError(f"clusters_per_replica {clusters_per_replica}: expected ≥ 1")
        if self.routing == "cluster":
            return clusters_per_replica
        clusters = len(set(self.cluster_of.values())) or 1
        return clusters_per_replica * -(-len(self.cluster_of) // clusters)
